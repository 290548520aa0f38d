"""API keys at the edge: the OpenAI SDK and native gRPC clients through Envoy's ext_authz and the auth service."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import openai
import pytest
import redis

from meshserve.auth.v1 import auth_pb2
from meshserve.llm.v1 import llm_pb2
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, bearer, edge_stub, openai_client

pytestmark = pytest.mark.mesh
SECRETS: list[str] = []


def create_key(mesh: LocalMesh, **kw: object) -> tuple[auth_pb2.Key, str]:
    channel, stub, admin = mesh.admin_stub()
    with channel:
        reply = stub.CreateKey(auth_pb2.CreateKeyRequest(tenant="acme", **kw), metadata=admin, timeout=10)  # type: ignore[arg-type]
    SECRETS.append(reply.secret)
    return reply.key, reply.secret


def works(mesh: LocalMesh, secret: str) -> bool:
    try:
        openai_client(mesh, secret).models.list()
        return True
    except openai.AuthenticationError:
        return False


def test_no_key_or_a_wrong_key_is_an_authentication_error(mesh: LocalMesh) -> None:
    with pytest.raises(openai.AuthenticationError) as missing:
        openai_client(mesh).chat.completions.create(
            model=MODEL, messages=QUESTION, extra_headers={"Authorization": openai.Omit()}
        )
    assert "missing Authorization header" in missing.value.message
    assert missing.value.body["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai_client(mesh, "msk-" + "x" * 43).chat.completions.create(model=MODEL, messages=QUESTION)
    with pytest.raises(openai.AuthenticationError, match="malformed"):
        openai_client(mesh, "sk-not-ours").models.list()


def test_a_revoked_key_stops_working_within_a_second(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, label="to revoke")
    assert works(mesh, secret)
    channel, stub, admin = mesh.admin_stub()
    with channel:
        stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=key.key_id), metadata=admin, timeout=10)
    revoked_at = time.monotonic()
    while works(mesh, secret):
        assert time.monotonic() - revoked_at < 1.0, "revocation took more than a second"
        time.sleep(0.02)


def test_rotation_keeps_both_secrets_during_the_grace_period_then_only_the_new(mesh: LocalMesh) -> None:
    key, old = create_key(mesh, label="to rotate")
    channel, stub, admin = mesh.admin_stub()
    with channel:
        reply = stub.RotateKey(
            auth_pb2.RotateKeyRequest(key_id=key.key_id, grace_seconds=2), metadata=admin, timeout=10
        )
    SECRETS.append(reply.secret)
    assert reply.secret != old and reply.key.key_id == key.key_id
    assert works(mesh, old) and works(mesh, reply.secret)
    time.sleep(max(0.0, reply.old_secret_expires_at.ToNanoseconds() / 1e9 - time.time()) + 0.1)
    assert not works(mesh, old)
    assert works(mesh, reply.secret)


def test_a_key_limited_to_other_models_is_denied_and_sees_only_its_models(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, allowed_models=["some-other-model"])
    client = openai_client(mesh, secret)
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, stream=True))
    assert [m.id for m in client.models.list().data] == []
    _, allowed = create_key(mesh, allowed_models=[MODEL])
    assert [m.id for m in openai_client(mesh, allowed).models.list().data] == [MODEL]


def test_native_grpc_gets_the_same_denials(mesh: LocalMesh) -> None:
    _, limited = create_key(mesh, allowed_models=["some-other-model"])
    request = llm_pb2.CreateChatCompletionRequest(
        params=llm_pb2.ChatCompletionParams(model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    )
    channel, stub = edge_stub(mesh)
    with channel:
        with pytest.raises(grpc.RpcError) as none:
            stub.CreateChatCompletion(request, timeout=10)
        assert none.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.CreateChatCompletion(request, timeout=10, metadata=bearer("msk-" + "y" * 43))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as denied:
            stub.CreateChatCompletion(request, timeout=10, metadata=bearer(limited))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_admin_calls_need_an_admin_key(mesh: LocalMesh) -> None:
    channel, stub, _ = mesh.admin_stub()
    with channel:
        with pytest.raises(grpc.RpcError) as ordinary:
            stub.ListKeys(auth_pb2.ListKeysRequest(), metadata=bearer(mesh.user_key), timeout=10)
        assert ordinary.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.ListKeys(auth_pb2.ListKeysRequest(), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_listed_keys_never_carry_secrets(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, label="listed")
    channel, stub, admin = mesh.admin_stub()
    with channel:
        listed = stub.ListKeys(auth_pb2.ListKeysRequest(tenant="acme"), metadata=admin, timeout=10)
    assert key.key_id in [k.key_id for k in listed.keys]
    assert secret not in listed.SerializeToString().decode(errors="replace")
    assert all(len(k.secret_prefix) <= 8 for k in listed.keys)


def test_redis_holds_no_plaintext_secret_and_logs_show_none(mesh: LocalMesh) -> None:
    create_key(mesh, label="scanned")
    secrets = [*SECRETS, mesh.user_key, mesh.admin_key]
    client = redis.Redis.from_url(mesh.redis_url, **mesh.redis_options())
    dump = b""
    for name in client.scan_iter("*"):
        # Every kind of value: auth's own keys, and the hashes and sets rate limits and billing keep beside them.
        read = {
            b"string": client.get,
            b"hash": client.hgetall,
            b"set": client.smembers,
            b"zset": lambda n: client.zrange(n, 0, -1, withscores=True),
            b"list": lambda n: client.lrange(n, 0, -1),
        }[client.type(name)]
        dump += name + b"=" + repr(read(name)).encode() + b"\n"
    assert b"msk:key:" in dump
    for secret in secrets:
        assert secret.encode() not in dump
        assert secret[4:].encode() not in dump
    logs = "".join(Path(p.log).read_text(errors="replace") for p in mesh.procs.values())
    for secret in secrets:
        assert secret not in logs


def test_an_auth_restart_keeps_every_key_working(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, label="survives restart")
    mesh.restart("auth")
    assert works(mesh, secret) and works(mesh, mesh.user_key)


def test_the_keys_cli_creates_lists_rotates_and_revokes(mesh: LocalMesh) -> None:
    import re
    import subprocess
    import sys

    cli = [str(Path(sys.executable).parent / "meshserve"), "keys"]
    where = ["--edge", f"{mesh.edge.host}:{mesh.edge.port}", "--admin-key", mesh.admin_key]

    def run(*args: str) -> str:
        result = subprocess.run([*cli, *args, *where], capture_output=True, text=True, env={"COLUMNS": "200"})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    created = run("create", "--tenant", "cli-tenant", "--model", MODEL, "--label", "from the cli")
    secret = re.search(r"secret \(shown once\): (msk-\S+)", created)
    key_id = re.search(r"(key_[0-9a-f]{16})", created)
    assert secret and key_id
    SECRETS.append(secret.group(1))
    assert [m.id for m in openai_client(mesh, secret.group(1)).models.list().data] == [MODEL]
    listed = run("list", "--tenant", "cli-tenant")
    assert key_id.group(1) in listed and secret.group(1) not in listed
    rotated = run("rotate", key_id.group(1), "--grace", "0s")
    new_secret = re.search(r"new secret \(shown once\): (msk-\S+)", rotated)
    assert new_secret
    SECRETS.append(new_secret.group(1))
    assert works(mesh, new_secret.group(1)) and not works(mesh, secret.group(1))
    run("revoke", key_id.group(1))
    assert not works(mesh, new_secret.group(1))
    denied = subprocess.run(
        [*cli, "list", "--edge", f"{mesh.edge.host}:{mesh.edge.port}", "--admin-key", mesh.user_key],
        capture_output=True,
        text=True,
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
