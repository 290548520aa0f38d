"""A throwaway PostgreSQL server from Debian's postgresql package, for the ledger's tests and benchmark."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from services.mesh.procs import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/bootstrap.sh (it installs Debian's postgresql)")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # The server refuses to run as root; Debian's package creates the postgres user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def running_postgres() -> Iterator[str]:
    """Starts a server on a free port of 127.0.0.1 (trust auth) and yields its admin DSN."""
    root = tempfile.mkdtemp(prefix="meshserve-pg-")
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = os.path.join(root, "data")
    subprocess.run(
        _as_postgres([_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        _as_postgres([_bin("postgres"), "-D", data, "-p", str(port), "-k", root, "-c", "listen_addresses=127.0.0.1"]),
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(root, "server.log"), "wb"),
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start; see {root}/server.log") from None
                time.sleep(0.2)
        yield dsn
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(admin_dsn: str) -> str:
    """Creates an empty database on the server and returns its DSN."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_dsn.rsplit("/", 1)[0] + "/" + name
