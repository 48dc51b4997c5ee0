"""Policy files (TOML) -> compiled :class:`~proxy.policy.model.RoleRules`, every error at once.

A policy file holds named policies; a policy named after a role (``[roles.<name>]`` in the
settings) applies to that role, the one named by ``policy.base`` to every role, and any other
one is a building block for ``extends``::

    [policies.user]
    extends = ["flux"]                       # other policies merged in (in order)
    use_base = true                          # build on the base policy (default true)
    unrestricted = false                     # true: may run anything (default: the role's admin)
    nodes.allow = ["KSampler*", "CLIPTextEncode"]    # node types (globs); deny wins
    nodes.deny = ["Save*"]
    models.allow = ["sd15/*", "loras:styles/*"]      # model files (globs; "folder:glob")
    models.deny = ["*nsfw*"]
    limits = { max_nodes = 200, max_body_mb = 2, max_string_length = 4000 }

    [policies.user.bounds]                   # input bounds, keyed by node type (glob)
    "*" = ["steps <= 60", "width * height <= 2048 * 2048", "denoise in [0, 1]"]
    "KSamplerAdvanced" = ["steps <= 80"]     # more specific: replaces "*"'s steps rule here

Files are merged in order (``policy.files``, then ``policy.dir``): a policy defined in several
files (one per node pack) gets its lists concatenated, its scalar keys from the last file, and a
bound of the same inputs under the same node pattern from the last file.

Resolving a role: base (unless ``use_base = false``), then each ``extends`` (recursively), then
the role's own policy. Allow and deny lists are unions (so a deny anywhere wins); limits and
bounds of later layers replace earlier ones.
"""

from __future__ import annotations

import glob
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.errors import SettingsError
from proxy.policy.bounds import Bound, RuleSyntaxError, parse_bound
from proxy.policy.model import GlobSet, GraphLimits, ModelGlobs, RoleRules
from proxy.settings.auth import RoleSettings
from proxy.settings.policy import PolicySettings

BUILTIN = "builtin.toml"
"""The policy used when ``[policy]`` names no files (shipped inside the package)."""
_POLICY_KEYS = frozenset(
    {"description", "extends", "use_base", "unrestricted", "nodes", "models", "limits", "bounds"}
)
_LIST_KEYS = frozenset({"allow", "deny"})
_LIMIT_KEYS = frozenset({"max_nodes", "max_body_mb", "max_string_length"})
_MB = 1024 * 1024

Signature = tuple[bool, frozenset[str]]


class PolicyError(SettingsError):
    """The policy files are invalid; ``problems`` holds one ``file: key: rule`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.args = ("invalid workflow policy:\n  " + "\n  ".join(problems),)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(slots=True)
class _Fragment:
    """One named policy, as merged so far from the files that mention it."""

    name: str
    files: list[str] = field(default_factory=list)
    extends: list[str] = field(default_factory=list)
    use_base: bool | None = None
    unrestricted: bool | None = None
    nodes_allow: list[str] = field(default_factory=list)
    nodes_deny: list[str] = field(default_factory=list)
    models_allow: list[str] = field(default_factory=list)
    models_deny: list[str] = field(default_factory=list)
    limits: dict[str, int | float] = field(default_factory=dict)
    bounds: dict[str, dict[Signature, Bound]] = field(default_factory=dict)
    """Node pattern -> rules by signature (a later rule of the same inputs replaces one)."""


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything a load produced: each configured role's compiled rules."""

    roles: Mapping[str, RoleRules]
    sources: tuple[str, ...]
    """The files read, in merge order (``<builtin>`` for the built-in policy)."""


def load_policy(settings: PolicySettings, roles: Mapping[str, RoleSettings]) -> PolicySet:
    """Read, validate and compile the configured policy files.

    Raises:
        PolicyError: listing every problem (file, key, rule) at once.
    """
    problems: list[str] = []
    documents: list[tuple[str, Any]] = []
    if settings.uses_builtin:
        text = resources.files("proxy.policy").joinpath(BUILTIN).read_text(encoding="utf-8")
        documents.append(("<builtin>", tomllib.loads(text)))
    else:
        for path in _policy_paths(settings, problems):
            try:
                documents.append((str(path), tomllib.loads(path.read_text(encoding="utf-8"))))
            except OSError as exc:
                problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{path}: not valid TOML: {exc}")
    fragments: dict[str, _Fragment] = {}
    for source, document in documents:
        _read_document(source, document, fragments, problems)
    # The built-in policy names the default roles; a configuration may not have them all.
    compiled = _resolve(fragments, settings, roles, problems, strict=not settings.uses_builtin)
    if problems:
        raise PolicyError(problems)
    return PolicySet(roles=compiled, sources=tuple(s for s, _ in documents))


def _policy_paths(settings: PolicySettings, problems: list[str]) -> list[Path]:
    paths: list[Path] = []
    for i, entry in enumerate(settings.files):
        if any(c in entry for c in "*?["):
            matched = sorted(glob.glob(entry))
            if not matched:
                problems.append(f"policy.files[{i}]: {entry!r} matches no file")
            paths.extend(Path(m) for m in matched)
        elif Path(entry).is_file():
            paths.append(Path(entry))
        else:
            problems.append(f"policy.files[{i}]: {entry!r}: not found")
    if settings.dir:
        directory = Path(settings.dir)
        if not directory.is_dir():
            problems.append(f"policy.dir: {settings.dir!r}: not a directory")
        else:
            paths.extend(sorted(p for p in directory.glob("*.toml") if p.is_file()))
    return list(dict.fromkeys(paths))  # a file named twice is read once


# -- one file ----------------------------------------------------------------------------------


def _read_document(
    source: str, document: Mapping[str, Any], fragments: dict[str, _Fragment], problems: list[str]
) -> None:
    for key in document:
        if key != "policies":
            problems.append(f"{source}: {key}: unknown key (a policy file holds [policies.<name>])")
    policies = document.get("policies", {})
    if not isinstance(policies, dict):
        problems.append(f"{source}: policies: must be a table of [policies.<name>]")
        return
    for name, table in policies.items():
        where = f"{source}: policies.{name}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        fragment = fragments.setdefault(name, _Fragment(name))
        fragment.files.append(source)
        _read_policy(where, table, fragment, problems)


def _read_policy(
    where: str, table: Mapping[str, Any], fragment: _Fragment, problems: list[str]
) -> None:
    for key in table:
        if key not in _POLICY_KEYS:
            known = ", ".join(sorted(_POLICY_KEYS))
            problems.append(f"{where}.{key}: unknown key (one of {known})")
    if "description" in table and not isinstance(table["description"], str):
        problems.append(f"{where}.description: must be a string")
    for key in ("use_base", "unrestricted"):
        if key in table:
            if isinstance(table[key], bool):
                setattr(fragment, key, table[key])
            else:
                problems.append(f"{where}.{key}: must be true or false")
    if "extends" in table:
        fragment.extends.extend(_strings(f"{where}.extends", table["extends"], problems))
    for kind in ("nodes", "models"):
        if kind not in table:
            continue
        section = table[kind]
        if not isinstance(section, dict):
            problems.append(f"{where}.{kind}: must be a table with allow and/or deny lists")
            continue
        for key in section:
            if key not in _LIST_KEYS:
                problems.append(f"{where}.{kind}.{key}: unknown key (allow, deny)")
        for key in ("allow", "deny"):
            if key in section:
                target = getattr(fragment, f"{kind}_{key}")
                target.extend(_patterns(f"{where}.{kind}.{key}", section[key], problems))
    if "limits" in table:
        _read_limits(f"{where}.limits", table["limits"], fragment, problems)
    if "bounds" in table:
        _read_bounds(f"{where}.bounds", table["bounds"], fragment, problems)


def _strings(where: str, value: Any, problems: list[str]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: must be a list of non-empty strings")
        return []
    return list(value)


def _patterns(where: str, value: Any, problems: list[str]) -> list[str]:
    patterns = _strings(where, value, problems)
    for i, pattern in enumerate(patterns):
        if pattern != pattern.strip():
            problems.append(f"{where}[{i}]: {pattern!r} has leading or trailing spaces")
    return patterns


def _read_limits(where: str, value: Any, fragment: _Fragment, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a table (max_nodes, max_body_mb, max_string_length)")
        return
    for key, limit in value.items():
        if key not in _LIMIT_KEYS:
            problems.append(f"{where}.{key}: unknown key (one of {', '.join(sorted(_LIMIT_KEYS))})")
            continue
        if key == "max_body_mb":
            ok = isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0
            rule = "must be a number > 0"
        else:
            minimum = 1 if key == "max_nodes" else 0
            ok = isinstance(limit, int) and not isinstance(limit, bool) and limit >= minimum
            rule = f"must be an integer >= {minimum}"
        if ok:
            fragment.limits[key] = limit
        else:
            problems.append(f"{where}.{key}: {limit!r}: {rule}")


def _read_bounds(where: str, value: Any, fragment: _Fragment, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f'{where}: must be a table of node pattern = ["rule", ...]')
        return
    for pattern, rules in value.items():
        key = f'{where}."{pattern}"'
        if not pattern or pattern != pattern.strip():
            problems.append(f"{key}: a node pattern must be a non-empty name or glob")
            continue
        if not isinstance(rules, list):
            problems.append(f'{key}: must be a list of rules such as ["steps <= 60"]')
            continue
        compiled = fragment.bounds.setdefault(pattern, {})
        for i, text in enumerate(rules):
            try:
                bound = parse_bound(text)
            except RuleSyntaxError as exc:
                problems.append(f"{key}[{i}]: {exc}")
                continue
            compiled.pop(bound.signature, None)  # re-insert: a replacement moves to the end
            compiled[bound.signature] = bound


# -- resolving roles ---------------------------------------------------------------------------


def _resolve(
    fragments: Mapping[str, _Fragment],
    settings: PolicySettings,
    roles: Mapping[str, RoleSettings],
    problems: list[str],
    *,
    strict: bool,
) -> dict[str, RoleRules]:
    """Each configured role's rules. ``strict``: a policy that is no role, not the base and not
    extended is an error (most likely a misspelt role)."""
    extended = {e for f in fragments.values() for e in f.extends}
    for name, fragment in fragments.items():
        files = ", ".join(dict.fromkeys(fragment.files))
        for parent in dict.fromkeys(fragment.extends):
            if parent not in fragments:
                problems.append(f"{files}: policies.{name}.extends: {parent!r} is not defined")
        if strict and name not in roles and name != settings.base and name not in extended:
            problems.append(
                f"{files}: policies.{name}: not a role in [roles], not the base policy "
                f"({settings.base!r}) and not extended by any policy (a typo?)"
            )
        if name in roles and name == settings.base:
            problems.append(f"{files}: policies.{name}: the base policy cannot also be a role")
    _check_cycles(fragments, problems)
    if problems:
        return {}
    base = fragments.get(settings.base) if settings.base else None
    compiled: dict[str, RoleRules] = {}
    for role, role_settings in roles.items():
        own = fragments.get(role)
        layers: list[_Fragment] = []
        if base is not None and (own is None or own.use_base is not False):
            layers.extend(_flatten(base, fragments))
        if own is not None:
            layers.extend(_flatten(own, fragments))
        unrestricted = role_settings.admin
        if own is not None and own.unrestricted is not None:
            unrestricted = own.unrestricted
        compiled[role] = _compile(role, unrestricted, _unique(layers), settings)
    return compiled


def _check_cycles(fragments: Mapping[str, _Fragment], problems: list[str]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in fragments:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path[path.index(name) :], name])
            problems.append(f"policies.{name}.extends: cycle {cycle}")
            return
        state[name] = 1
        for parent in fragments[name].extends:
            visit(parent, [*path, name])
        state[name] = 2

    for name in fragments:
        visit(name, [])


def _flatten(fragment: _Fragment, fragments: Mapping[str, _Fragment]) -> list[_Fragment]:
    """The fragment after everything it extends (depth first, in order)."""
    out: list[_Fragment] = []
    for parent in fragment.extends:
        if parent in fragments:
            out.extend(_flatten(fragments[parent], fragments))
    out.append(fragment)
    return out


def _unique(layers: Iterable[_Fragment]) -> list[_Fragment]:
    """Each policy once, at its first position (``a`` extended twice counts once)."""
    seen: dict[str, _Fragment] = {}
    for layer in layers:
        seen.setdefault(layer.name, layer)
    return list(seen.values())


def _compile(
    role: str, unrestricted: bool, layers: list[_Fragment], settings: PolicySettings
) -> RoleRules:
    limits: dict[str, int | float] = {
        "max_nodes": settings.max_nodes,
        "max_body_mb": settings.max_body_mb,
        "max_string_length": settings.max_string_length,
    }
    bounds: dict[str, dict[Signature, Bound]] = {}
    for layer in layers:
        limits.update(layer.limits)
        for pattern, rules in layer.bounds.items():
            target = bounds.setdefault(pattern, {})
            for signature, rule in rules.items():
                target.pop(signature, None)
                target[signature] = rule
    return RoleRules(
        name=role,
        unrestricted=unrestricted,
        nodes_allow=GlobSet.of(p for layer in layers for p in layer.nodes_allow),
        nodes_deny=GlobSet.of(p for layer in layers for p in layer.nodes_deny),
        models_allow=ModelGlobs.of(p for layer in layers for p in layer.models_allow),
        models_deny=ModelGlobs.of(p for layer in layers for p in layer.models_deny),
        bounds=tuple((p, tuple(r.values())) for p, r in bounds.items() if r),
        limits=GraphLimits(
            max_nodes=int(limits["max_nodes"]),
            max_body_bytes=int(limits["max_body_mb"] * _MB),
            max_string_length=int(limits["max_string_length"]),
        ),
    )


__all__ = ["BUILTIN", "PolicyError", "PolicySet", "load_policy"]
