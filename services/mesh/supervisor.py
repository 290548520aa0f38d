"""Keeps the local mesh running: a process that dies is reaped (its whole group) and started again with backoff."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.mesh.local import LocalMesh, reap


@dataclass
class _Restarts:
    # Restarts in a row without the process staying up for `stable` seconds.
    count: int = 0
    # When the process was last started, and when it may be started next after dying.
    started: float = 0.0
    due: float | None = None


class Supervisor:
    """Restarts dead processes of a mesh: after 1 s, then doubling up to 30 s while they keep dying."""

    def __init__(
        self,
        mesh: LocalMesh,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        base_seconds: float = 1.0,
        max_seconds: float = 30.0,
        stable_seconds: float = 60.0,
    ) -> None:
        self._mesh = mesh
        self._say = say
        self._clock = clock
        self._base, self._max, self._stable = base_seconds, max_seconds, stable_seconds
        now = clock()
        self._restarts = {name: _Restarts(started=now) for name in mesh.procs}

    def check(self) -> None:
        """Reaps what died since the last check and restarts what is due; call it every fraction of a second."""
        now = self._clock()
        for proc in list(self._mesh.procs.values()):
            if proc.alive():
                continue
            state = self._restarts.setdefault(proc.name, _Restarts(started=now))
            if state.due is None:
                if now - state.started >= self._stable:
                    state.count = 0
                delay = min(self._max, self._base * 2**state.count)
                state.due = now + delay
                self._say(
                    f"{proc.name} exited with code {proc.popen.returncode}; restarting in {delay:g}s (log: {proc.log})"
                )
                # Reap at once: an engine whose server died must not hold its memory through the backoff.
                reap(proc)
            if now >= state.due:
                self._mesh.respawn(proc)
                state.count += 1
                state.started, state.due = now, None
                self._say(f"{proc.name} restarted (restart {state.count} in a row)")
