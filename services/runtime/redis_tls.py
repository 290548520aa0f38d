"""Redis over mutual TLS: the connection options a service's Redis client takes from its mesh certificate.

A `rediss://` URL is TLS. With the service's mesh files (the tls_* settings) the client presents its
certificate and trusts only the mesh CA, and checks that the server's certificate names the host it dialled
(the Service name `redis` in a cluster; 127.0.0.1 locally, which local certificates carry). Without them, a
`rediss://` URL trusts the system's CAs (a managed Redis). redis-py makes its TLS context again for every
new connection, so a renewed client certificate is taken without a restart.
"""

from __future__ import annotations

import logging
from typing import Any

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
