"""Redis over mutual TLS: the connection options a service's Redis client takes from its mesh certificate, and
the readiness wait every service's warm-up makes for its Redis.

A `rediss://` URL is TLS. With the service's mesh files (the tls_* settings) the client presents its
certificate and trusts only the mesh CA, and checks that the server's certificate names the host it dialled
(the Service name `redis` in a cluster; 127.0.0.1 locally, which local certificates carry). Without them, a
`rediss://` URL trusts the system's CAs (a managed Redis). redis-py makes its TLS context again for every
new connection, so a renewed client certificate is taken without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as redis

from services.runtime import tls

log = logging.getLogger(__name__)


def options(url: str, files: tls.Files | None) -> dict[str, Any]:
    """Keyword arguments for redis.Redis.from_url (sync or asyncio) of url, for a service with files."""
    if not url.startswith("rediss://"):
        if files is not None:
            log.warning("Redis in plaintext while the mesh runs mutual TLS (use a rediss:// URL)", extra={"url": url})
        return {}
    if files is None:
        return {}
    return {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key), "ssl_ca_certs": str(files.ca)}


async def answering(client: redis.Redis, patience_seconds: float = 60.0) -> None:
    """Returns once Redis answers a PING. While it starts, or while a busy machine makes its TLS handshake slower
    than the client's connect timeout, this retries (the service stays NOT_SERVING meanwhile) instead of failing
    the warm-up; past patience_seconds the last error is raised."""
    deadline = time.monotonic() + patience_seconds
    while True:
        try:
            await client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("waiting for Redis", extra={"error": repr(exc)})
            await asyncio.sleep(0.5)
