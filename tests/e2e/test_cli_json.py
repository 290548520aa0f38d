"""The operator CLI against a running mesh as against a cluster's: only the edge's address and the admin key,
and `--json` output a script can parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.mesh.local import LocalMesh
from tests.conftest import MODEL
from tests.e2e.helpers import create_key, openai_client
from tests.e2e.test_billing import ledger_line

pytestmark = pytest.mark.mesh
QUESTION = [{"role": "user", "content": "Say hi."}]


def meshserve(mesh: LocalMesh, *args: str) -> Any:
    """Runs the CLI from an empty folder (no local state to find), pointed at the edge; its JSON output."""
    edge = mesh.edge_url.removeprefix("http://")
    env = {**os.environ, "MESHSERVE_EDGE": edge, "MESHSERVE_ADMIN_KEY": mesh.admin_key}
    cli = str(Path(sys.executable).parent / "meshserve")
    done = subprocess.run(
        [cli, *args, "--json"], capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_keys_create_and_list_as_json_through_the_edge(mesh: LocalMesh) -> None:
    created = meshserve(mesh, "keys", "create", "--tenant", "cli-json", "--label", "scripted")
    assert created["secret"].startswith("msk-") and created["key"]["tenant"] == "cli-json"
    listed = meshserve(mesh, "keys", "list", "--tenant", "cli-json")
    assert [k["key_id"] for k in listed["keys"]] == [created["key"]["key_id"]]
    assert "secret" not in listed["keys"][0] and listed["keys"][0]["label"] == "scripted"
    revoked = meshserve(mesh, "keys", "revoke", created["key"]["key_id"])
    assert "revoked_at" in revoked["key"]


def test_usage_as_json_through_the_edge_with_the_admin_key(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "cli-usage")
    reply = openai_client(mesh, secret).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    ledger_line(mesh, key.key_id, 1)  # billing has counted it
    usage = meshserve(mesh, "usage", "--tenant", "cli-usage", "--hours", "1")
    [line] = usage["lines"]
    assert (line["tenant"], line["key_id"], line["model"]) == ("cli-usage", key.key_id, MODEL)
    assert int(line["prompt_tokens"]) == reply.usage.prompt_tokens
    assert int(line["completion_tokens"]) == reply.usage.completion_tokens
    assert usage["currency"]


def test_top_once_as_json(mesh: LocalMesh) -> None:
    openai_client(mesh).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    cli = [str(Path(sys.executable).parent / "meshserve"), "top", "--once", "--json", "--interval", "1"]
    done = subprocess.run(
        [*cli, "--state", str(mesh.options.state_dir)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["services"]["router"] is True and summary["services"]["inference"] is True
    assert MODEL in {m["model"] for m in summary["models"]}
    assert {r["model"] for r in summary["replicas"]} >= {MODEL}
