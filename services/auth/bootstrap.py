"""The first admin key: created once, its secret written to a file only the operator can read."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from services.auth.keys import KeyRecord, decide, hash_secret, parse_bearer
from services.auth.store import KeyStore
from services.runtime.files import write_private

log = logging.getLogger(__name__)


async def ensure_admin_secret(store: KeyStore, secret: str) -> None:
    """Makes secret (given by the operator, e.g. from a Kubernetes Secret) a working admin key."""
    parse_bearer(f"Bearer {secret}")
    grant = await store.lookup(hash_secret(secret))
    if grant is not None and grant.record.admin and grant.record.revoked_at is None:
        return
    record = await store.create_with_secret(
        KeyRecord(key_id="", tenant="admin", label="operator admin", admin=True), secret
    )
    log.info("created the operator admin key", extra={"key_id": record.key_id})


async def ensure_admin(store: KeyStore, path: Path) -> None:
    """Keeps the admin key in path if it still works; otherwise creates one and writes it there."""
    if path.exists():  # noqa: ASYNC240  (once, at start-up)
        try:
            saved = json.loads(path.read_text())  # noqa: ASYNC240
            grant = await store.lookup(hash_secret(saved["secret"]))
            decide(grant, time.time(), admin_call=True)
            return
        except Exception as exc:  # any reason it does not work: make a new one
            log.warning("the saved admin key does not work; creating a new one", extra={"reason": type(exc).__name__})
    record, secret = await store.create(KeyRecord(key_id="", tenant="admin", label="bootstrap admin", admin=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, {"key_id": record.key_id, "secret": secret})
    log.info("created the bootstrap admin key", extra={"key_id": record.key_id, "file": str(path)})
