"""A real OpenID provider for the tests: ``oidc-provider-mock`` (an authlib-based Flask app with
discovery, an authorization page, a token endpoint, a JWKS and RP-initiated logout), served on a
loopback port from a thread.

Its users are predefined (:data:`USERS`): their claims go into the ID tokens it signs. A test can
make the provider misbehave the way a compromised or misconfigured one would: :attr:`tamper`
overrides claims of the ID tokens its token endpoint returns, re-signed with the provider's own
key (a foreign audience, an expired token, another nonce), or ``foreign_key`` signs them with a
key the provider does not publish.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import flask
import jwt
import werkzeug.serving
from cryptography.hazmat.primitives.asymmetric import rsa
from oidc_provider_mock import User, app

HOST = "127.0.0.1"

USERS = (
    User(
        sub="alice-sub",
        claims={
            "email": "alice@example.com",
            "email_verified": True,
            "name": "Alice",
            "groups": ["comfy-users"],
        },
    ),
    User(
        sub="bob-sub",
        claims={"email": "bob@elsewhere.org", "email_verified": True, "groups": ["other-team"]},
    ),
    User(
        sub="root-sub",
        claims={"email": "root@example.com", "email_verified": True, "groups": ["comfy-admins"]},
    ),
)


@dataclass
class MockProvider:
    """The running provider; :attr:`issuer` is what comfygate is configured with."""

    issuer: str
    tamper: dict[str, Any] = field(default_factory=dict)
    """Claims to override in the next ID tokens (None removes the claim)."""
    foreign_key: bool = False
    """Sign the next ID tokens with a key the provider does not publish."""
    tokens_issued: int = 0
    """ID tokens the token endpoint handed out (after any tampering)."""


def _tamper(provider: MockProvider, response: flask.Response) -> flask.Response:
    if flask.request.path != "/oauth2/token" or response.status_code != 200:
        return response
    provider.tokens_issued += 1
    if not provider.tamper and not provider.foreign_key:
        return response
    body = json.loads(response.get_data())
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    for name, value in provider.tamper.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    storage = flask.g.oidc_provider_mock_storage
    jwk = storage.jwk.as_dict(is_private=True)
    key: Any = jwt.PyJWK(jwk).key
    if provider.foreign_key:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body["id_token"] = jwt.encode(claims, key, algorithm="RS256", headers={"kid": jwk["kid"]})
    response.set_data(json.dumps(body))
    return response


@contextmanager
def running_provider() -> Iterator[MockProvider]:
    """Start the provider on a free loopback port; stopped when the block ends."""
    flask_app = app(require_nonce=True, user_claims=USERS)
    server = werkzeug.serving.make_server(HOST, 0, flask_app, threaded=True)
    provider = MockProvider(issuer=f"http://{HOST}:{server.server_port}")
    flask_app.after_request(lambda response: _tamper(provider, response))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


__all__ = ["HOST", "USERS", "MockProvider", "running_provider"]
