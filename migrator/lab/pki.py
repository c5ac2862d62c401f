"""x509 credentials for migration over TLS: a CA, and per host the files QEMU's
``tls-creds-x509`` object reads from its ``dir`` (and libvirt's ``migrate_tls_x509_cert_dir``).

::

    ca = make_ca("migrator lab mtest")
    write_ca(ca, lab_dir / "pki" / "ca")
    host_credentials(ca, lab_dir / "pki" / "hostA", "hostA", ["10.77.0.11"])

A host's directory holds ``ca-cert.pem``, ``server-cert.pem`` / ``server-key.pem`` (the
destination end of a migration: subject alternative names are the host's name and its
addresses, as the source checks them against ``tls-hostname`` or the address it dials) and
``client-cert.pem`` / ``client-key.pem`` (the source end, checked by a destination that
verifies its peer). Directories are 0700, keys 0600: readable by root only. Keys are ECDSA
P-256, signatures SHA-256 (GnuTLS, which QEMU and libvirt use, takes both).

Made with the ``cryptography`` package (already there for asyncssh). Certificates that must
fail (another CA, expired, the wrong names) are made by the same calls with other arguments.

Errors: ``OSError`` when a directory cannot be written; ``ValueError`` for an address that
is not an IP address.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: the files of one host's directory, as QEMU's tls-creds-x509 names them
FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
         "client-key.pem")


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def name(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str, days: int = 3650) -> CA:
    """A new self-signed CA (valid from an hour ago, for ``days``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return CA(key, cert)


def write_ca(ca: CA, directory: str | os.PathLike) -> Path:
    """``ca-cert.pem`` and ``ca-key.pem`` (0600) in ``directory`` (0700, made)."""
    d = _private_dir(directory)
    _write(d / "ca-cert.pem", _pem(ca.cert), 0o644)
    _write(d / "ca-key.pem", _pem_key(ca.key), 0o600)
    return d


def load_ca(directory: str | os.PathLike) -> CA:
    """The CA :func:`write_ca` wrote. :raise OSError: its files are missing."""
    d = Path(directory)
    key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None)
    return CA(key, x509.load_pem_x509_certificate((d / "ca-cert.pem").read_bytes()))


def _leaf(ca: CA, cn: str, names: Sequence[str], addresses: Sequence[str], usage,
          not_before: datetime.datetime, not_after: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # QEMU's tls-creds-x509 insists on keyEncipherment with digitalSignature
               # (crypto/tlscredsx509.c), whatever the key type
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=True, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def host_credentials(ca: CA, directory: str | os.PathLike, hostname: str,
                     addresses: Sequence[str], *, names: Sequence[str] | None = None,
                     days: int = 3650, expired: bool = False) -> Path:
    """Write one host's directory (see the module docstring): server and client certificates
    for ``hostname``, signed by ``ca``.

    :param names: the DNS names in the server certificate (default: ``[hostname]``); with
        ``addresses`` its subject alternative names.
    :param expired: a certificate that expired yesterday (for the negative case).
    """
    d = _private_dir(directory)
    now = _now()
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    _write(d / "ca-cert.pem", _pem(ca.cert), 0o644)
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key, cert = _leaf(ca, hostname, list(names if names is not None else [hostname]),
                          addresses, usage, start, end)
        _write(d / f"{role}-cert.pem", _pem(cert), 0o644)
        _write(d / f"{role}-key.pem", _pem_key(key), 0o600)
    return d


def _private_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def _write(path: Path, data: bytes, mode: int) -> None:
    """Written under a temporary name with its mode, then renamed: never readable by others,
    never half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


__all__ = ["CA", "FILES", "host_credentials", "load_ca", "make_ca", "write_ca"]
