"""Crypto for the OpenSVC simulator: the v2 raw-protocol envelope and throw-away TLS material.

Envelope (port 1214 protocol): ``{"clustername", "nodename", "iv", "data"}`` where ``data`` is
AES-256-CBC(key = first 32 bytes of the cluster secret, UTF-8) over PKCS7-padded zlib-compressed
JSON, both ``iv`` and ``data`` in URL-safe base64 with padding.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import pathlib
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID


class EnvelopeError(ValueError):
    """The envelope or its payload cannot be decoded (wrong secret, garbage); internal to the simulator."""


def _aes_key(secret: str) -> bytes:
    key = secret.encode("utf-8")[:32]
    if len(key) != 32:
        raise EnvelopeError("cluster secret shorter than 32 bytes")
    return key


def encrypt_payload(secret: str, clustername: str, nodename: str, message: Any) -> bytes:
    """The JSON envelope (without the trailing NUL) carrying ``message``."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(zlib.compress(json.dumps(message).encode("utf-8"))) + padder.finalize()
    encryptor = Cipher(algorithms.AES(_aes_key(secret)), modes.CBC(iv)).encryptor()
    cipher = encryptor.update(plain) + encryptor.finalize()
    envelope = {
        "clustername": clustername,
        "nodename": nodename,
        "iv": base64.urlsafe_b64encode(iv).decode("ascii"),
        "data": base64.urlsafe_b64encode(cipher).decode("ascii"),
    }
    return json.dumps(envelope).encode("utf-8")


@dataclass(frozen=True)
class Envelope:
    clustername: Any
    nodename: Any
    iv: Any
    data: Any


def parse_envelope(raw: bytes) -> Envelope:
    """The envelope's fields; raises EnvelopeError when it is not a JSON object."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError("envelope is not JSON") from exc
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope is not a JSON object")
    return Envelope(doc.get("clustername"), doc.get("nodename"), doc.get("iv"), doc.get("data"))


def decrypt_payload(secret: str, envelope: Envelope) -> Any:
    """The decrypted JSON message; raises EnvelopeError on any failure (wrong secret included)."""
    if not isinstance(envelope.iv, str) or not isinstance(envelope.data, str):
        raise EnvelopeError("iv or data missing")
    try:
        iv = base64.urlsafe_b64decode(envelope.iv)
        cipher = base64.urlsafe_b64decode(envelope.data)
        if len(iv) != 16 or not cipher or len(cipher) % 16:
            raise EnvelopeError("bad iv or ciphertext length")
        decryptor = Cipher(algorithms.AES(_aes_key(secret)), modes.CBC(iv)).decryptor()
        padded = decryptor.update(cipher) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        compressed = unpadder.update(padded) + unpadder.finalize()
        return json.loads(zlib.decompress(compressed).decode("utf-8"))
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise EnvelopeError("payload does not decrypt") from exc


# --- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path


def _write_private(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class ClusterCA:
    """A throw-away cluster CA (EC P-256, valid one day) issuing server and client certificates."""

    def __init__(self, clustername: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ca-{clustername}")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, directory: pathlib.Path, cn: str, *, server: bool) -> TlsFiles:
        """Write ``<cn>.crt``/``<cn>.key`` and ``ca.crt`` in ``directory``; a server cert gets SANs for
        ``cn``, ``localhost`` and 127.0.0.1."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(cn),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        files = TlsFiles(directory / "ca.crt", directory / f"{cn}.crt", directory / f"{cn}.key")
        files.ca_file.write_bytes(self.pem)
        files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            files.key_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return files
