"""Configuration: every problem reported at once, each naming its key and the rule it breaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import SettingsError
from proxy.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.upstream.urls == ("http://127.0.0.1:8188",)
    assert settings.server.port == 8190
    assert settings.redis.url == ""


def test_example_config_is_valid_and_matches_defaults() -> None:
    example = Path(__file__).parents[2] / "config" / "comfygate.example.toml"
    assert load_settings(example, environ={}) == load_settings(None, environ={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\nbase_path = "comfy"', "server.base_path: must start with '/'"),
        ("[server]\nport = 70000", "server.port: Input should be less than or equal to 65535"),
        (
            '[upstream]\nurls = ["ftp://x"]',
            "upstream.urls: [0] 'ftp://x': scheme must be http or https, with a host",
        ),
        ("[upstream]\nurls = []", "upstream.urls: at least one upstream URL is required"),
        ("[upstream]\nbogus = 1", "upstream.bogus: unknown key"),
        ('[redis]\nurl = "http://x"', "redis.url: scheme must be redis://, rediss:// or unix://"),
        (
            '[logging]\nformat = "xml"',
            "logging.format: Input should be 'auto', 'json' or 'console'",
        ),
        ('[server]\ntrusted_proxies = ["10.0.0.0/33"]', "server.trusted_proxies.0"),
    ],
)
def test_invalid_config_names_key_and_rule(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, toml), environ={})
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_all_problems_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nbase_path = "x"\nport = 0\n[upstream]\nurls = ["ftp://x"]')
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ={})
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("invalid configuration:\n  ")


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"')
    settings = load_settings(
        path,
        environ={
            "COMFYGATE_SERVER__PORT": "9100",
            "COMFYGATE_UPSTREAM__URLS": '["http://gpu1:8188", "http://gpu2:8188"]',
        },
    )
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"  # the rest of the file's section survives
    assert settings.upstream.urls == ("http://gpu1:8188", "http://gpu2:8188")


def test_overrides_beat_env() -> None:
    settings = load_settings(
        None, overrides={"server": {"port": 1234}}, environ={"COMFYGATE_SERVER__PORT": "9100"}
    )
    assert settings.server.port == 1234


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@127.0.0.1:6379/0\n")
    path = write(tmp_path, f'[redis]\nurl_file = "{secret}"')
    assert load_settings(path, environ={}).redis.url == "redis://:s3cret@127.0.0.1:6379/0"


def test_unreadable_secret_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[redis]\nurl_file = "{tmp_path / "missing"}"')
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ={})
    assert "redis.url_file: cannot read" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file"):
        load_settings(write(tmp_path, "[server\nport ="), environ={})


# -- [redis]: one of url / sentinels / cluster_nodes, and TLS options -------------------------


@pytest.mark.parametrize(
    ("section", "mode"),
    [
        ({}, "none"),
        ({"url": "unix:///run/redis.sock?db=2"}, "standalone"),
        ({"sentinels": ["10.0.0.1:26379", "[::1]:26380"], "sentinel_master": "m"}, "sentinel"),
        ({"cluster_nodes": ["10.0.0.1:7000"]}, "cluster"),
    ],
)
def test_redis_mode(section: dict[str, object], mode: str) -> None:
    assert load_settings(None, overrides={"redis": section}, environ={}).redis.mode == mode


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'url = "redis://a"\ncluster_nodes = ["b:7000"]',
            "redis: set only one of url, sentinels, cluster_nodes",
        ),
        ('sentinels = ["a:26379"]', "redis: sentinels and sentinel_master go together"),
        ('sentinel_master = "m"', "redis: sentinels and sentinel_master go together"),
        ('cluster_nodes = ["a"]', "redis.cluster_nodes: [0] 'a': must be host:port"),
        ('sentinels = ["::1:26379"]', "redis.sentinels: [0] '::1:26379': must be host:port"),
        ('cluster_nodes = ["a:0"]', "redis.cluster_nodes: [0] 'a:0': must be host:port"),
        ('cluster_nodes = ["a:7000"]\ndb = 1', "redis: db: a Redis Cluster only has database 0"),
        ('url = "redis://a"\ntls_verify = "none"', "redis: tls_* settings need a rediss:// url"),
        ('url = "redis://a"\ntls = true', "redis: tls: with url, use a rediss:// url instead"),
        ('cluster_nodes = ["a:7000"]\ntls_verify = "none"', "redis: tls_* settings need"),
        ('url = "rediss://a"\ntls_ca_certs = "/nonexistent/ca.pem"', "redis.tls_ca_certs: "),
        ("socket_timeout_seconds = 0", "redis.socket_timeout_seconds: Input should be greater"),
    ],
)
def test_invalid_redis_settings(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, f"[redis]\n{toml}"), environ={})
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_redis_tls_files_and_key_needs_cert(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        None,
        overrides={"redis": {"cluster_nodes": ["a:7000"], "tls": True, "tls_ca_certs": str(ca)}},
        environ={},
    )
    assert settings.redis.uses_tls
    with pytest.raises(SettingsError, match="tls_keyfile needs tls_certfile"):
        load_settings(
            None,
            overrides={"redis": {"url": "rediss://a", "tls_keyfile": str(ca)}},
            environ={},
        )


def test_redis_passwords_are_redacted_and_may_come_from_files(tmp_path: Path) -> None:
    from proxy.settings import redacted  # noqa: PLC0415

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    path = write(
        tmp_path,
        f'[redis]\nsentinels = ["a:26379"]\nsentinel_master = "m"\npassword_file = "{secret}"\n'
        'sentinel_password = "s2"',
    )
    settings = load_settings(path, environ={})
    assert settings.redis.password == "s3cret"
    shown = redacted(settings)["redis"]
    assert shown["password"] == shown["sentinel_password"] == "<redacted>"
