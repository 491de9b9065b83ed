"""What a test federation needs: a CA, a SuperLink TLS certificate, SuperNode key pairs.

Everything is made with `cryptography <https://cryptography.io>`_:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384). Every data owner
  and whoever submits runs gets ``ca.crt``; ``ca.key`` stays with whoever made the folder.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate, signed by the CA,
  valid for the given host names and IP addresses (``localhost`` and ``127.0.0.1`` are
  always added: Flower's SuperExec reaches the SuperLink over loopback).
- ``supernode-I.key`` / ``supernode-I.pub``: one EC P-384 key pair per SuperNode in
  OpenSSH format, as Flower's SuperNode authentication wants them. The private key goes
  to data owner I only; the public key is registered on the SuperLink
  (``fedplug register`` or ``flwr supernode register``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1")
VALID_DAYS = 365


@dataclass
class FederationFiles:
    """The paths :func:`create_federation_files` wrote."""

    folder: Path
    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path
    supernode_keys: list[tuple[Path, Path]] = field(default_factory=list)
    """(private key, public key) per SuperNode."""


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    path.write_bytes(data)
    if secret:
        path.chmod(0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedplug"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK]):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(valid_days: int = VALID_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = _private_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _name("fedplug federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_certificate(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], valid_days: int = VALID_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for ``hosts`` (names or IP addresses), signed by the CA."""
    key = _private_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else LOOPBACK[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def write_node_key_pair(private_path: Path, public_path: Path) -> None:
    """An EC P-384 key pair in OpenSSH format, as Flower's SuperNode authentication reads it."""
    key = _private_key()
    _write(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        secret=True,
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public_path, public + b"\n")


def create_federation_files(folder: Path, hosts: list[str], supernodes: int) -> FederationFiles:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``supernodes`` key pairs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca()
    server_cert, server_key = make_server_certificate(ca_cert, ca_key, hosts)
    pem = serialization.Encoding.PEM
    files = FederationFiles(
        folder=folder,
        ca_cert=_write(folder / "ca.crt", ca_cert.public_bytes(pem)),
        superlink_cert=_write(folder / "superlink.crt", server_cert.public_bytes(pem)),
        superlink_key=_write(folder / "superlink.key", _pem_key(server_key), secret=True),
    )
    _write(folder / "ca.key", _pem_key(ca_key), secret=True)
    for index in range(1, supernodes + 1):
        private, public = folder / f"supernode-{index}.key", folder / f"supernode-{index}.pub"
        write_node_key_pair(private, public)
        files.supernode_keys.append((private, public))
    return files


def check_public_key(path: Path) -> None:
    """Raise ValueError unless ``path`` holds an OpenSSH EC public key (what Flower registers)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"cannot read a public key from {path}: {error}") from error
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC public key (make key pairs with `fedplug certificates`)")


def check_private_key(path: Path) -> None:
    """Raise ValueError unless ``path`` holds an OpenSSH EC private key (what a SuperNode signs with)."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"cannot read an OpenSSH private key from {path}: {error}") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key (make key pairs with `fedplug certificates`)")
