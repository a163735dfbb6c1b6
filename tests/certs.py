"""
Throwaway certificate authorities for tests.

``make_test_pki(directory, hostname)`` writes a root CA, optionally an
intermediate CA, and a server certificate with a subjectAltName for
``hostname``, so that end-to-end tests can connect with
``ssl.create_default_context(cafile=pki.ca)`` and ``check_hostname=True``.
Nothing here is meant for production: keys are EC P-256, unencrypted, and
valid for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class PKIPaths(NamedTuple):
    """Paths written by ``make_test_pki``; unpacks as (ca, fullchain, key)."""

    ca: str  # the root certificate, to give to clients as their trust anchor
    fullchain: str  # leaf first, then the intermediate if there is one
    key: str  # the leaf's private key


class _Issuer(NamedTuple):
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_test_pki(
    directory: str,
    hostname: str = "localhost",
    intermediate: bool = False,
    prefix: str = "",
) -> PKIPaths:
    """
    Write ``ca.pem``, ``fullchain.pem`` and ``key.pem`` (each name preceded by
    ``prefix``) into ``directory``, creating it if needed.

    Every call makes a fresh CA, so two calls give certificates that do not
    verify against each other's ``ca.pem``.
    """
    os.makedirs(directory, exist_ok=True)
    root = _make_ca("popgate test root CA")
    chain_issuer = root
    intermediates: list[x509.Certificate] = []
    if intermediate:
        chain_issuer = _make_ca("popgate test intermediate CA", issuer=root)
        intermediates.append(chain_issuer.certificate)
    leaf_key = _new_key()
    leaf = _make_leaf(hostname, leaf_key, chain_issuer)

    paths = PKIPaths(
        ca=os.path.join(directory, prefix + "ca.pem"),
        fullchain=os.path.join(directory, prefix + "fullchain.pem"),
        key=os.path.join(directory, prefix + "key.pem"),
    )
    _write(paths.ca, _pem(root.certificate))
    _write(paths.fullchain, b"".join(_pem(c) for c in [leaf, *intermediates]))
    _write(
        paths.key,
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return paths


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer_name: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: _Issuer) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(common_name: str, issuer: _Issuer | None = None) -> _Issuer:
    key = _new_key()
    subject = _name(common_name)
    signer = issuer or _Issuer(certificate=None, key=key)  # self-signed root
    issuer_name = issuer.certificate.subject if issuer else subject
    builder = (
        _builder(subject, issuer_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(_authority_key_id(signer), critical=False)
    )
    return _Issuer(certificate=builder.sign(signer.key, hashes.SHA256()), key=key)


def _subject_alt_name(hostname: str) -> x509.SubjectAlternativeName:
    try:
        return x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(hostname))])
    except ValueError:
        return x509.SubjectAlternativeName([x509.DNSName(hostname)])


def _make_leaf(
    hostname: str, key: ec.EllipticCurvePrivateKey, issuer: _Issuer
) -> x509.Certificate:
    return (
        _builder(_name(hostname), issuer.certificate.subject, key.public_key())
        .add_extension(_subject_alt_name(hostname), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_authority_key_id(issuer), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
