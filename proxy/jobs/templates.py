"""Job templates: an API-format workflow and a typed parameter schema, one TOML file each.

A file ``<dir>/<name>.toml`` (the name is its stem: ``[A-Za-z0-9_-]``) holds::

    description = "Text to image (SD 1.5)"
    roles = ["user", "power"]          # who may run it (admins always may)
    cache = { scope = "user", ttl_seconds = 3600 }   # optional result cache (user | shared)
    webhook = { url = "https://hooks.example.com/comfy" }  # optional: notified at each end

    [params.prompt]
    type = "string"                    # string | integer | number | boolean | image
    required = true                    # or a default
    max_length = 2000                  # strings; minimum/maximum for numbers; enum for any
    targets = ["6.text"]               # node id "." input name, one or more
    description = "What to draw"

    [workflow."6"]                     # the API-format workflow (what POST /prompt takes)
    class_type = "CLIPTextEncode"
    inputs = { text = "", clip = ["4", 1] }

Loading checks every file and lists every problem at once (like the policy files); a bad set
keeps the one in force on reload. Filling a template checks every parameter and reports every
problem at once (``invalid_params``, each naming the parameter and the rule). The filled
workflow is then an ordinary prompt: the workflow policy, isolation and the rest judge it
exactly as they judge ``POST /prompt`` (an ``image`` parameter is a file name the caller's
isolation scope must be able to read; the template grants nothing).
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from proxy.errors import ProxyError, SettingsError
from proxy.principal import Principal
from proxy.settings.auth import RoleSettings

ParamType = Literal["string", "integer", "number", "boolean", "image"]
PARAM_TYPES: Final[frozenset[str]] = frozenset({"string", "integer", "number", "boolean", "image"})
CacheScope = Literal["user", "shared"]
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_TEMPLATE_KEYS: Final = frozenset(
    {"description", "roles", "cache", "params", "workflow", "webhook"}
)
_PARAM_KEYS: Final = frozenset(
    {
        "type",
        "required",
        "default",
        "minimum",
        "maximum",
        "enum",
        "max_length",
        "min_length",
        "targets",
        "description",
    }
)
_CACHE_KEYS: Final = frozenset({"scope", "ttl_seconds"})
MAX_STRING: Final = 100_000
"""Longest string a parameter may declare (the workflow policy bounds strings per role too)."""


class TemplateError(SettingsError):
    """The template files are invalid; ``problems`` holds one ``file: key: rule`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.args = ("invalid job templates:\n  " + "\n  ".join(problems),)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class ParamProblem:
    param: str
    rule: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"param": self.param, "rule": self.rule, "message": self.message}


class InvalidParams(ProxyError):
    """Parameters that do not fit the template's schema: all of them, at once (422)."""

    status = 422
    error_type = "invalid_params"

    def __init__(self, problems: list[ParamProblem]) -> None:
        super().__init__(
            "; ".join(f"{p.param}: {p.message}" for p in problems),
            extra={"problems": [p.as_json() for p in problems]},
        )
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: ParamType
    targets: tuple[tuple[str, str], ...]
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[Any, ...] | None = None
    min_length: int | None = None
    max_length: int | None = None
    description: str = ""

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "string" if self.type == "image" else self.type,
        }
        if self.type == "image":
            schema["description"] = "a file name the caller uploaded (POST /upload/image)"
        if self.description:
            schema["description"] = self.description
        if self.default is not None:
            schema["default"] = self.default
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.min_length is not None:
            schema["minLength"] = self.min_length
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        return schema

    def check(self, value: Any) -> tuple[Any, ParamProblem | None]:
        """The value as the workflow gets it, or the rule it breaks."""

        def problem(rule: str, message: str) -> tuple[Any, ParamProblem]:
            return None, ParamProblem(self.name, rule, message)

        if self.type in ("string", "image"):
            if not isinstance(value, str):
                return problem("type", f"must be a string, not {_json_type(value)}")
            if self.min_length is not None and len(value) < self.min_length:
                return problem("minLength", f"must have at least {self.min_length} characters")
            if self.max_length is not None and len(value) > self.max_length:
                return problem("maxLength", f"must have at most {self.max_length} characters")
        elif self.type == "boolean":
            if not isinstance(value, bool):
                return problem("type", f"must be a boolean, not {_json_type(value)}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return problem("type", f"must be a {self.type}, not {_json_type(value)}")
            if self.type == "integer":
                if isinstance(value, float):
                    if not value.is_integer():
                        return problem("type", "must be an integer")
                    value = int(value)
            elif not math.isfinite(value):
                return problem("type", "must be a finite number")
            if self.minimum is not None and value < self.minimum:
                return problem("minimum", f"must be >= {_num(self.minimum)}")
            if self.maximum is not None and value > self.maximum:
                return problem("maximum", f"must be <= {_num(self.maximum)}")
        if self.enum is not None and value not in self.enum:
            return problem("enum", f"must be one of {json.dumps(list(self.enum))}")
        return value, None


@dataclass(frozen=True, slots=True)
class CacheSpec:
    scope: CacheScope
    ttl_seconds: float


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    workflow: Mapping[str, Any]
    params: Mapping[str, Param]
    roles: frozenset[str]
    description: str = ""
    cache: CacheSpec | None = None
    source: str = ""
    webhook: str = ""
    """Notified when a job of this template ends, unless the job names its own (the URL is
    checked against ``jobs.webhooks`` at each submit: the allowlist may change)."""

    def allowed(self, principal: Principal, roles: Mapping[str, RoleSettings]) -> bool:
        return principal.is_admin(roles) or bool(self.roles & principal.roles)

    def params_schema(self) -> dict[str, Any]:
        """The parameters as a JSON Schema (draft 2020-12) object."""
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {p.name: p.json_schema() for p in self.params.values()},
            "required": sorted(p.name for p in self.params.values() if p.required),
            "additionalProperties": False,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "cache": None
            if self.cache is None
            else {"scope": self.cache.scope, "ttl_seconds": self.cache.ttl_seconds},
        }

    def render(self, given: Any) -> dict[str, Any]:
        """The workflow filled with ``given`` (defaults for the rest).

        Raises:
            InvalidParams: every problem at once.
        """
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise InvalidParams([ParamProblem("params", "type", "must be an object")])
        problems: list[ParamProblem] = [
            ParamProblem(name, "additionalProperties", "is not a parameter of this template")
            for name in given
            if name not in self.params
        ]
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in given:
                if param.required:
                    problems.append(ParamProblem(name, "required", "is required"))
                elif param.default is not None:
                    values[name] = param.default
                continue
            value, problem = param.check(given[name])
            if problem is not None:
                problems.append(problem)
            else:
                values[name] = value
        if problems:
            raise InvalidParams(problems)
        workflow = copy.deepcopy(dict(self.workflow))
        for name, value in values.items():
            for node_id, input_name in self.params[name].targets:
                workflow[node_id]["inputs"][input_name] = value
        return workflow


@dataclass(frozen=True, slots=True)
class TemplateSet:
    templates: Mapping[str, Template] = field(default_factory=dict)
    sources: tuple[str, ...] = ()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def load_templates(directory: str) -> TemplateSet:
    """Read and check every ``*.toml`` of ``directory`` (none configured: an empty set).

    Raises:
        TemplateError: every problem of every file at once.
    """
    if not directory:
        return TemplateSet()
    root = Path(directory)
    if not root.is_dir():
        raise TemplateError([f"{directory}: not a directory"])
    problems: list[str] = []
    templates: dict[str, Template] = {}
    sources: list[str] = []
    for path in sorted(root.glob("*.toml")):
        sources.append(str(path))
        name = path.stem
        if not NAME_RE.fullmatch(name):
            problems.append(f"{path}: the file name must be [A-Za-z0-9_-] (up to 64)")
            continue
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: not valid TOML: {exc}")
            continue
        template = _read_template(str(path), name, document, problems)
        if template is not None:
            templates[name] = template
    if problems:
        raise TemplateError(problems)
    return TemplateSet(templates, tuple(sources))


def _read_template(
    source: str, name: str, doc: dict[str, Any], problems: list[str]
) -> Template | None:
    before = len(problems)

    def bad(key: str, rule: str) -> None:
        problems.append(f"{source}: {key}: {rule}")

    for key in doc:
        if key not in _TEMPLATE_KEYS:
            bad(key, f"unknown key (known: {', '.join(sorted(_TEMPLATE_KEYS))})")
    workflow = doc.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        bad("workflow", "required: the API-format workflow (a table of nodes)")
        workflow = {}
    for node_id, node in workflow.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs", {}), dict)
        ):
            bad(f"workflow.{node_id}", "a node needs class_type (string) and inputs (table)")
        else:
            node.setdefault("inputs", {})
    roles = doc.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        bad("roles", "must be a list of role names")
        roles = []
    description = doc.get("description", "")
    if not isinstance(description, str):
        bad("description", "must be a string")
        description = ""
    cache = _read_cache(doc.get("cache"), bad)
    webhook = doc.get("webhook", {})
    if (
        not isinstance(webhook, dict)
        or set(webhook) - {"url"}
        or not isinstance(webhook.get("url", ""), str)
    ):
        bad("webhook", "must be a table: { url = 'https://...' }")
        webhook = {}
    params: dict[str, Param] = {}
    raw_params = doc.get("params", {})
    if not isinstance(raw_params, dict):
        bad("params", "must be a table of parameters")
        raw_params = {}
    for pname, spec in raw_params.items():
        param = _read_param(f"params.{pname}", pname, spec, workflow, bad)
        if param is not None:
            params[pname] = param
    if len(problems) > before:
        return None
    return Template(
        name=name,
        workflow=workflow,
        params=params,
        roles=frozenset(roles),
        description=description,
        cache=cache,
        source=source,
        webhook=str(webhook.get("url", "")),
    )


def _read_cache(raw: Any, bad: Any) -> CacheSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        bad("cache", "must be a table: { scope = 'user' | 'shared', ttl_seconds = N }")
        return None
    for key in raw:
        if key not in _CACHE_KEYS:
            bad(f"cache.{key}", "unknown key (known: scope, ttl_seconds)")
    scope = raw.get("scope", "user")
    if scope not in ("user", "shared"):
        bad("cache.scope", "must be 'user' or 'shared'")
        return None
    ttl = raw.get("ttl_seconds", 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        bad("cache.ttl_seconds", "must be a number > 0")
        return None
    return CacheSpec(scope, float(ttl))


def _read_param(key: str, name: str, spec: Any, workflow: dict[str, Any], bad: Any) -> Param | None:
    if not NAME_RE.fullmatch(name):
        bad(key, "a parameter name must be [A-Za-z0-9_-]")
        return None
    if not isinstance(spec, dict):
        bad(key, "must be a table")
        return None
    ok = True
    for k in spec:
        if k not in _PARAM_KEYS:
            bad(f"{key}.{k}", f"unknown key (known: {', '.join(sorted(_PARAM_KEYS))})")
            ok = False
    ptype = spec.get("type")
    if ptype not in PARAM_TYPES:
        bad(f"{key}.type", f"must be one of {', '.join(sorted(PARAM_TYPES))}")
        return None
    targets: list[tuple[str, str]] = []
    raw_targets = spec.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        bad(f"{key}.targets", "required: a list of 'node_id.input_name'")
        ok = False
        raw_targets = []
    for target in raw_targets:
        node_id, dot, input_name = str(target).rpartition(".")
        node = workflow.get(node_id)
        if not isinstance(target, str) or not dot or not node_id or not input_name:
            bad(f"{key}.targets", f"{target!r} is not 'node_id.input_name'")
            ok = False
        elif not isinstance(node, dict):
            bad(f"{key}.targets", f"{target!r}: the workflow has no node {node_id!r}")
            ok = False
        else:
            targets.append((node_id, input_name))
    numbers: dict[str, float | None] = {}
    for bound in ("minimum", "maximum"):
        value = spec.get(bound)
        if value is not None and (
            ptype not in ("integer", "number")
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            bad(f"{key}.{bound}", "only for integer/number parameters, and a number")
            ok = False
            value = None
        numbers[bound] = value
    lengths: dict[str, int | None] = {}
    for bound in ("min_length", "max_length"):
        value = spec.get(bound)
        if value is not None and (
            ptype not in ("string", "image")
            or isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 <= value <= MAX_STRING
        ):
            bad(f"{key}.{bound}", f"only for string parameters, an integer 0..{MAX_STRING}")
            ok = False
            value = None
        lengths[bound] = value
    enum = spec.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        bad(f"{key}.enum", "must be a non-empty list")
        ok = False
        enum = None
    required = spec.get("required", False)
    if not isinstance(required, bool):
        bad(f"{key}.required", "must be true or false")
        ok = False
    description = spec.get("description", "")
    if not isinstance(description, str):
        bad(f"{key}.description", "must be a string")
        ok = False
    if not ok:
        return None
    param = Param(
        name=name,
        type=ptype,
        targets=tuple(targets),
        required=required,
        minimum=numbers["minimum"],
        maximum=numbers["maximum"],
        enum=tuple(enum) if enum is not None else None,
        min_length=lengths["min_length"],
        max_length=lengths["max_length"],
        description=description,
    )
    if enum is not None:
        for item in enum:
            if param.check(item)[1] is not None:
                bad(f"{key}.enum", f"{item!r} does not fit the parameter's own type and bounds")
                return None
    default = spec.get("default")
    if default is not None:
        default, problem = param.check(default)
        if problem is not None:
            bad(f"{key}.default", f"does not fit the parameter: {problem.message}")
            return None
    elif not required:
        bad(key, "needs a default or required = true")
        return None
    return Param(
        name=param.name,
        type=param.type,
        targets=param.targets,
        required=param.required,
        default=default,
        minimum=param.minimum,
        maximum=param.maximum,
        enum=param.enum,
        min_length=param.min_length,
        max_length=param.max_length,
        description=param.description,
    )


class TemplateStore:
    """The templates in force, swapped whole on reload (as :class:`proxy.policy.store`)."""

    def __init__(self, directory: str) -> None:
        """Raises: TemplateError (a bad set fails the start)."""
        self.directory = directory
        self._current = load_templates(directory)
        self._reloading = threading.Lock()
        self.version = 1

    def get(self, name: str) -> Template | None:
        return self._current.templates.get(name)

    def all(self) -> list[Template]:
        return [self._current.templates[n] for n in sorted(self._current.templates)]

    @property
    def sources(self) -> tuple[str, ...]:
        return self._current.sources

    def reload(self) -> int:
        """Blocking (reads files). Raises TemplateError; the set in force is then unchanged."""
        with self._reloading:
            loaded = load_templates(self.directory)
            self._current = loaded  # one assignment: a request sees the old or the new set
            self.version += 1
            return self.version


__all__ = [
    "CacheSpec",
    "InvalidParams",
    "Param",
    "ParamProblem",
    "Template",
    "TemplateError",
    "TemplateSet",
    "TemplateStore",
    "load_templates",
]
