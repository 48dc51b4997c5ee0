"""Everything startup would refuse, checked before anything starts: one path for
``comfygate check-config`` and ``comfygate serve``.

``load_settings`` validates what the TOML and the environment say. Some problems only show
when the files the configuration names are read, or when a component is built: the users file,
the workflow policy files, the JWT keys, Redis' TLS files, the login templates. Those used to be
found while the app was starting (a traceback, clients left open); :func:`preflight` finds them
all at once, so that ``check-config`` reports exactly what ``serve`` would refuse, and ``serve``
refuses before it opens anything (exit status 2, the list of problems, no traceback).

Warnings are what startup only logs (a per-process random secret, a short HMAC key...):
``check-config`` prints them, ``serve`` leaves them to the components that log them.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio.connection import parse_url

from proxy.auth.keys import load_private_key
from proxy.auth.tokens import MIN_SECRET_BYTES, key_problems
from proxy.auth.users import UsersFile, UsersFileError
from proxy.errors import SettingsError
from proxy.settings import Settings
from proxy.settings.auth import SYMMETRIC

LOGIN_TEMPLATE = "login.html"


@dataclass
class Report:
    """What :func:`preflight` found: refusals, grouped by the error that names them, and
    warnings (one line each)."""

    problems: list[str] = field(default_factory=list)
    """``key: rule`` lines of the configuration proper."""
    policy: SettingsError | None = None
    """The workflow policy files' own report (``file: key: rule`` lines)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.policy is None

    def errors(self) -> list[SettingsError]:
        """The refusals as they are printed, each block with its heading."""
        out: list[SettingsError] = []
        if self.problems:
            out.append(SettingsError(self.problems))
        if self.policy is not None:
            out.append(self.policy)
        return out

    def message(self) -> str:
        """Every refusal, one block per kind (a policy-only failure reads as the policy's)."""
        return "\n".join(str(e) for e in self.errors())


class PreflightError(SettingsError):
    """:func:`check_startup` found problems; ``str()`` is :meth:`Report.message`."""

    def __init__(self, report: Report) -> None:
        problems = list(report.problems)
        if report.policy is not None:
            problems.extend(report.policy.problems)
        super().__init__(problems)
        self.report = report
        self.args = (report.message(),)

    def __str__(self) -> str:
        return str(self.args[0])


def preflight(settings: Settings) -> Report:
    """Check every file and component the configuration names, as startup would build them."""
    report = Report()
    _users_file(settings, report)
    _jwt(settings, report)
    _session(settings, report)
    _redis(settings, report)
    _templates(settings, report)
    _policy(settings, report)
    _unstable(settings, report)
    return report


def check_startup(settings: Settings) -> Report:
    """:func:`preflight`, raising when anything would stop the proxy from starting.

    Raises:
        PreflightError: every problem at once (exit status 2 for the CLI).
    """
    report = preflight(settings)
    if not report.ok:
        raise PreflightError(report)
    return report


# -- the checks ------------------------------------------------------------------------------


def _users_file(settings: Settings, report: Report) -> None:
    path = settings.auth.login.users_file
    if not path or not settings.auth.enabled:
        return
    users = UsersFile(Path(path))
    try:
        users.load()
    except UsersFileError as exc:
        hint = ""
        if not Path(path).exists():
            hint = (
                f" (create it with `comfygate user add NAME --role admin --users-file {path}`, "
                "or run `comfygate init`)"
            )
        report.problems.append(f"auth.login.users_file: {exc}{hint}")
        return
    for record in users.list():
        unknown = sorted(set(record.roles) - set(settings.roles))
        if unknown:
            report.warnings.append(
                f"auth.login.users_file: user {record.name!r} has roles {unknown} that are not "
                f"configured (effective roles: {sorted(settings.roles)}); they are ignored"
            )


def _jwt(settings: Settings, report: Report) -> None:
    if not settings.auth.enabled:
        return
    jwt = settings.auth.jwt
    if jwt.algorithms[0] in SYMMETRIC:
        min_bytes = max(MIN_SECRET_BYTES[a] for a in jwt.algorithms)
        if not jwt.secret:
            report.warnings.append(
                "auth.jwt.secret: not set: API tokens are signed with a random per-process "
                "secret and `comfygate token create` cannot issue any (run `comfygate init`, or "
                "set auth.jwt.secret_file or COMFYGATE_AUTH__JWT__SECRET)"
            )
        elif len(jwt.secret.encode()) < min_bytes:
            report.warnings.append(
                f"auth.jwt.secret: shorter than {min_bytes} bytes, the minimum for "
                f"{', '.join(jwt.algorithms)} (RFC 7518)"
            )
        if jwt.public_keys or jwt.jwks_url:
            report.warnings.append(
                "auth.jwt: public_keys and jwks_url are ignored with HS* algorithms"
            )
    else:
        report.problems.extend(key_problems(jwt))
    if jwt.private_key:
        try:
            load_private_key(jwt.private_key)
        except (OSError, ValueError) as exc:
            report.problems.append(f"auth.jwt.private_key: {type(exc).__name__}: {exc}")


def _session(settings: Settings, report: Report) -> None:
    if settings.auth.enabled and not settings.auth.session.secret:
        report.warnings.append(
            "auth.session.secret: not set: browser sessions end when the process stops and are "
            "not shared between replicas or workers (run `comfygate init`, or set "
            "auth.session.secret_file or COMFYGATE_AUTH__SESSION__SECRET)"
        )


def _redis(settings: Settings, report: Report) -> None:
    redis = settings.redis
    if redis.url:
        try:
            parse_url(redis.url)
        except ValueError as exc:
            # The message never includes the URL: it may carry a password.
            report.problems.append(f"redis.url: {exc}")
    if not redis.uses_tls or not (redis.tls_ca_certs or redis.tls_certfile):
        return  # the settings already refuse TLS files without TLS, and files that do not exist
    # The contexts redis-py will build at every connection: a bad file fails here instead of
    # on every Redis command at run time.
    try:
        context = ssl.create_default_context(cafile=redis.tls_ca_certs or None)
    except (OSError, ssl.SSLError) as exc:
        report.problems.append(f"redis.tls_ca_certs: not a PEM CA bundle: {exc}")
        return
    if redis.tls_certfile:
        try:
            context.load_cert_chain(redis.tls_certfile, redis.tls_keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            report.problems.append(
                f"redis.tls_certfile: the certificate and its key do not load: {exc}"
            )


def _templates(settings: Settings, report: Report) -> None:
    directory = settings.auth.login.templates_dir
    if not directory:
        return
    path = Path(directory)
    if not path.is_dir():
        report.problems.append(f"auth.login.templates_dir: {directory!r}: not a directory")
    elif not (path / LOGIN_TEMPLATE).is_file():
        report.warnings.append(
            f"auth.login.templates_dir: {directory!r} has no {LOGIN_TEMPLATE}: "
            "the built-in login page is used"
        )


def _policy(settings: Settings, report: Report) -> None:
    # create_app builds the policy store whether or not policy.enabled: a bad file fails
    # startup either way.
    from proxy.policy.loader import PolicyError, load_policy  # noqa: PLC0415 - heavy import

    try:
        load_policy(settings.policy, settings.roles)
    except PolicyError as exc:
        report.policy = exc


def _unstable(settings: Settings, report: Report) -> None:
    if settings.isolation.enabled and not settings.isolation.folder_secret:
        report.warnings.append(
            "isolation.folder_secret: not set: users' folders get a per-process key and change "
            "at every restart (run `comfygate init`, or set isolation.folder_secret_file or "
            "COMFYGATE_ISOLATION__FOLDER_SECRET)"
        )


def format_warnings(warnings: Sequence[str]) -> str:
    return "".join(f"warning: {w}\n" for w in warnings)


__all__ = [
    "PreflightError",
    "Report",
    "check_startup",
    "format_warnings",
    "preflight",
]
