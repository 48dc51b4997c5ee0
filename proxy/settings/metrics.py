"""Configuration of the metrics endpoint: the ``[metrics]`` section.

``/metrics`` is never public by default: it listens on loopback, on its own port. Exposed
beyond loopback (a container, a pod) it should be limited to the scraper's networks or a bearer
token; on the main port, one of the two is required.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class MetricsSettings(BaseModel):
    """Where and to whom ``/metrics`` is served, and what is measured in the background."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Serve Prometheus metrics."""
    host: str = "127.0.0.1"
    """Listen address of the separate metrics listener (unused with ``on_main_port``)."""
    port: int = Field(default=9464, ge=1, le=65535)
    """Port of the separate metrics listener."""
    on_main_port: bool = False
    """Serve ``path`` on the main listener instead of a separate one (needs ``bearer_token`` or
    ``allowed_networks``: the main port faces clients)."""
    path: str = "/metrics"
    """The path metrics are served at."""
    bearer_token: str = ""
    """A scraper must send ``Authorization: Bearer <token>`` (secret; ``bearer_token_file``)."""
    allowed_networks: tuple[IPNetwork, ...] = ()
    """CIDRs a scraper must come from (empty: any address that can reach the listener)."""
    upstream_poll_seconds: float = Field(default=5.0, ge=0)
    """How often each ComfyUI is probed (``GET /prompt``) for up/down, latency and queue
    depth, per process; 0 disables the probe."""
    per_user_top_n: int = Field(default=0, ge=0, le=1000)
    """Export request counts of the N busiest users (user ids as labels); 0 = off."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in "?#%") or value == "/":
            raise ValueError("must be a plain absolute path such as /metrics")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _protected_on_main_port(self) -> MetricsSettings:
        # SECURITY: the main port is what clients reach; metrics there must not be public.
        if self.enabled and self.on_main_port and not (self.bearer_token or self.allowed_networks):
            raise ValueError("on_main_port needs bearer_token (or _file) or allowed_networks")
        return self
