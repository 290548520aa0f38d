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


def children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.add(int(entry))
    return out


def test_up_serves_then_ctrl_c_stops_everything(tmp_path: Path, model_dir: Path) -> None:
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
    spawned = children_of(proc.pid)
    assert len(spawned) == 7  # redis, auth, ratelimit, billing, inference, router, envoy
    proc.send_signal(signal.SIGINT)
    # An impatient second signal (Ctrl-C again, or a supervisor's SIGTERM) must not cut the stop short.
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    alive = [
        pid
        for pid in spawned
        if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    assert alive == []
