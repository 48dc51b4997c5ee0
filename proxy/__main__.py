"""``python -m proxy`` is the ``comfygate`` command."""

import sys

from proxy.cli import main

sys.exit(main())
