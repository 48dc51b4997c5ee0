"""Relaying one request to ComfyUI: the HTTP forward, the choice of home instance and the
WebSocket relay. Above the request context (``proxy.state``) they read and the transport
(``proxy.upstream``: connections, pool, headers, encodings) they send through."""
