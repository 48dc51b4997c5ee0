"""The transport to ComfyUI: HTTP/1.1 connections, the instance pool and its breakers, header
policy, content encodings. Knows nothing of the request context (``proxy.relay`` does)."""
