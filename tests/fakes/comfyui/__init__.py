"""A faithful fake of ComfyUI 0.3.64 for the proxy's tests and benchmarks.

Usage::

    fake = FakeComfyUI(root=tmp_path, frontend=False)
    port = await fake.start()          # real TCP port; or aiohttp_server(fake.app)
    ...
    await fake.stop()

See :mod:`.server` for the interface and the other modules for what each part imitates.
"""

from .middleware import Received
from .server import FakeComfyUI

__all__ = ["FakeComfyUI", "Received"]
