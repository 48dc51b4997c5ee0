"""Configuration of the workflow policy: the ``[policy]`` section.

The policy itself (what each role may run) lives in its own TOML files, named here; see
:mod:`proxy.policy.loader` for their language. With no files configured the built-in policy
(``proxy/policy/builtin.toml``) is used: core ComfyUI nodes for ``user`` and ``power``, nothing
for ``viewer``, everything for admins.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PolicySettings(BaseModel):
    """``[policy]``: where the workflow policy comes from and its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Check every submitted workflow (``POST /prompt``) against the submitter's policy and
    filter ``/object_info`` and the model lists. False: everything passes."""
    files: tuple[str, ...] = ()
    """Policy files merged in this order (a glob such as ``"policies/*.toml"`` expands in name
    order). Relative paths are relative to the working directory."""
    dir: str = ""
    """A directory whose ``*.toml`` files are merged, in name order, after ``files``."""
    base: str = "base"
    """The policy every role builds on (unless its policy says ``use_base = false``)."""
    max_nodes: int = Field(default=1000, ge=1)
    """Largest workflow (node count) for a role whose policy sets no ``limits.max_nodes``."""
    max_body_mb: float = Field(default=8.0, gt=0)
    """Largest ``POST /prompt`` body for a role whose policy sets no ``limits.max_body_mb``."""
    max_string_length: int = Field(default=20_000, ge=0)
    """Longest string input for a role whose policy sets no ``limits.max_string_length``."""
    object_info_ttl_seconds: float = Field(default=300.0, gt=0)
    """How long ComfyUI's ``/object_info`` answer is cached before it is refreshed."""

    @field_validator("files")
    @classmethod
    def _files(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(value):
            if not name.strip():
                raise ValueError(f"[{i}]: empty file name")
        return value

    @property
    def uses_builtin(self) -> bool:
        """No files configured: the built-in policy applies."""
        return not self.files and not self.dir


__all__ = ["PolicySettings"]
