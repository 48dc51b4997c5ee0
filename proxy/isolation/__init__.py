"""Tenant isolation: each user sees a private view of a shared ComfyUI."""
