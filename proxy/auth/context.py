"""The authentication resources of one app, built once Redis and the upstream pool exist: the
authenticator, the login page and the ComfyUI user directory (a ``cleanup_ctx``). Above the
modules it wires, so none of them imports another one for its construction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy.auth.authenticator import (
    AUTH,
    BOOTSTRAP_TOKEN,
    Authenticator,
    bootstrap_token,
    build_revocations,
    jwt_settings_for_run,
    session_secret,
)
from proxy.auth.comfy_users import COMFY_USERS, ComfyUserDirectory
from proxy.auth.forward_auth import ForwardAuth
from proxy.auth.guard import cookie_secure
from proxy.auth.login import LOGIN_PAGE, LoginPage
from proxy.auth.oidc import OIDC_LOGIN, build_oidc_login
from proxy.auth.sessions import SessionCodec
from proxy.auth.throttle import LoginThrottle
from proxy.auth.tokens import build_verifier
from proxy.auth.users import UsersFile, UsersFileError
from proxy.errors import SettingsError
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS
from proxy.upstream.pool import POOL


async def authenticator_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: build the authenticator once Redis and the upstream pool exist."""
    settings = app[SETTINGS]
    revocations = build_revocations(app)
    jwt_settings, bootstrap = jwt_settings_for_run(settings.auth)
    verifier = build_verifier(
        # Its own client session: the pool's is tuned for upstream traffic (no decompression).
        jwt_settings,
        settings.roles,
        session=None,
        revocations=revocations,
    )
    users = None
    if settings.auth.login.users_file:  # before anything opens (check-config reports it too)
        users = UsersFile(Path(settings.auth.login.users_file))
        try:
            users.load()
        except UsersFileError as exc:
            raise SettingsError([f"auth.login.users_file: {exc}"]) from None
    if bootstrap:
        # Printed by serve() once the listener is open (a failed start prints no token).
        app[BOOTSTRAP_TOKEN] = bootstrap_token(jwt_settings, settings.roles) or ""
    await verifier.start()
    secret = session_secret(settings.auth)
    # SSO (docs/sso.md): OpenID providers on the login page, a trusted auth proxy's identity.
    oidc = build_oidc_login(
        settings.auth.oidc,
        settings.roles,
        base_path=settings.server.base_path,
        secret=secret,
        client=app[REDIS],
    )
    forward = None
    if settings.auth.forward_auth.enabled:
        forward = ForwardAuth(settings.auth.forward_auth, settings.roles)
    providers = frozenset(settings.auth.oidc.providers)
    auth = app[AUTH] = Authenticator(
        settings=settings.auth,
        roles=settings.roles,
        verifier=verifier,
        sessions=SessionCodec(settings.auth.session, secret),
        revocations=revocations,
        users=users,
        forward=forward,
        oidc_providers=providers,
    )
    app[LOGIN_PAGE] = LoginPage(
        base_path=settings.server.base_path,
        settings=settings.auth,
        roles=settings.roles,
        sessions=auth.sessions,
        verifier=verifier,
        revocations=revocations,
        throttle=LoginThrottle(
            settings.auth.login.max_failures,
            settings.auth.login.failure_window_seconds,
            app[REDIS],
        ),
        users=users,
        cookie_secure=cookie_secure,
        sso=oidc,
        oidc_providers=providers,
    )
    app[COMFY_USERS] = ComfyUserDirectory(app[POOL], app[REDIS])
    if oidc is not None:
        app[OIDC_LOGIN] = oidc
        await oidc.start()
    if forward is not None:
        await forward.start()
    yield
    if forward is not None:
        await forward.close()
    if oidc is not None:
        await oidc.close()
    await verifier.close()
