"""A config file that follows its path: a changed, valid file replaces the current value; a broken one is ignored.

A Kubernetes ConfigMap volume updates files in place (a symlink swap), so catalogues and rate-limit rules
change without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import yaml

from services.runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """The parsed content of a file, reloaded by refresh() when the file's mtime or size changes."""

    def __init__(self, path: Path, parse: Callable[[Path], T], what: str) -> None:
        self._path = path
        self._parse = parse
        self._what = what
        self._stamp = self._stat()
        self.current = parse(path)

    def _stat(self) -> tuple[float, int]:
        st = self._path.stat()
        return st.st_mtime, st.st_size

    def refresh(self) -> bool:
        """Reloads if the file changed; True when a new value is in place."""
        try:
            stamp = self._stat()
        except OSError as exc:
            log.warning("%s file unreadable; keeping the current one", self._what, extra={"error": str(exc)})
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.current = self._parse(self._path)
        except (InvalidArgument, OSError, yaml.YAMLError) as exc:
            log.error("%s file is invalid; keeping the current one", self._what, extra={"error": str(exc)})
            return False
        log.info("%s reloaded", self._what, extra={"path": str(self._path)})
        return True

    async def follow(self, poll_seconds: float) -> None:
        """Refreshes every poll_seconds until cancelled."""
        while True:
            await asyncio.sleep(poll_seconds)
            self.refresh()
