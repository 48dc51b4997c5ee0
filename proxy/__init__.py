"""comfygate: a transparent, authenticating, multi-tenant reverse proxy for ComfyUI."""

__version__ = "0.1.0"
