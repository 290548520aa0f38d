"""`meshserve up`, the README's run command: prints a working edge URL, and Ctrl-C stops every process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.mesh.local import free_port

pytestmark = pytest.mark.mesh
ROOT = Path(__file__).resolve().parents[2]


def _processes() -> dict[int, list[str]]:
    """Every process's /proc stat fields after the command name (state, ppid, pgid, ...), by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return out


def children_of(pid: int) -> set[int]:
    return {p for p, stat in _processes().items() if int(stat[1]) == pid}


def group_members(pgid: int) -> set[int]:
    return {p for p, stat in _processes().items() if int(stat[2]) == pgid}


def alive(pid: int) -> bool:
    stat = _processes().get(pid)
    return stat is not None and stat[0] != "Z"


def test_up_serves_restarts_a_killed_engine_then_ctrl_c_stops_everything(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    cli = Path(sys.executable).parent / "meshserve"
    proc = subprocess.Popen(
        [str(cli), "up", "--port", str(port), "--store", str(model_dir.parent), "--state", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    printed = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(printed)
        printed.append(line)
        if "Ctrl-C stops everything" in line:
            break
    text = "".join(printed)
    assert f"http://127.0.0.1:{port}" in text
    curl = re.search(r"curl -s (\S+/v1/chat/completions)", text)
    key = re.search(r"export MESHSERVE_API_KEY=(msk-\S+)", text)
    assert curl is not None and key is not None and "from openai import OpenAI" in text
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    reply = httpx.post(
        curl.group(1),
        headers={"authorization": f"Bearer {key.group(1)}"},
        json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    # The embedding model is served beside the chat model by default, and listed with it.
    auth = {"authorization": f"Bearer {key.group(1)}"}
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=10).json()
    assert {m["id"] for m in models["data"]} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    vectors = httpx.post(
        f"http://127.0.0.1:{port}/v1/embeddings",
        headers=auth,
        json={"model": "all-minilm-l6-v2", "input": "Hi"},
        timeout=60,
    )
    assert vectors.status_code == 200 and len(vectors.json()["data"][0]["embedding"]) == 384
    spawned = children_of(proc.pid)
    assert len(spawned) == 8  # redis, auth, ratelimit, billing, inference, embed, router, envoy

    # kill -9 of the chat model's inference server: the supervisor reaps its engine processes and starts it again.
    inference = next(
        p for p in spawned if "MESHSERVE_INFERENCE_MODEL=smollm2" in Path(f"/proc/{p}/environ").read_text()
    )
    engine_group = group_members(inference)
    assert len(engine_group) > 1  # the server and vLLM's engine core
    os.kill(inference, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "the mesh did not come back after the engine was killed"
        try:
            again = httpx.post(
                curl.group(1),
                headers={"authorization": f"Bearer {key.group(1)}"},
                json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]},
                timeout=30,
            )
            if again.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert [p for p in engine_group if alive(p)] == []  # no engine process of the killed server is left
    spawned = children_of(proc.pid)
    assert len(spawned) == 8 and inference not in spawned
    proc.send_signal(signal.SIGINT)
    # An impatient second signal (Ctrl-C again, or a supervisor's SIGTERM) must not cut the stop short.
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    assert [pid for pid in spawned if alive(pid)] == []
    rest = proc.stdout.read()
    assert "inference exited with code -9; restarting" in rest and "inference restarted" in rest, rest
