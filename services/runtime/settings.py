"""Process settings every service shares, read from environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime import keepalive, tls


class ServiceSettings(BaseSettings):
    """Settings of the shared runtime; each service subclasses with its own env prefix."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_", extra="ignore")

    # Address the gRPC server binds to.
    host: str = "127.0.0.1"
    # gRPC port; 0 picks a free one (written to ready_file).
    port: int = 0
    # Port of the Prometheus /metrics endpoint; 0 picks a free one, -1 disables it.
    metrics_port: int = 0
    # Seconds health reports NOT_SERVING before the server stops taking calls.
    drain_seconds: float = 5.0
    # Seconds in-flight calls get to finish once the server stops.
    grace_seconds: float = 60.0
    # Log level name (DEBUG, INFO, WARNING, ERROR).
    log_level: str = "INFO"
    # JSON log lines (true) or plain text for a terminal (false).
    log_json: bool = True
    # If set, a JSON file with the bound ports is written here once serving.
    ready_file: str = ""
    # Seconds between the HTTP/2 keepalive pings of this server's clients; it permits pings at half that.
    keepalive_seconds: float = keepalive.INTERVAL_SECONDS
    # Maximum size of one gRPC message, in bytes.
    max_message_bytes: int = Field(default=16 * 1024 * 1024)
    # Mutual TLS: this service's certificate and key, and the mesh CA (PEM files, re-read when they
    # change). All three set: the server requires a mesh client certificate and enforces the caller
    # matrix, and the service's own gRPC clients present the certificate. None set: plaintext, logged.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # The event loop: uvloop (libuv; less CPU per call for every service, bench/reports/gateways.md) or asyncio's own.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # A plaintext port serving grpc.health.v1 alone, for probes that cannot present a certificate
    # (Kubernetes' gRPC probes); 0 picks a free one, -1 (the default) serves none.
    health_port: int = -1
    # Freeze the start-up heap once warm, so that full garbage collections leave it out (services/runtime/gc_heap.py).
    gc_freeze: bool = True

    def tls_files(self) -> tls.Files | None:
        """The mTLS files, or None for plaintext; some but not all set is a configuration error."""
        given = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("set all of tls_cert_file, tls_key_file and tls_ca_file, or none")
        return tls.Files(Path(self.tls_cert_file), Path(self.tls_key_file), Path(self.tls_ca_file))
