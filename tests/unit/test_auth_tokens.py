"""Bearer-token verification: every refusal with its exact reason, role mapping, the verified-token
cache, and a round trip through every algorithm family (keys generated here with cryptography).

Time is an injected clock; no test sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from proxy.auth.keys import (
    JwksKeys,
    KeySource,
    PrivateKey,
    StaticKeys,
    VerificationKey,
    key_fits,
    load_public_key,
)
from proxy.auth.revocation import MemoryRevocationList
from proxy.auth.tokens import (
    MAX_TOKEN_LENGTH,
    REASONS,
    InvalidToken,
    NoKnownRole,
    TokenVerifier,
    build_verifier,
    check_signature,
    issue_token,
)
from proxy.errors import SettingsError
from proxy.principal import Principal
from proxy.settings.auth import ALGORITHMS, DEFAULT_ROLES, JwtSettings, RoleSettings
from tests.redis_server import free_port

NOW = 1_700_000_000.0
SECRET = "unit-test-secret-0123456789abcdef0123456789abcdef"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789abcdef0"
ISSUER = "https://idp.example"
AUDIENCE = "comfygate"


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pem_public(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pem_private(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_key_for(algorithm: str) -> PrivateKey:
    if algorithm.startswith(("RS", "PS")):
        return RSA_KEY
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "ES512":
        return ec.generate_private_key(ec.SECP521R1())
    assert algorithm == "EdDSA"
    return ed25519.Ed25519PrivateKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for the default settings; a change to None removes the claim."""
    base: dict[str, Any] = {
        "sub": "alice",
        "roles": ["user"],
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": "jti-alice-1",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: Mapping[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(dict(payload), secret, algorithm="HS256", headers=headers or None)


def rs(payload: Mapping[str, Any], key: PrivateKey = RSA_KEY, **headers: Any) -> str:
    return jwt.encode(dict(payload), key, algorithm="RS256", headers=headers or None)


def hand_signed_hs256(payload: Any, secret: bytes, header: Mapping[str, Any] | None = None) -> str:
    """An HS256 token built by hand: PyJWT refuses a PEM as an HMAC key, or a bad header."""
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", **(header or {})}).encode())
        + "."
        + b64(json.dumps(payload).encode())
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def jwt_settings(**changes: Any) -> JwtSettings:
    values: dict[str, Any] = {
        "algorithms": ("HS256",),
        "secret": SECRET,
        "issuer": ISSUER,
        "audience": (AUDIENCE,),
        "leeway_seconds": 30.0,
        "max_lifetime_seconds": 3600.0,
    }
    values.update(changes)
    return JwtSettings(**values)


RS_SETTINGS = {"algorithms": ("RS256",), "secret": "", "public_keys": (pem_public(RSA_KEY),)}


@dataclass
class CountingCheck:
    """The signature-check seam, counting calls (no mock library)."""

    calls: int = 0
    algorithms: list[str] = field(default_factory=list)

    def __call__(self, token: str, key: VerificationKey, algorithm: str) -> dict[str, Any]:
        self.calls += 1
        self.algorithms.append(algorithm)
        return check_signature(token, key, algorithm)


@dataclass
class Harness:
    verifier: TokenVerifier
    clock: Clock
    revocations: MemoryRevocationList
    check: CountingCheck


def make_verifier(
    settings: JwtSettings | None = None,
    *,
    roles: Mapping[str, RoleSettings] = DEFAULT_ROLES,
    keys: KeySource | None = None,
) -> Harness:
    settings = settings or jwt_settings()
    clock = Clock()
    revocations = MemoryRevocationList(clock=clock)
    if keys is None:
        keys = StaticKeys(
            secret=settings.secret.encode(),
            public_keys=[load_public_key(p) for p in settings.public_keys],
        )
    check = CountingCheck()
    verifier = TokenVerifier(
        settings, roles, keys=keys, revocations=revocations, clock=clock, check_signature=check
    )
    return Harness(verifier, clock, revocations, check)


# --- the table of refused tokens ------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    token: Callable[[], str]
    reason: str
    settings: Mapping[str, Any] = field(default_factory=dict)


def _alg_none() -> str:
    return jwt.encode(claims(), "", algorithm="none")


def _rs_to_hs_confusion() -> str:
    # The attacker knows the public key (it is public) and uses its PEM as an HMAC secret.
    return hand_signed_hs256(claims(), pem_public(RSA_KEY).encode())


def _tampered(token: str) -> str:
    """The payload swapped for another subject, the original signature kept."""
    header, _, signature = token.split(".")
    return ".".join([header, b64(json.dumps(claims(sub="root")).encode()), signature])


BAD_TOKENS = [
    Bad("expired", lambda: hs(claims(exp=int(NOW) - 31)), "token_expired"),
    Bad("expired-no-leeway", lambda: hs(claims(exp=int(NOW))), "token_expired",
        {"leeway_seconds": 0}),
    Bad("not-yet-valid-nbf", lambda: hs(claims(nbf=int(NOW) + 31)), "token_not_yet_valid"),
    Bad("issued-in-future", lambda: hs(claims(iat=int(NOW) + 60, exp=int(NOW) + 600)),
        "token_not_yet_valid"),
    Bad("wrong-issuer", lambda: hs(claims(iss="https://evil.example")), "token_wrong_issuer"),
    Bad("missing-issuer", lambda: hs(claims(iss=None)), "token_missing_claim"),
    Bad("wrong-audience", lambda: hs(claims(aud="someone-else")), "token_wrong_audience"),
    Bad("wrong-audience-list", lambda: hs(claims(aud=["a", "b"])), "token_wrong_audience"),
    Bad("missing-audience", lambda: hs(claims(aud=None)), "token_missing_claim"),
    Bad("missing-exp", lambda: hs(claims(exp=None)), "token_missing_claim"),
    Bad("wrong-secret", lambda: hs(claims(), secret=OTHER_SECRET), "token_bad_signature"),
    Bad("wrong-rsa-key", lambda: rs(claims(), key=OTHER_RSA_KEY), "token_bad_signature",
        RS_SETTINGS),
    Bad("tampered-payload", lambda: _tampered(hs(claims())), "token_bad_signature"),
    Bad("alg-none", _alg_none, "token_alg_not_allowed"),
    Bad("alg-none-against-rs", _alg_none, "token_alg_not_allowed", RS_SETTINGS),
    Bad("rs-to-hs-confusion", _rs_to_hs_confusion, "token_alg_not_allowed", RS_SETTINGS),
    Bad("hs384-not-listed", lambda: jwt.encode(claims(), SECRET, algorithm="HS384"),
        "token_alg_not_allowed"),
    Bad("malformed-garbage", lambda: "not-a-jwt", "token_malformed"),
    Bad("malformed-two-segments", lambda: "e30.e30", "token_malformed"),
    Bad("malformed-empty", lambda: "", "token_malformed"),
    Bad("malformed-header", lambda: b64(b"{not json") + ".e30.sig", "token_malformed"),
    Bad("malformed-deep-json", lambda: b64(b"[" * 5000) + ".e30.sig", "token_malformed"),
    Bad("malformed-payload-list", lambda: hand_signed_hs256([], SECRET.encode()),
        "token_malformed"),
    Bad("malformed-too-long", lambda: "a" * (MAX_TOKEN_LENGTH + 1), "token_malformed"),
    Bad("malformed-kid", lambda: hand_signed_hs256(claims(), SECRET.encode(), {"kid": 42}),
        "token_malformed"),
    Bad("malformed-exp", lambda: hs(claims(exp="tomorrow")), "token_malformed"),
    Bad("malformed-exp-nan", lambda: hs(claims(exp=float("nan"))), "token_malformed"),
    Bad("malformed-exp-bool", lambda: hs(claims(exp=True)), "token_malformed"),
    Bad("malformed-jti", lambda: hs(claims(jti=7)), "token_malformed"),
    Bad("session-cookie-as-bearer", lambda: hs(claims(typ="comfygate-session")),
        "token_malformed"),
    Bad("missing-subject", lambda: hs(claims(sub=None)), "token_missing_subject"),
    Bad("empty-subject", lambda: hs(claims(sub="")), "token_missing_subject"),
    Bad("non-string-subject", lambda: hs(claims(sub=12345)), "token_missing_subject"),
    Bad("lifetime-above-max", lambda: hs(claims(iat=int(NOW), exp=int(NOW) + 3601)),
        "token_lifetime_too_long"),
    Bad("lifetime-above-max-no-iat", lambda: hs(claims(iat=None, exp=int(NOW) + 3700)),
        "token_lifetime_too_long"),
    Bad("no-key-for-curve",
        lambda: jwt.encode(claims(), ec.generate_private_key(ec.SECP384R1()), algorithm="ES384"),
        "token_unknown_key",
        {"algorithms": ("ES256", "ES384"), "secret": "",
         "public_keys": (pem_public(ec.generate_private_key(ec.SECP256R1())),)}),
]  # fmt: skip


def test_table_covers_every_reason_but_revoked_and_jwks() -> None:
    """The remaining two (revoked, unknown kid with the JWKS down) need state: tests below."""
    assert {b.reason for b in BAD_TOKENS} | {"token_revoked"} == REASONS


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=lambda b: b.id)
async def test_bad_token_is_refused_with_its_reason(bad: Bad) -> None:
    h = make_verifier(jwt_settings(**bad.settings))
    with pytest.raises(InvalidToken) as caught:
        await h.verifier.verify(bad.token())
    assert caught.value.reason == bad.reason
    assert caught.value.reason in REASONS
    assert caught.value.message


async def test_revoked_token_is_refused() -> None:
    h = make_verifier()
    await h.revocations.revoke("jti-alice-1", until=NOW + 600)
    with pytest.raises(InvalidToken) as caught:
        await h.verifier.verify(hs(claims()))
    assert caught.value.reason == "token_revoked"


async def test_unknown_kid_with_jwks_down_is_unknown_key() -> None:
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        jwks = JwksKeys(f"http://127.0.0.1:{free_port()}/jwks", session=session, clock=clock)
        await jwks.start()  # the endpoint is down: logged, not raised
        h = make_verifier(jwt_settings(algorithms=("RS256",), secret=""), keys=jwks)
        with pytest.raises(InvalidToken) as caught:
            await h.verifier.verify(rs(claims(), kid="kid-1"))
    assert caught.value.reason == "token_unknown_key"
    assert h.check.calls == 0


async def test_refused_before_signature_never_reaches_the_revocation_list() -> None:
    """An unauthenticated caller must not be able to make the proxy query Redis."""

    class Exploding(MemoryRevocationList):
        async def is_revoked(self, token_id: str) -> bool:
            raise AssertionError("revocation list consulted for an unverified token")

    h = make_verifier()
    h.verifier.revocations = Exploding()
    with pytest.raises(InvalidToken, match="signature"):
        await h.verifier.verify(hs(claims(), secret=OTHER_SECRET))


def test_key_family_never_lets_a_public_key_be_an_hmac_secret() -> None:
    public = RSA_KEY.public_key()
    assert not key_fits("HS256", public)
    assert key_fits("HS256", b"secret")
    assert not key_fits("RS256", b"secret")
    assert key_fits("PS512", public)
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert key_fits("ES256", p256)
    assert not key_fits("ES384", p256)
    assert not key_fits("EdDSA", p256)
    assert key_fits("EdDSA", ed448.Ed448PrivateKey.generate().public_key())


async def test_static_keys_offer_only_the_family_of_the_algorithm() -> None:
    keys = StaticKeys(secret=b"s" * 32, public_keys=[RSA_KEY.public_key()])
    assert await keys.candidates("HS256", None) == (b"s" * 32,)
    assert await keys.candidates("RS256", "any-kid") == (RSA_KEY.public_key(),)
    assert await keys.candidates("ES256", None) == ()


async def test_time_checks_follow_the_injected_clock_and_leeway() -> None:
    h = make_verifier(jwt_settings(cache_size=0))
    token = hs(claims(exp=int(NOW) + 100, nbf=int(NOW) + 20))
    assert (await h.verifier.verify(token)).expires_at == NOW + 100  # nbf within the leeway
    h.clock.now = NOW + 129
    await h.verifier.verify(token)  # past exp, within the leeway
    h.clock.now = NOW + 130
    with pytest.raises(InvalidToken, match="expired"):
        await h.verifier.verify(token)


async def test_optional_checks_are_off_when_not_configured() -> None:
    settings = jwt_settings(issuer="", audience=(), require_exp=False, max_lifetime_seconds=0)
    h = make_verifier(settings)
    principal = await h.verifier.verify(hs({"sub": "bob", "roles": "user"}))
    assert principal == Principal("bob", frozenset({"user"}), "bearer", None, None)


async def test_audience_list_with_one_accepted_value_passes() -> None:
    h = make_verifier(jwt_settings(audience=("other", AUDIENCE)))
    principal = await h.verifier.verify(hs(claims(aud=["x", AUDIENCE])))
    assert principal.subject == "alice"


async def test_principal_carries_jti_exp_and_source() -> None:
    h = make_verifier()
    principal = await h.verifier.verify(hs(claims()), source="query")
    assert principal == Principal(
        subject="alice",
        roles=frozenset({"user"}),
        source="query",
        token_id="jti-alice-1",
        expires_at=NOW + 600,
    )


async def test_subject_from_a_configured_claim() -> None:
    h = make_verifier(jwt_settings(subject_claim="preferred_username"))
    principal = await h.verifier.verify(hs(claims(preferred_username="carol")))
    assert principal.subject == "carol"
    with pytest.raises(InvalidToken) as caught:
        await h.verifier.verify(hs(claims(jti="other")))  # has sub, not preferred_username
    assert caught.value.reason == "token_missing_subject"


# --- roles ----------------------------------------------------------------------------------


async def test_keycloak_realm_access_roles_with_role_map() -> None:
    settings = jwt_settings(
        roles_claim="realm_access.roles", role_map={"comfy-admins": "admin", "artists": "user"}
    )
    h = make_verifier(settings)
    token = hs(
        claims(
            roles=None,
            realm_access={"roles": ["offline_access", "uma_authorization", "comfy-admins"]},
        )
    )
    assert (await h.verifier.verify(token)).roles == {"admin"}


async def test_string_roles_space_or_comma_separated() -> None:
    h = make_verifier()
    principal = await h.verifier.verify(hs(claims(roles="viewer, user  unknown,,admin")))
    assert principal.roles == {"viewer", "user", "admin"}


async def test_role_map_renames_and_configured_names_are_kept() -> None:
    h = make_verifier(jwt_settings(role_map={"ops": "admin", "user": "viewer"}))
    principal = await h.verifier.verify(hs(claims(roles=["ops", "user", "viewer", "nobody"])))
    # "user" is mapped (the map wins over the same-named role); unknown "nobody" is dropped.
    assert principal.roles == {"admin", "viewer"}


async def test_namespaced_claim_with_dots_in_its_name() -> None:
    h = make_verifier(jwt_settings(roles_claim="https://example.com/roles"))
    principal = await h.verifier.verify(
        hs(claims(roles=None, **{"https://example.com/roles": ["admin"]}))
    )
    assert principal.roles == {"admin"}


@pytest.mark.parametrize(
    "roles_value",
    [None, [], ["nobody"], "", 42, {"admin": True}, [1, None, {"x": 1}]],
    ids=["missing", "empty-list", "unknown", "empty-string", "number", "object", "non-strings"],
)
async def test_no_known_role_falls_back_to_default_role(roles_value: Any) -> None:
    h = make_verifier(jwt_settings(default_role="viewer"))
    principal = await h.verifier.verify(hs(claims(roles=roles_value)))
    assert principal.roles == {"viewer"}


async def test_no_known_role_without_default_is_its_own_exception() -> None:
    h = make_verifier()
    with pytest.raises(NoKnownRole) as caught:
        await h.verifier.verify(hs(claims(roles=["nobody"])))
    assert caught.value.reason == "no_role"
    assert caught.value.subject == "alice"
    assert not isinstance(caught.value, InvalidToken)


async def test_custom_roles_from_config() -> None:
    roles = {"render": RoleSettings(), "ops": RoleSettings(admin=True)}
    h = make_verifier(jwt_settings(role_map={"g-render": "render"}), roles=roles)
    principal = await h.verifier.verify(hs(claims(roles=["g-render", "ops", "admin"])))
    assert principal.roles == {"render", "ops"}  # "admin" is not a role in this config


# --- the verified-token cache ---------------------------------------------------------------


async def test_second_verify_skips_the_signature_check() -> None:
    h = make_verifier()
    token = hs(claims())
    first = await h.verifier.verify(token)
    second = await h.verifier.verify(token)
    assert first == second
    assert h.check.calls == 1


async def test_cache_hit_keeps_the_callers_source() -> None:
    h = make_verifier()
    token = hs(claims())
    await h.verifier.verify(token, source="bearer")
    assert (await h.verifier.verify(token, source="query")).source == "query"
    assert h.check.calls == 1


async def test_revocation_is_checked_on_a_cache_hit() -> None:
    h = make_verifier()
    token = hs(claims())
    await h.verifier.verify(token)
    await h.revocations.revoke("jti-alice-1", until=NOW + 600)
    with pytest.raises(InvalidToken) as caught:
        await h.verifier.verify(token)
    assert caught.value.reason == "token_revoked"
    assert h.check.calls == 1


async def test_cached_entry_ends_at_the_tokens_exp() -> None:
    h = make_verifier(jwt_settings(leeway_seconds=0))
    token = hs(claims(exp=int(NOW) + 60))
    await h.verifier.verify(token)
    h.clock.now = NOW + 59
    await h.verifier.verify(token)
    assert h.check.calls == 1
    h.clock.now = NOW + 60
    with pytest.raises(InvalidToken, match="expired"):
        await h.verifier.verify(token)
    assert h.check.calls == 2


async def test_cache_is_bounded() -> None:
    h = make_verifier(jwt_settings(cache_size=2))
    a, b, c = (hs(claims(jti=f"j{i}")) for i in range(3))
    for token in (a, b, c):  # c evicts a (least recently used)
        await h.verifier.verify(token)
    assert h.check.calls == 3
    await h.verifier.verify(c)
    await h.verifier.verify(b)
    assert h.check.calls == 3
    await h.verifier.verify(a)
    assert h.check.calls == 4


async def test_cache_off_and_failures_not_cached() -> None:
    h = make_verifier(jwt_settings(cache_size=0))
    token = hs(claims())
    await h.verifier.verify(token)
    await h.verifier.verify(token)
    assert h.check.calls == 2

    h = make_verifier()
    no_role = hs(claims(roles=["nobody"]))
    for _ in range(2):
        with pytest.raises(NoKnownRole):
            await h.verifier.verify(no_role)
    assert h.check.calls == 2


# --- every algorithm, issued and verified ---------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
async def test_round_trip_every_algorithm(algorithm: str) -> None:
    if algorithm.startswith("HS"):
        settings = jwt_settings(algorithms=(algorithm,), secret=SECRET + SECRET)
    else:
        key = private_key_for(algorithm)
        settings = jwt_settings(
            algorithms=(algorithm,),
            secret="",
            public_keys=(pem_public(key),),
            private_key=pem_private(key),
        )
    token, jti = issue_token(
        settings, subject="dave", roles=["user", "admin"], ttl_seconds=600, clock=lambda: NOW
    )
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    h = make_verifier(settings)
    principal = await h.verifier.verify(token)
    assert principal.subject == "dave"
    assert principal.roles == {"user", "admin"}
    assert principal.token_id == jti
    assert h.check.algorithms == [algorithm]


async def test_ed448_and_keys_from_files(tmp_path: Path) -> None:
    key = ed448.Ed448PrivateKey.generate()
    (tmp_path / "pub.pem").write_text(pem_public(key))
    (tmp_path / "key.pem").write_text(pem_private(key))
    settings = jwt_settings(
        algorithms=("EdDSA",),
        secret="",
        public_keys=(str(tmp_path / "pub.pem"),),
        private_key=str(tmp_path / "key.pem"),
    )
    token, _ = issue_token(settings, subject="erin", roles=["user"], ttl_seconds=60, clock=Clock())
    verifier = build_verifier(
        settings, DEFAULT_ROLES, session=None, revocations=MemoryRevocationList()
    )
    verifier._clock = Clock()  # build_verifier takes no clock; pin it for the test
    assert (await verifier.verify(token)).subject == "erin"


async def test_rotation_overlap_tries_every_key_of_the_family() -> None:
    settings = jwt_settings(
        algorithms=("RS256",), secret="",
        public_keys=(pem_public(OTHER_RSA_KEY), pem_public(RSA_KEY)),
    )  # fmt: skip
    h = make_verifier(settings)
    assert (await h.verifier.verify(rs(claims()))).subject == "alice"
    assert h.check.calls == 2


# --- issue_token ----------------------------------------------------------------------------


def test_issue_token_sets_the_standard_claims() -> None:
    settings = jwt_settings()
    token, jti = issue_token(
        settings, subject="frank", roles=["viewer"], ttl_seconds=300.9, clock=lambda: NOW + 0.7,
        extra={"name": "Frank"},
    )  # fmt: skip
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_signature": True,
                         "verify_exp": False, "verify_iat": False}, audience=AUDIENCE)  # fmt: skip
    assert payload == {
        "sub": "frank",
        "roles": ["viewer"],
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "jti": jti,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "name": "Frank",
    }
    _, other_jti = issue_token(settings, subject="frank", roles=[], ttl_seconds=1)
    assert other_jti != jti
    assert len(jti) >= 16


async def test_issued_token_verifies_under_claim_paths() -> None:
    settings = jwt_settings(subject_claim="preferred_username", roles_claim="realm_access.roles")
    token, _ = issue_token(settings, subject="gina", roles=["admin"], ttl_seconds=60, clock=Clock())
    principal = await make_verifier(settings).verifier.verify(token)
    assert (principal.subject, principal.roles) == ("gina", frozenset({"admin"}))


@pytest.mark.parametrize(
    ("changes", "kwargs", "message"),
    [
        ({}, {"ttl_seconds": 3601}, "max_lifetime"),
        ({}, {"ttl_seconds": 0}, "positive"),
        ({}, {"subject": ""}, "subject"),
        ({}, {"extra": {"sub": "root"}}, "override"),
        ({"secret": ""}, {}, "secret is empty"),
        ({"algorithms": ("RS256",), "secret": ""}, {}, "private_key is empty"),
        (
            {"algorithms": ("ES256",), "secret": "", "private_key": pem_private(RSA_KEY)},
            {},
            "does not fit",
        ),
    ],
    ids=["ttl-above-max", "ttl-zero", "no-subject", "extra-override", "no-secret", "no-private",
         "wrong-family"],
)  # fmt: skip
def test_issue_token_refuses(changes: dict[str, Any], kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"subject": "h", "roles": ["user"], "ttl_seconds": 60}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        issue_token(jwt_settings(**changes), **args)


# --- build_verifier -------------------------------------------------------------------------


async def test_empty_hs_secret_is_random_per_process_and_warned() -> None:
    settings = jwt_settings(secret="")
    with structlog.testing.capture_logs() as logs:
        verifier = build_verifier(settings, DEFAULT_ROLES, session=None,
                                  revocations=MemoryRevocationList())  # fmt: skip
    assert any(e["event"] == "jwt_secret_random" and "auth.jwt.secret" in e["detail"] for e in logs)
    for guess in (b"", SECRET.encode()):
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(hand_signed_hs256(claims(), guess))
        assert caught.value.reason == "token_bad_signature"


def test_asymmetric_without_keys_or_with_bad_pem_is_a_settings_error(tmp_path: Path) -> None:
    revocations = MemoryRevocationList()
    with pytest.raises(SettingsError, match="needs public_keys or jwks_url"):
        build_verifier(jwt_settings(algorithms=("RS256",), secret=""), DEFAULT_ROLES,
                       session=None, revocations=revocations)  # fmt: skip
    bad = jwt_settings(
        algorithms=("RS256",), secret="",
        public_keys=("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----",
                     str(tmp_path / "missing.pem")),
    )  # fmt: skip
    with pytest.raises(SettingsError) as caught:
        build_verifier(bad, DEFAULT_ROLES, session=None, revocations=revocations)
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "auth.jwt.public_keys[0]",
        "auth.jwt.public_keys[1]",
    ]


def test_public_key_from_a_certificate() -> None:
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(RSA_KEY, hashes.SHA256())
    )
    loaded = load_public_key(cert.public_bytes(serialization.Encoding.PEM).decode())
    assert loaded == RSA_KEY.public_key()


# --- nothing of a token reaches the logs ----------------------------------------------------


@pytest.fixture
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as logs:
        yield logs


async def test_no_token_part_is_logged(captured_logs: list[MutableMapping[str, Any]]) -> None:
    tokens: Sequence[str] = [t for t in (b.token() for b in BAD_TOKENS) if t] + [hs(claims())]
    messages: list[str] = []
    for settings in (jwt_settings(), jwt_settings(**RS_SETTINGS)):
        h = make_verifier(settings)
        for token in tokens:
            try:
                await h.verifier.verify(token)
            except (InvalidToken, NoKnownRole) as exc:
                messages.append(str(exc))
    rendered = json.dumps(captured_logs, default=str) + "\n".join(messages)
    assert len(messages) > len(BAD_TOKENS)
    for token in tokens:
        for part in token.split("."):
            if len(part) > 8:
                assert part not in rendered


def test_weak_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    settings = jwt_settings(algorithms=("RS256",), secret="", public_keys=(pem_public(weak),))
    with pytest.raises(SettingsError, match="1024 bits"):
        build_verifier(settings, DEFAULT_ROLES, session=None, revocations=MemoryRevocationList())


@pytest.mark.parametrize(
    ("changes", "event"),
    [
        ({"algorithms": ("HS512",), "secret": "x" * 63}, "jwt_secret_short"),
        ({"public_keys": (pem_public(RSA_KEY),)}, "jwt_public_keys_ignored"),
    ],
)
def test_hs_configuration_warnings(changes: dict[str, Any], event: str) -> None:
    with structlog.testing.capture_logs() as logs:
        build_verifier(
            jwt_settings(**changes), DEFAULT_ROLES, session=None,
            revocations=MemoryRevocationList(),
        )  # fmt: skip
    assert event in [e["event"] for e in logs]
