"""A small PKI for PayPal webhook signing in tests and chaos runs (never used by the service).

The service accepts a PayPal signing certificate only when it is fetched over
https from an allow-listed host and chains to ``paypal.cert_ca_file`` (the
system's CAs when empty).  Locally nothing is PayPal's, so tests and the chaos
run make their own world with :class:`TestAuthority`:

* a root CA (its PEM is the ``cert_ca_file`` the service is given);
* a signing certificate for ``messageverificationcerts.sandbox.paypal.com``
  issued by that CA (:meth:`TestAuthority.signing_cert`), whose key signs
  webhooks (:func:`paypal_headers`);
* a TLS server certificate for ``127.0.0.1``/``localhost``
  (:meth:`TestAuthority.tls_cert`), served by the PayPal fake's https listener
  (``fake_paypal.serve(..., tls=...)`` or ``--tls-port``), so the certificate
  URL is ``https://127.0.0.1:<port>/_fake/certs/<name>``.

:func:`self_signed` makes the forger's certificate: the right name, no chain.
The certificates follow the Web PKI profile that
``cryptography.x509.verification`` enforces (SAN, key identifiers, key usage).
"""

from __future__ import annotations

import base64
import ipaddress
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: the name PayPal's sandbox signs webhooks under (production: messageverificationcerts.paypal.com)
SANDBOX_SIGNING_NAME = "messageverificationcerts.sandbox.paypal.com"
#: hosts the test TLS certificate is good for
LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def load(cls, cert_file: Path | str, key_file: Path | str) -> Issued:
        """A certificate and its key from PEM files (e.g. the ``paypal-signing.*`` that :func:`main` writes)."""
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_file} does not hold an RSA private key")
        return cls(key, x509.load_pem_x509_certificate(Path(cert_file).read_bytes()))


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _leaf(
    subject: str,
    hosts: tuple[str, ...],
    key: rsa.RSAPrivateKey,
    issuer: Issued | None,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """An end-entity server certificate; self-signed when ``issuer`` is None."""
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.cert.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    )
    return builder.sign(signer_key, hashes.SHA256())


class TestAuthority:
    """A root CA that issues PayPal-named signing certificates and local TLS certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "Orders Test PayPal Root CA") -> None:
        key = _key()
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    key_encipherment=False,
                    content_commitment=False,
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
            .sign(key, hashes.SHA256())
        )
        self.root = Issued(key, cert)

    @property
    def ca_pem(self) -> bytes:
        return self.root.cert_pem

    def signing_cert(
        self, name: str = SANDBOX_SIGNING_NAME, *, not_before: datetime | None = None, not_after: datetime | None = None
    ) -> Issued:
        """A webhook signing certificate for ``name`` (valid from yesterday to tomorrow unless told)."""
        now = datetime.now(UTC)
        key = _key()
        cert = _leaf(
            name, (name,), key, self.root, not_before or now - timedelta(days=1), not_after or now + timedelta(days=1)
        )
        return Issued(key, cert)

    def tls_cert(self, hosts: tuple[str, ...] = LOCAL_HOSTS) -> Issued:
        """The https certificate of the local certificate host."""
        now = datetime.now(UTC)
        key = _key()
        return Issued(key, _leaf(hosts[0], hosts, key, self.root, now - timedelta(days=1), now + timedelta(days=30)))

    def write_ca(self, path: Path) -> Path:
        """Write the root's PEM (a ``paypal.cert_ca_file``); returns ``path``."""
        path.write_bytes(self.ca_pem)
        return path


def self_signed(name: str = SANDBOX_SIGNING_NAME) -> Issued:
    """A forger's certificate: PayPal's name, PayPal's profile, nobody's signature but its own."""
    now = datetime.now(UTC)
    key = _key()
    return Issued(key, _leaf(name, (name,), key, None, now - timedelta(days=1), now + timedelta(days=1)))


def write_tls(tls: Issued, directory: Path) -> tuple[Path, Path]:
    """Write a TLS certificate and key as files (for ``ssl`` and the fake's CLI); returns (cert, key)."""
    cert, key = directory / "paypal-cert-host.pem", directory / "paypal-cert-host.key"
    cert.write_bytes(tls.cert_pem)
    key.write_bytes(tls.key_pem)
    key.chmod(0o600)
    return cert, key


def paypal_headers(
    signer: Issued,
    body: bytes,
    webhook_id: str,
    cert_url: str,
    *,
    transmission_id: str | None = None,
    transmission_time: str | None = None,
) -> dict[str, str]:
    """The headers PayPal sends with ``body``: SHA256withRSA over id|time|webhook id|crc32(body)."""
    tid = transmission_id or str(uuid.uuid4())
    ttime = transmission_time or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = f"{tid}|{ttime}|{webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()
    signature = base64.b64encode(signer.key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()
    return {
        "PAYPAL-TRANSMISSION-ID": tid,
        "PAYPAL-TRANSMISSION-TIME": ttime,
        "PAYPAL-TRANSMISSION-SIG": signature,
        "PAYPAL-CERT-URL": cert_url,
        "PAYPAL-AUTH-ALGO": "SHA256withRSA",
    }


def main() -> None:
    """Command line: write a CA, the https host's certificate and a signing certificate for local runs."""
    import argparse

    parser = argparse.ArgumentParser(description="Make a local PayPal webhook PKI (for the fake, never for production)")
    parser.add_argument("directory", type=Path)
    directory = parser.parse_args().directory
    directory.mkdir(parents=True, exist_ok=True)
    authority = TestAuthority()
    ca = authority.write_ca(directory / "paypal-ca.pem")
    cert, key = write_tls(authority.tls_cert(), directory)
    signing = authority.signing_cert(not_after=datetime.now(UTC) + timedelta(days=29))
    (directory / "paypal-signing.pem").write_bytes(signing.cert_pem)
    (directory / "paypal-signing.key").write_bytes(signing.key_pem)
    (directory / "paypal-signing.key").chmod(0o600)
    print(
        f"ORDERS_PAYPAL__CERT_CA_FILE={ca}\nORDERS_PAYPAL__CERT_HOST_ALLOWLIST='[\"127.0.0.1:12113\"]'\n"
        f"fake: python scripts/fakes/fake_paypal.py --port 12112 --tls-port 12113 --tls-cert {cert} --tls-key {key}\n"
        f"then PUT {directory / 'paypal-signing.pem'} to http://127.0.0.1:12112/_fake/certs/<name>; the cert URL is "
        "https://127.0.0.1:12113/_fake/certs/<name>"
    )


if __name__ == "__main__":
    main()


__all__ = [
    "Issued",
    "LOCAL_HOSTS",
    "SANDBOX_SIGNING_NAME",
    "TestAuthority",
    "paypal_headers",
    "self_signed",
    "write_tls",
]
