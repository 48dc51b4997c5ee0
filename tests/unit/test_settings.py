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
