"""Everything that talks to ComfyUI: the pool, header policy, HTTP forwarding, WebSocket relay."""
