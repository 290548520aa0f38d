"""The edge's side of the mesh's mutual TLS: every upstream cluster over TLS with the edge's certificate.

The certificate, its key and the mesh CA reach Envoy through SDS from files (sds_resources, one per
secret, in one folder): Envoy watches them and the files they name, so a rotated certificate is used
for new connections without a restart. Each cluster checks that its peer's certificate names the
service it expects (its DNS SAN), as the services' own clients do (services.runtime.tls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from services.runtime import tls
from services.runtime.files import write_atomic

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CLIENT_SECRET, CA_SECRET, SERVER_SECRET = "mesh_client", "mesh_ca", "edge_server"
DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


SDS_FILES = {CLIENT_SECRET: "sds-cert.yaml", CA_SECRET: "sds-ca.yaml", SERVER_SECRET: "sds-edge-server.yaml"}


def sds_resources(files: tls.Files, server: tls.Files | None = None) -> dict[str, dict[str, Any]]:
    """Each SDS file's content by secret name (Envoy takes one secret per file): the edge's
    certificate and the mesh CA, and the certificate its clients see (server: by default the same)."""
    # Envoy reloads a secret when its folder's `..data` link moves (tls.publish, the kubelet), reading
    # certificate and key together.
    server = server or files

    def certificate(of: tls.Files) -> dict[str, Any]:
        return {
            "tls_certificate": {
                "certificate_chain": {"filename": str(of.cert.absolute())},
                "private_key": {"filename": str(of.key.absolute())},
                "watched_directory": {"path": str(of.folder.absolute())},
            }
        }

    secrets = {
        CLIENT_SECRET: certificate(files),
        SERVER_SECRET: certificate(server),
        CA_SECRET: {
            "validation_context": {
                "trusted_ca": {"filename": str(files.ca.absolute())},
                "watched_directory": {"path": str(files.folder.absolute())},
            }
        },
    }
    return {name: {"resources": [{"@type": SECRET_TYPE, "name": name, **body}]} for name, body in secrets.items()}


def _sds(name: str, sds_dir: Path) -> dict[str, Any]:
    source = {"path_config_source": {"path": str(sds_dir.absolute() / SDS_FILES[name])}, "resource_api_version": "V3"}
    return {"name": name, "sds_config": source}


def upstream_socket(peer: str, sds_dir: Path) -> dict[str, Any]:
    """The transport socket of a cluster whose endpoints are the mesh service `peer`."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": peer,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [_sds(CLIENT_SECRET, sds_dir)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": peer}}]
                    },
                    "validation_context_sds_secret_config": _sds(CA_SECRET, sds_dir),
                },
            },
        },
    }


def downstream_socket(sds_dir: Path) -> dict[str, Any]:
    """The edge listener's TLS: HTTP/2 (native gRPC) and HTTP/1.1 by ALPN on one port, TLS 1.2 and up
    (Envoy's default ciphers: no legacy ones), the certificate from SDS (reloaded when it changes)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [_sds(SERVER_SECRET, sds_dir)],
            },
        },
    }


def write_sds(files: tls.Files, sds_dir: Path, server: tls.Files | None = None) -> Path:
    """Writes the SDS files into sds_dir atomically (Envoy reloads one when a new one is moved into place)."""
    sds_dir.mkdir(parents=True, exist_ok=True)
    for name, content in sds_resources(files, server).items():
        write_atomic(sds_dir / SDS_FILES[name], yaml.safe_dump(content, sort_keys=False).encode())
    return sds_dir
