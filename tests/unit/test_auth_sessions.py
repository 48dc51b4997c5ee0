"""Session cookies: signed, typed, idle and absolute expiry, renewal at half-life."""

from __future__ import annotations

import jwt
import pytest

from proxy.auth.sessions import InvalidSession, SessionCodec
from proxy.settings.auth import SessionSettings

SECRET = b"s" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def codec(clock: Clock, **settings: float) -> SessionCodec:
    return SessionCodec(SessionSettings(**settings), SECRET, clock=clock)


def test_round_trip() -> None:
    clock = Clock()
    value, session = codec(clock).issue("alice", ["user", "admin"], source="token")
    back = codec(clock).verify(value)
    assert back == session
    assert back.roles == ("admin", "user")
    assert back.expires_at == clock.now + 8 * 3600


def test_idle_expiry_and_renewal() -> None:
    clock = Clock()
    c = codec(clock, idle_timeout_seconds=100, absolute_timeout_seconds=1000)
    value, session = c.issue("alice", ["user"], source="token")
    clock.now += 40
    assert not c.needs_renewal(session)
    clock.now += 20  # 40 s left of 100: past half-life
    assert c.needs_renewal(session)
    renewed_value, renewed = c.renew(session)
    assert renewed.session_id == session.session_id
    assert renewed.expires_at == clock.now + 100
    clock.now += 90
    assert c.verify(renewed_value).subject == "alice"
    with pytest.raises(InvalidSession) as info:
        c.verify(value)  # the old cookie idled out
    assert info.value.reason == "session_expired"


def test_absolute_expiry_bounds_renewal() -> None:
    clock = Clock()
    c = codec(clock, idle_timeout_seconds=100, absolute_timeout_seconds=150)
    _, session = c.issue("alice", ["user"], source="token")
    clock.now += 90
    value, renewed = c.renew(session)
    assert renewed.expires_at == session.absolute_expires_at
    assert not c.needs_renewal(renewed)  # nothing left to gain
    clock.now += 61
    with pytest.raises(InvalidSession, match="session_expired"):
        c.verify(value)


@pytest.mark.parametrize(
    "forged",
    [
        jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"),  # no typ/sid/aexp
        jwt.encode(
            {
                "typ": "other",
                "sub": "a",
                "roles": [],
                "sid": "s",
                "iat": 1,
                "exp": 2**40,
                "aexp": 2**40,
            },
            SECRET,
            algorithm="HS256",
        ),
        jwt.encode(
            {
                "typ": "comfygate-session",
                "sub": "a",
                "roles": ["admin"],
                "sid": "s",
                "iat": 1,
                "exp": 2**40,
                "aexp": 2**40,
            },
            b"x" * 32,
            algorithm="HS256",
        ),
        "garbage",
    ],
)
def test_forged_or_foreign_cookies(forged: str) -> None:
    with pytest.raises(InvalidSession) as info:
        codec(Clock()).verify(forged)
    assert info.value.reason == "session_invalid"


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SessionCodec(SessionSettings(), b"short")


def test_a_token_session_carries_the_token_and_never_outlives_it() -> None:
    clock = Clock()
    c = codec(clock, idle_timeout_seconds=100, absolute_timeout_seconds=1000)
    value, session = c.issue(
        "alice", ["user"], source="token", token_id="jti-1", not_after=clock.now + 50
    )
    assert session.absolute_expires_at == clock.now + 50
    assert session.expires_at == clock.now + 50
    back = c.verify(value)
    assert (back.source, back.token_id, back.user_generation) == ("token", "jti-1", None)
    _, renewed = c.renew(back)
    assert renewed.token_id == "jti-1"
    clock.now += 50
    with pytest.raises(InvalidSession, match="session_expired"):
        c.verify(value)


def test_a_password_session_carries_the_user_generation() -> None:
    clock = Clock()
    c = codec(clock)
    generation = c.user_generation("alice", "$argon2id$hash", ["user"])
    value, _ = c.issue("alice", ["user"], source="password", user_generation=generation)
    back = c.verify(value)
    assert (back.source, back.token_id, back.user_generation) == ("password", None, generation)
    with pytest.raises(ValueError, match="user_generation"):
        c.issue("alice", ["user"], source="password")
    with pytest.raises(ValueError, match="user_generation"):
        c.issue("alice", ["user"], source="password", user_generation=generation, token_id="j")
    with pytest.raises(ValueError, match="user_generation"):
        c.issue("alice", ["user"], source="token", user_generation=generation)


def test_the_user_generation_follows_every_part_of_the_entry_and_the_key() -> None:
    c = codec(Clock())
    base = c.user_generation("alice", "$argon2id$hash", ["user"])
    assert base == c.user_generation("alice", "$argon2id$hash", ["user"])
    assert base != c.user_generation("alice", "$argon2id$other", ["user"])
    assert base != c.user_generation("alice", "$argon2id$hash", ["admin"])
    assert base != c.user_generation("Alice", "$argon2id$hash", ["user"])
    other_key = SessionCodec(SessionSettings(), b"t" * 32)
    assert base != other_key.user_generation("alice", "$argon2id$hash", ["user"])


@pytest.mark.parametrize(
    "extra",
    [
        {},  # no src: from a release before sessions were tied to their credential
        {"src": "password"},  # a password session without its users-file generation
        {"src": "password", "ugen": "g", "tjti": "j"},
        {"src": "token", "tjti": 5},
        {"src": "token", "ugen": 1},
        {"src": "bearer"},
    ],
)
def test_sessions_without_a_credential_of_their_own_are_refused(extra: dict[str, object]) -> None:
    claims = {
        "typ": "comfygate-session",
        "sub": "a",
        "roles": ["user"],
        "sid": "s",
        "iat": 1,
        "exp": 2**40,
        "aexp": 2**40,
        **extra,
    }
    with pytest.raises(InvalidSession) as info:
        codec(Clock()).verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    assert info.value.reason == "session_invalid"
