"""TLS between the portal and each service: a certificate per service, and the portal talking only to that one.

At launch the portal makes a private key and a self-signed certificate for the service in its job folder (the key
0600, like the service's API key), and stores the certificate's SHA-256 fingerprint with the service. The engine
serves TLS with them (each engine's `tls_arguments`). Every connection the portal makes to a service (the proxy's
upstream connections, the reconciler's health probes, benchmark runs) checks, before it sends a byte, that the peer
presented exactly that certificate: a program that took the port after the service ended (another user of the node)
cannot present it, so it never receives a prompt or the service's key. The traffic on the cluster network is
encrypted as well.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import ssl
from pathlib import Path
from typing import Optional, Tuple

CERT_FILE = "service.crt"
KEY_FILE = "service-tls.key"
VALIDITY = datetime.timedelta(days=400)  # longer than any job's time limit; the pin, not the date, is what counts


class WrongCertificate(Exception):
    """The peer did not present the service's certificate: something else answers on its port."""


def make_certificate(job_dir: Path, service_id: str) -> str:
    """Write a new key (0600) and self-signed certificate into `job_dir`; return the certificate's fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pilotfish service {service_id}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write(Path(job_dir) / KEY_FILE, key_pem, 0o600)
    _write(Path(job_dir) / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o600)
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def tls_files(job_dir) -> Tuple[str, str]:
    """(key file, certificate file) of a service's job folder, as the engine is given them."""
    return str(Path(job_dir) / KEY_FILE), str(Path(job_dir) / CERT_FILE)


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as lower-case hex."""
    return hashlib.sha256(der).hexdigest()


_client_context: Optional[ssl.SSLContext] = None


def client_context() -> ssl.SSLContext:
    """The portal's TLS client context for services: the certificate is checked by its pin (check_peer), not by
    a CA or a host name (services run on whichever node the scheduler picks)."""
    global _client_context
    if _client_context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _client_context = context
    return _client_context


def check_peer(ssl_object, pinned: str) -> None:
    """WrongCertificate unless the peer of `ssl_object` presented the certificate with fingerprint `pinned`."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der or not hmac.compare_digest(fingerprint(der), pinned):
        raise WrongCertificate("the service's certificate does not match: another program answers on its port")


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
