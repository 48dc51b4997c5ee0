"""ComfyUI's WebSocket events: the vocabulary the relay's observers and filters read
(docs/comfyui-protocol.md#websocket-protocol)."""

from __future__ import annotations

END_EVENTS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
"""Events that end a prompt's execution (besides the final ``executing {node: null}``)."""
