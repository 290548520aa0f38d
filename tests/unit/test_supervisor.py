"""The local supervisor: a dead process is reaped and started again, with backoff while it keeps dying."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.mesh.local import LocalMesh, MeshOptions, Proc
from services.mesh.procs import redis_args
from services.mesh.supervisor import Supervisor
from services.runtime import tls


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Mesh(LocalMesh):
    """A mesh whose processes are short Python children; respawning records the restart."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(MeshOptions(state_dir=tmp))
        self.respawned: list[str] = []

    def add(self, name: str, code: str) -> Proc:
        popen = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        self.procs[name] = Proc(name, popen, self.options.state_dir / f"{name}.log")
        return self.procs[name]

    def respawn(self, old: Proc) -> Proc:
        self.respawned.append(old.name)
        return self.add(old.name, "import sys; sys.exit(3)")


def test_a_dead_process_restarts_after_a_backoff_that_doubles_while_it_keeps_dying(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    mesh.add("steady", "import time; time.sleep(60)")
    mesh.add("flaky", "import sys; sys.exit(3)").popen.wait()
    clock, said = Clock(), []
    supervisor = Supervisor(mesh, said.append, clock=clock)

    def tick(at: float) -> None:
        clock.now = at
        for p in mesh.procs.values():
            if p.name == "flaky":
                p.popen.wait()
        supervisor.check()

    tick(0.0)
    assert mesh.respawned == [] and "flaky exited with code 3; restarting in 1s" in said[0]
    tick(1.0)
    assert mesh.respawned == ["flaky"]
    tick(1.1)  # dead again at once: the next start waits 2 s
    tick(2.9)
    assert mesh.respawned == ["flaky"]
    tick(3.1)
    assert mesh.respawned == ["flaky", "flaky"]
    assert all("steady" not in line for line in said)
    mesh.procs["steady"].popen.kill()


def test_a_process_that_stayed_up_restarts_after_the_shortest_backoff_again(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    mesh.add("svc", "import sys; sys.exit(1)").popen.wait()
    clock, said = Clock(), []
    supervisor = Supervisor(mesh, said.append, clock=clock)
    for at in (0.0, 1.0, 1.0, 3.0):
        clock.now = at
        mesh.procs["svc"].popen.wait()
        supervisor.check()
    assert mesh.respawned == ["svc", "svc"]
    clock.now = 100.0  # up for longer than stable_seconds before this death
    mesh.procs["svc"].popen.wait()
    supervisor.check()
    assert said[-1].endswith(f"restarting in 1s (log: {tmp_path / 'svc.log'})")


def test_reaping_kills_what_a_dead_process_left_in_its_group(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from services.mesh.local import reap

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
        ],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    members: list[int] = []
    while len(members) < 2 and time.monotonic() < deadline:
        members = [int(e) for e in os.listdir("/proc") if e.isdigit() and _pgid(int(e)) == parent.pid]
        time.sleep(0.05)
    assert len(members) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    reap(Proc("p", parent, tmp_path / "p.log"))
    time.sleep(0.2)
    assert [m for m in members if _pgid(m) == parent.pid and _state(m) != "Z"] == []


def _pgid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except OSError:
        return -1


def _state(pid: int) -> Any:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_redis_reads_its_certificate_by_absolute_path_whatever_folder_it_moves_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    files = tls.Files.of(Path("var/run/tls/redis"))  # relative, as `meshserve up` names its state folder
    args = redis_args("127.0.0.1", 6390, Path("var/run/redis"), files)
    given = {args[i]: args[i + 1] for i in range(1, len(args) - 1, 2)}
    for option in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert Path(given[option]).is_absolute() and given[option].startswith(str(tmp_path)), option
    assert given["--port"] == "0" and given["--tls-port"] == "6390"
