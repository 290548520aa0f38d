"""Mutual TLS inside the mesh: a local certificate authority, service certificates, gRPC credentials.

Every service has one identity, a SPIFFE ID in its certificate's URI SAN (spiffe://meshserve.local/<name>),
so a server can tell which service calls it (callers.py holds who may call what). Locally `meshserve up`
makes a throwaway CA here; in Kubernetes, cert-manager issues the same shape of certificate into files.
Servers re-read their certificate files when they change (gRPC's dynamic server credentials), so a
rotated certificate is served to new connections without a restart.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio

from services.runtime.files import write_private

log = logging.getLogger(__name__)

TRUST_DOMAIN = "meshserve.local"
CA_NAME = "ca"
# Local certificates live this long and are issued again when less than a tenth of it is left.
LIFETIME = datetime.timedelta(days=30)
CA_LIFETIME = datetime.timedelta(days=365)
# How often a client looks whether its certificate files changed, and how long calls made on the channel
# of the previous certificate get to finish (the longest whole reply, deploy/envoy's unary timeout).
RECHECK_SECONDS = 1.0
RETIRE_GRACE_SECONDS = 600.0

Stub = TypeVar("Stub")


def spiffe_id(name: str) -> str:
    """The identity a service's certificate carries."""
    return f"spiffe://{TRUST_DOMAIN}/{name}"


@dataclass(frozen=True)
class Files:
    """Where one identity's PEM files are: its certificate, its key and the CA that signs the mesh.

    Laid out as Kubernetes mounts a cert-manager Secret (tls.crt, tls.key, ca.crt in one folder, each a
    link through `..data`), so that a rotation swaps all three at once, locally as in a cluster.
    """

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, folder: Path) -> Files:
        return cls(folder / "tls.crt", folder / "tls.key", folder / "ca.crt")

    @property
    def folder(self) -> Path:
        return self.cert.parent

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def env(self, prefix: str) -> dict[str, str]:
        """The settings (ServiceSettings' tls_* fields) that point a service at these files."""
        return {
            f"{prefix}TLS_CERT_FILE": str(self.cert.absolute()),
            f"{prefix}TLS_KEY_FILE": str(self.key.absolute()),
            f"{prefix}TLS_CA_FILE": str(self.ca.absolute()),
        }


def publish(folder: Path, contents: dict[str, bytes]) -> None:
    """Replaces the files of folder all at once, as the kubelet updates a mounted Secret: a new version
    folder, then one rename of the `..data` link to it (readers and Envoy's watch see old or new, whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f"..{time.time_ns()}"
    version.mkdir(mode=0o700)
    for name, data in contents.items():
        write_private(version / name, data)
    current = folder / "..data"
    old = current.resolve() if current.is_symlink() else None
    link = folder / f"..data_tmp.{version.name[2:]}.{os.getpid()}"
    link.symlink_to(version.name)
    link.replace(current)
    for name in contents:
        entry = folder / name
        if not entry.is_symlink():
            entry.unlink(missing_ok=True)
            entry.symlink_to(Path("..data") / name)
    if old is not None and old != version:
        shutil.rmtree(old, ignore_errors=True)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, pkcs8, serialization.NoEncryption())


def _fresh(cert_file: Path, issuer: x509.Certificate | None) -> bool:
    # Usable: present, not near its end, and (for a leaf) signed by the CA there now.
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - _now() < lifetime / 10:
        return False
    if issuer is None:
        return True
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _builder(subject: str, lifetime: datetime.timedelta) -> x509.CertificateBuilder:
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
    )


def ensure_ca(directory: Path) -> Path:
    """The CA certificate under directory, made with its key (private) on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{CA_NAME}.pem", directory / f"{CA_NAME}-key.pem"
    if key_file.exists() and _fresh(cert_file, None):
        return cert_file
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshserve local CA")])
    cert = (
        _builder("meshserve local CA", CA_LIFETIME)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign and crl_sign only
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_file, _key_pem(key))
    write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a local mesh CA", extra={"path": str(cert_file)})
    return cert_file


def issue(
    directory: Path, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), renew: bool = False
) -> Files:
    """A certificate for the service `name` (client and server use), signed by the CA under directory.

    In the folder directory/name (Files.of). Kept while it is fresh and signed by the CA there now
    (unless renew); made again otherwise, with a new key. Its names: the SPIFFE ID, the DNS name `name`
    (what mesh clients verify, tls.channel's peer) and hosts, the addresses other clients reach it by.
    """
    ca_file = ensure_ca(directory)
    ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    files = Files.of(directory / name)
    if not renew and files.key.exists() and _fresh(files.cert, ca_cert):
        return files
    ca_key = serialization.load_pem_private_key((directory / f"{CA_NAME}-key.pem").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / f'{CA_NAME}-key.pem'} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(name)), x509.DNSName(name)]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        _builder(name, LIFETIME)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    publish(files.folder, {"tls.crt": pem, "tls.key": _key_pem(key), "ca.crt": ca_file.read_bytes()})
    return files


def server_credentials(files: Files) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from the mesh CA, re-read when the files change."""
    stamp = [_stamp(files)]

    def config() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = _read_matching(files)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on each new handshake: a changed file means a rotated certificate.
        now = _stamp(files)
        if now == stamp[0]:
            return None
        try:
            fresh = config()
        except (OSError, ValueError) as exc:
            log.warning("certificate files unusable; serving the previous ones", extra={"error": str(exc)})
            return None
        stamp[0] = now
        log.info("certificate files changed; serving the new ones", extra={"cert": str(files.cert)})
        return fresh

    # grpc's type stub omits the None ("unchanged") that its documentation asks fetch to return.
    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)  # type: ignore[arg-type]


def _read_matching(files: Files) -> tuple[bytes, bytes, bytes]:
    """The certificate, key and CA; ValueError if the key is not the certificate's. A rotation caught between
    its writes (a new key beside the old certificate) is not taken: the files are read again later."""
    cert, key, ca = files.read()
    public = serialization.load_pem_private_key(key, password=None).public_key()
    if x509.load_pem_x509_certificate(cert).public_key() != public:
        raise ValueError(f"{files.cert} does not match {files.key}")
    return cert, key, ca


def channel_credentials(files: Files) -> grpc.ChannelCredentials:
    """Client credentials: this service's certificate, trusting only the mesh CA."""
    cert, key, ca = _read_matching(files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _stamp(files: Files) -> tuple[int, ...]:
    stats = [os.stat(p) for p in (files.cert, files.key, files.ca)]
    return tuple(v for s in stats for v in (s.st_mtime_ns, s.st_ino, s.st_size))


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The mesh name of the peer (the last segment of its SPIFFE ID), or None without a mesh certificate."""
    names = list(auth_context.get("peer_spiffe_id", ())) or list(auth_context.get("x509_subject_alternative_name", ()))
    for uri in names:
        text = uri.decode(errors="replace")
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if text.startswith(prefix) and "/" not in text[len(prefix) :]:
            return text[len(prefix) :]
    return None


def _options(files: Files | None, peer: str, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    # The server must prove it is `peer`: its certificate names the service (a DNS SAN), whatever
    # address the channel dialled (a pod IP, a loopback port).
    return [*options, ("grpc.ssl_target_name_override", peer)] if files is not None else list(options)


def channel(target: str, files: Files | None, peer: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to the mesh service `peer` at target: with files, mutual TLS; else plaintext."""
    if files is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(files), options=_options(files, peer, options))


def aio_channel(target: str, files: Files | None, peer: str, options: Sequence[tuple[str, Any]] = ()) -> aio.Channel:
    """An asyncio channel to the mesh service `peer`, as channel()."""
    if files is None:
        return aio.insecure_channel(target, options=options)
    return aio.secure_channel(target, channel_credentials(files), options=_options(files, peer, options))


class MeshChannel(Generic[Stub]):
    """An asyncio channel to a mesh service and its stub, made again when this service's certificate files
    change: gRPC reads client credentials once, so without this a long-running client would present its
    first certificate until it expired. Calls already made finish on the old channel, closed after them."""

    def __init__(
        self,
        target: str,
        files: Files | None,
        peer: str,
        stub: Callable[[aio.Channel], Stub],
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._target, self._files, self._peer, self._options, self._make = target, files, peer, options, stub
        self._channel = aio_channel(target, files, peer, options)
        self._stub = stub(self._channel)
        self._stamp = _stamp(files) if files is not None else ()
        self._checked = time.monotonic()
        self._retiring: dict[asyncio.Task[None], aio.Channel] = {}

    @property
    def stub(self) -> Stub:
        """The stub for the next call; at most once a RECHECK_SECONDS it looks whether the files changed."""
        if self._files is not None and time.monotonic() - self._checked >= RECHECK_SECONDS:
            self._checked = time.monotonic()
            self._renew(self._files)
        return self._stub

    def _renew(self, files: Files) -> None:
        try:
            stamp = _stamp(files)
            if stamp == self._stamp:
                return
            channel = aio_channel(self._target, files, self._peer, self._options)
        except (OSError, ValueError) as exc:  # caught mid-rotation: the old certificate serves until the next look
            log.warning("certificate files unusable; calling with the previous ones", extra={"error": str(exc)})
            return
        old, self._channel, self._stub, self._stamp = self._channel, channel, self._make(channel), stamp
        log.info("certificate files changed; calling with the new ones", extra={"peer": self._peer})
        retiring = asyncio.get_running_loop().create_task(old.close(grace=RETIRE_GRACE_SECONDS))
        self._retiring[retiring] = old
        retiring.add_done_callback(lambda task: self._retiring.pop(task, None))

    async def close(self) -> None:
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close()
        await self._channel.close()


def edge_channel(target: str, ca: Path | None) -> grpc.Channel:
    """A native gRPC client's channel to the edge: TLS trusting ca, or plaintext without one."""
    if ca is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()))
