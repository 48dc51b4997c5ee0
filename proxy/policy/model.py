"""The compiled workflow policy: what one role may run, and the effective policy of a principal.

Everything here is immutable data built once by :mod:`proxy.policy.loader` (at startup and on
every reload) and read on the request path. Two levels:

- :class:`RoleRules` - one role's rules, with the base policy and ``extends`` already merged in.
- :class:`RolePolicy` - what a *principal* gets: the combination of its roles' rules. With
  several roles the most generous one decides, item by item (a node is allowed when any role
  allows it, a model likewise, the graph limits are the largest); see :mod:`proxy.policy.checker`
  for how a node's inputs are judged. A role marked ``unrestricted`` (admins by default) makes
  the whole principal unrestricted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxy.comfy.names import (
    MODEL_EXTENSIONS,
    MODEL_INPUT_FOLDERS,
    MODEL_INPUT_NAMES,
    is_model_input,
)
from proxy.policy.bounds import Bound

NODE_MODEL_FOLDERS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("CLIPVisionLoader", "clip_name"): ("clip_vision",),
    ("UpscaleModelLoader", "model_name"): ("upscale_models",),
    ("ModelPatchLoader", "name"): ("model_patches",),
}
"""Where a node's input reads from when the input name alone is ambiguous or unusual."""


def model_folders(class_type: str, input_name: str) -> tuple[str, ...]:
    """The model folders an input reads from; ``()`` when unknown (a custom loader)."""
    return NODE_MODEL_FOLDERS.get((class_type, input_name)) or MODEL_INPUT_FOLDERS.get(
        input_name, ()
    )


def normalise_model_name(value: str) -> str:
    """Model names as ComfyUI lists them use the server's separator; patterns use ``/``."""
    return value.replace("\\", "/")


# -- patterns ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobSet:
    """Glob patterns (``*``, ``?``, ``[abc]``; case-sensitive, ``*`` also crosses ``/``),
    compiled into one regular expression, plus a set for the plain names among them."""

    patterns: tuple[str, ...] = ()
    _exact: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, patterns: Iterable[str]) -> GlobSet:
        unique = tuple(dict.fromkeys(patterns))
        exact = frozenset(p for p in unique if not is_glob(p))
        globs = [p for p in unique if is_glob(p)]
        # SECURITY: fnmatch.translate escapes everything but the glob syntax; the patterns are
        # the operator's, and a policy file can only make the regex longer, not different.
        regex = re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None
        return cls(unique, exact, regex)

    def matches(self, text: str) -> bool:
        if text in self._exact:
            return True
        return self._regex is not None and self._regex.match(text) is not None

    @property
    def matches_everything(self) -> bool:
        return "*" in self.patterns

    def __bool__(self) -> bool:
        return bool(self.patterns)


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def specificity(pattern: str) -> tuple[int, int]:
    """How specific a node-type pattern is: a plain name beats any glob, and a glob with more
    literal characters beats a shorter one (``KSampler*`` beats ``K*`` beats ``*``)."""
    if not is_glob(pattern):
        return (1, len(pattern))
    return (0, sum(1 for c in pattern if c not in "*?[]"))


@dataclass(frozen=True, slots=True)
class ModelGlobs:
    """Model patterns: ``glob`` applies to every folder, ``folder:glob`` to one folder
    (``loras:sdxl/*``). Names are matched with ``/`` separators."""

    anywhere: GlobSet = GlobSet()
    by_folder: Mapping[str, GlobSet] = field(default_factory=dict)

    @classmethod
    def of(cls, patterns: Iterable[str]) -> ModelGlobs:
        anywhere: list[str] = []
        by_folder: dict[str, list[str]] = {}
        for pattern in patterns:
            folder, sep, glob = pattern.partition(":")
            if sep and folder and "/" not in folder and not is_glob(folder):
                by_folder.setdefault(folder, []).append(glob)
            else:
                anywhere.append(pattern)
        return cls(GlobSet.of(anywhere), {f: GlobSet.of(g) for f, g in by_folder.items()})

    def matches(self, name: str, folders: tuple[str, ...]) -> bool:
        """Whether a pattern for any of ``folders`` (or for every folder) matches."""
        if self.anywhere.matches(name):
            return True
        return any(f in self.by_folder and self.by_folder[f].matches(name) for f in folders)

    @property
    def empty(self) -> bool:
        return not self.anywhere.patterns and not self.by_folder

    def matches_in_any_folder(self, name: str) -> bool:
        return self.anywhere.matches(name) or any(g.matches(name) for g in self.by_folder.values())

    @property
    def patterns(self) -> tuple[str, ...]:
        folder_patterns = (f"{f}:{p}" for f, g in self.by_folder.items() for p in g.patterns)
        return (*self.anywhere.patterns, *folder_patterns)


# -- one role ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphLimits:
    """Graph limits of a role (the loader fills unset ones from ``[policy]`` settings)."""

    max_nodes: int
    max_body_bytes: int
    max_string_length: int


@dataclass(frozen=True, slots=True)
class NodeRules:
    """What applies to one node type under one role (computed once per type, then cached)."""

    allowed: bool
    bounds: tuple[Bound, ...]
    """Numeric rules that apply to this node type (the most specific per signature)."""
    bounds_by_input: Mapping[str, tuple[Bound, ...]]
    """The same rules indexed by their first input: the checker's one pass over a node's
    inputs meets each rule once, and only at an input it is about."""
    length_caps: Mapping[str, tuple[Bound, ...]]
    """``len(...)`` rules by input: they replace the default string cap for that input."""


_NODE_CACHE_LIMIT = 4096
"""Node types remembered per role; a client can send any class_type, so the cache is bounded."""


@dataclass(frozen=True, slots=True)
class RoleRules:
    """One role's compiled rules, base policy and ``extends`` merged in."""

    name: str
    unrestricted: bool
    nodes_allow: GlobSet
    nodes_deny: GlobSet
    models_allow: ModelGlobs
    models_deny: ModelGlobs
    bounds: tuple[tuple[str, tuple[Bound, ...]], ...]
    """``(node-type pattern, rules)`` in declaration order."""
    limits: GraphLimits
    allows_every_model: bool = field(init=False, compare=False)
    """No model filtering needed (unrestricted, or ``*`` allowed and nothing denied)."""
    _nodes: dict[str, NodeRules] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        every = self.unrestricted or (
            self.models_allow.anywhere.matches_everything and self.models_deny.empty
        )
        object.__setattr__(self, "allows_every_model", every)  # frozen: computed once here

    def allows_node(self, class_type: str) -> bool:
        """Allowed by an allow pattern and by no deny pattern (deny wins)."""
        if self.unrestricted:
            return True
        return self.nodes_allow.matches(class_type) and not self.nodes_deny.matches(class_type)

    def allows_model(self, name: str, folders: tuple[str, ...]) -> bool:
        """``folders``: where the name is read from; ``()`` when unknown, in which case only
        folder-independent allow patterns count and *every* deny pattern does."""
        if self.unrestricted:
            return True
        name = normalise_model_name(name)
        if folders:
            if self.models_deny.matches(name, folders):
                return False
        elif self.models_deny.matches_in_any_folder(name):
            return False
        return self.models_allow.matches(name, folders)

    def node(self, class_type: str) -> NodeRules:
        """The rules for one node type (cached)."""
        cached = self._nodes.get(class_type)
        if cached is not None:
            return cached
        rules = self._compute_node(class_type)
        if len(self._nodes) < _NODE_CACHE_LIMIT:
            self._nodes[class_type] = rules
        return rules

    def _compute_node(self, class_type: str) -> NodeRules:
        # Per signature (the inputs a rule is about), keep the rules of the most specific
        # matching pattern: "KSamplerAdvanced": ["steps <= 100"] overrides "*": ["steps <= 60"].
        best: dict[tuple[bool, frozenset[str]], tuple[tuple[int, int], list[Bound]]] = {}
        for pattern, rules in self.bounds:
            if not _pattern_matches(pattern, class_type):
                continue
            rank = specificity(pattern)
            for rule in rules:
                current = best.get(rule.signature)
                if current is None or rank > current[0]:
                    best[rule.signature] = (rank, [rule])
                elif rank == current[0]:
                    current[1].append(rule)
        numeric: list[Bound] = []
        length_caps: dict[str, list[Bound]] = {}
        for _, chosen in best.values():
            for rule in chosen:
                if rule.length:
                    for name in rule.inputs:
                        length_caps.setdefault(name, []).append(rule)
                else:
                    numeric.append(rule)
        by_input: dict[str, list[Bound]] = {}
        for rule in numeric:
            by_input.setdefault(rule.inputs[0], []).append(rule)
        return NodeRules(
            allowed=self.allows_node(class_type),
            bounds=tuple(numeric),
            bounds_by_input={k: tuple(v) for k, v in by_input.items()},
            length_caps={k: tuple(v) for k, v in length_caps.items()},
        )


def _pattern_matches(pattern: str, class_type: str) -> bool:
    if not is_glob(pattern):
        return pattern == class_type
    return fnmatch.fnmatchcase(class_type, pattern)


# -- a principal -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """The effective policy of a principal: its roles' rules combined (see module doc)."""

    key: str
    """Stable name of this combination (sorted role names joined by ``+``)."""
    members: tuple[RoleRules, ...]
    unrestricted: bool = False
    """True for a role that may run anything (admin): checks and filters are skipped."""
    version: int = 0
    """The policy version this was built from (incremented by every reload)."""

    def allows_node(self, class_type: str) -> bool:
        return self.unrestricted or any(m.allows_node(class_type) for m in self.members)

    def allows_model(self, value: str, folder: str | None = None) -> bool:
        """Whether a model file may be used. ``folder``: the ComfyUI model folder
        (``checkpoints``, ``loras``...) when known (``/models/{folder}``); None when judged
        without one, where only folder-independent allow patterns count."""
        folders = (folder,) if folder else ()
        return self.unrestricted or any(m.allows_model(value, folders) for m in self.members)

    @property
    def allows_every_model(self) -> bool:
        """No model filtering needed (catalog fast path)."""
        return self.unrestricted or any(m.allows_every_model for m in self.members)

    @property
    def max_nodes(self) -> int:
        return max((m.limits.max_nodes for m in self.members), default=0)

    @property
    def max_body_bytes(self) -> int:
        return max((m.limits.max_body_bytes for m in self.members), default=0)


__all__ = [
    "MODEL_EXTENSIONS",
    "MODEL_INPUT_FOLDERS",
    "MODEL_INPUT_NAMES",
    "GlobSet",
    "GraphLimits",
    "ModelGlobs",
    "NodeRules",
    "RolePolicy",
    "RoleRules",
    "is_model_input",
    "model_folders",
    "normalise_model_name",
]
