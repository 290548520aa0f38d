"""Every replica the catalogue names: a channel, a live load stream and a routing state per address.

A target is host:port, or dns:///name:port (a Kubernetes headless Service), which is resolved again
every few seconds so the set of replicas follows the ready pods. A replica is in rotation while its
load stream delivers reports; the stream doubles as the probe that brings an ejected replica back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.router.balancer import ReplicaState
from services.router.replicas import GrpcReplica
from services.runtime import tls
from services.runtime.errors import DomainError

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"


@dataclass
class _Member:
    replica: GrpcReplica
    state: ReplicaState
    # Set once the first attempt to read its load finished, either way.
    first: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"replica target {target!r} is not host:port or {DNS_SCHEME}name:port")
    return host.strip("[]"), int(port)


class Fleet:
    """Replica states and clients by address, kept in line with the catalogue's targets."""

    def __init__(
        self,
        targets: Callable[[], Iterable[str]],
        on_change: Callable[[], None] = lambda: None,
        report_interval_ms: int = 250,
        resolve_seconds: float = 5.0,
        files: tls.Files | None = None,
    ) -> None:
        self._targets = targets
        self._files = files
        self._on_change = on_change
        self._interval_ms = report_interval_ms
        self._resolve_seconds = resolve_seconds
        self._members: dict[str, _Member] = {}
        # Addresses each target stood for at the last resolution.
        self._resolved: dict[str, tuple[str, ...]] = {}
        self._task: asyncio.Task[None] | None = None

    def states(self, targets: Sequence[str]) -> list[ReplicaState]:
        out = []
        for target in targets:
            for address in self._resolved.get(target, ()):
                member = self._members.get(address)
                if member is not None:
                    out.append(member.state)
        return out

    def replica(self, address: str) -> GrpcReplica:
        return self._members[address].replica

    async def start(self, ready_within: float = 10.0) -> None:
        """Resolves every target and opens the load streams; returns once each replica answered or failed."""
        await self.sync()
        self._task = asyncio.create_task(self._follow())
        firsts = [asyncio.create_task(m.first.wait()) for m in self._members.values()]
        if firsts:
            await asyncio.wait(firsts, timeout=ready_within)
            for task in firsts:
                task.cancel()

    async def sync(self) -> None:
        """Resolves the targets now; starts watching new addresses and stops watching vanished ones."""
        resolved: dict[str, tuple[str, ...]] = {}
        for target in sorted(set(self._targets())):
            try:
                resolved[target] = await self._resolve(target)
            except (OSError, ValueError) as exc:
                # Keep what it resolved to last time: a DNS blip must not empty the fleet.
                resolved[target] = self._resolved.get(target, ())
                log.warning("cannot resolve replica target", extra={"target": target, "error": str(exc)})
        self._resolved = resolved
        wanted = {a for addresses in resolved.values() for a in addresses}
        for address in wanted - self._members.keys():
            member = _Member(GrpcReplica(address, self._files), ReplicaState(address))
            member.watcher = asyncio.create_task(self._watch(member))
            self._members[address] = member
            log.info("replica added", extra={"replica": address})
        for address in self._members.keys() - wanted:
            await self._drop(self._members.pop(address))
            log.info("replica removed", extra={"replica": address})

    async def _resolve(self, target: str) -> tuple[str, ...]:
        host, port = _split(target)
        if not target.startswith(DNS_SCHEME):
            return (target,)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = {f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos}
        return tuple(sorted(addresses))

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_seconds)
            await self.sync()

    async def _watch(self, member: _Member) -> None:
        backoff = 0.25
        while True:
            try:
                async for report in member.replica.watch_load(self._interval_ms):
                    was_available = member.state.available
                    member.state.reported(report)
                    member.first.set()
                    backoff = 0.25
                    if not was_available and member.state.available:
                        log.info("replica in rotation", extra={"replica": member.state.address})
                        self._on_change()
                reason = "its load stream ended (draining)"
            except DomainError as exc:
                reason = str(exc)
            if member.state.report is not None:
                log.warning("replica out of rotation", extra={"replica": member.state.address, "reason": reason})
            member.state.reported(None)
            member.first.set()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def _drop(self, member: _Member) -> None:
        if member.watcher is not None:
            member.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await member.watcher
        member.state.reported(None)
        await member.replica.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for member in self._members.values():
            await self._drop(member)
        self._members.clear()
