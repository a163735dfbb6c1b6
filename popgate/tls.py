"""
TLS for popgate: certificate loading and checking, live reload, implicit-TLS
wrapping, a one-line description of a session's TLS, and self-signed
certificates for labs.

Files read
    * the certificate file: PEM, the server (leaf) certificate first, then its
      intermediates in issuing order (a "full chain", as certbot's
      ``fullchain.pem``). Other PEM blocks in the file are ignored, so a
      combined certificate+key file works when given as both paths.
    * the key file: one unencrypted PEM private key (PKCS#8 ``PRIVATE KEY``,
      ``RSA PRIVATE KEY`` or ``EC PRIVATE KEY``) matching the leaf.
    Both are read whole, refusing anything over ``MAX_PEM_FILE_SIZE``.

Files written
    * ``make_selfsigned`` writes a certificate (mode 0644) and a key (mode
      0600), each by write-to-temporary, fsync, rename, so a reader never sees
      half a file.

Concurrency
    Everything here runs on the reactor thread and is not thread-safe.
    ``ReloadingServerTLS`` reads the files on the reactor thread when they
    change; they are a few kB, so that is cheaper than a thread hop. It stats
    them at most once per ``check_interval`` and only when a connection starts.
    A reload swaps in a new ``CertificateOptions``; connections already
    running keep the ``OpenSSL.SSL.Connection`` (and through it the old
    context) they were created with, so they are never disturbed.
    Certificate tools that replace the certificate and the key one after the
    other leave a moment where they do not match; that reload fails (logged
    once), the old certificate stays in use, and the next change to either file
    triggers another attempt.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from popgate.fileio import write_atomically

__all__ = [
    "MAX_PEM_FILE_SIZE",
    "ReloadingServerTLS",
    "TLSConfigError",
    "check_certificate_files",
    "load_certificate_options",
    "make_selfsigned",
    "tls_description",
    "wrap_implicit_tls",
]

# Mozilla's "intermediate" profile (ssl-config.mozilla.org, v5.7) for TLS 1.2: forward
# secret AEAD suites only, no CBC.  Its DHE suites are left out: they need DH parameters,
# which popgate does not configure.  TLS 1.3 suites are all AEAD and not affected.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
# Names every self-signed certificate carries, so that local clients can verify it.
LOCAL_NAMES = ("localhost", "127.0.0.1")

# A full chain is a few kB; anything this big is the wrong file (or /dev/zero).
MAX_PEM_FILE_SIZE = 1024 * 1024

_PEM_LABEL = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----", re.MULTILINE)


class TLSConfigError(Exception):
    """
    A certificate or key file cannot be used. ``str()`` is one line of the
    form ``"<file>: <reason>"``, ready to show to an administrator.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ---------------------------------------------------------------------------
# Loading and checking


@dataclass(frozen=True)
class _KeyMaterial:
    """What a certificate file and key file contain, already cross-checked."""

    leaf: x509.Certificate
    intermediates: list[x509.Certificate]
    key: PrivateKeyTypes


def load_certificate_options(cert_path: str, key_path: str) -> CertificateOptions:
    """
    Read a PEM full chain and its private key into server
    ``CertificateOptions`` (TLS 1.2 minimum; in TLS 1.2 only the
    ``INTERMEDIATE_CIPHERS``).

    @raise TLSConfigError: naming the file and what is wrong with it.
    """
    return _options_from(_load_key_material(cert_path, key_path), cert_path)


def check_certificate_files(cert_path: str, key_path: str) -> None:
    """
    Validate the pair exactly as ``load_certificate_options`` does, so that
    start-up stops with a clear message instead of failing on the first client.

    @raise TLSConfigError: naming the file and what is wrong with it.
    """
    load_certificate_options(cert_path, key_path)


def _load_key_material(cert_path: str, key_path: str) -> _KeyMaterial:
    certificates = _parse_certificates(cert_path, _read_pem_file(cert_path))
    key = _parse_private_key(key_path, _read_pem_file(key_path))
    _check_key_matches_leaf(cert_path, key_path, certificates, key)
    _check_chain_order(cert_path, certificates)
    return _KeyMaterial(leaf=certificates[0], intermediates=certificates[1:], key=key)


def _read_pem_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_FILE_SIZE + 1)
    except FileNotFoundError:
        raise TLSConfigError(path, "file not found") from None
    except PermissionError:
        raise TLSConfigError(path, "cannot be read: permission denied") from None
    except IsADirectoryError:
        raise TLSConfigError(path, "is a directory, not a PEM file") from None
    except OSError as e:
        raise TLSConfigError(path, f"cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_PEM_FILE_SIZE:
        raise TLSConfigError(path, f"larger than {MAX_PEM_FILE_SIZE} bytes, not a PEM file")
    if not data.strip():
        raise TLSConfigError(path, "file is empty")
    if not _pem_labels(data):
        raise TLSConfigError(path, "not a PEM file (no '-----BEGIN ...-----' line)")
    return data


def _pem_labels(data: bytes) -> list[str]:
    return [label.decode("ascii") for label in _PEM_LABEL.findall(data)]


def _found_blocks(data: bytes) -> str:
    return ", ".join(sorted(set(_pem_labels(data))))


def _parse_certificates(path: str, data: bytes) -> list[x509.Certificate]:
    if "CERTIFICATE" not in _pem_labels(data):
        raise TLSConfigError(
            path, f"contains no certificate (PEM blocks found: {_found_blocks(data)})"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(path, f"certificate is not valid PEM: {_one_line(e)}") from None


def _parse_private_key(path: str, data: bytes) -> PrivateKeyTypes:
    labels = _pem_labels(data)
    if "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in data:
        raise TLSConfigError(
            path, "private key is protected by a passphrase; popgate needs an unencrypted key"
        )
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise TLSConfigError(
            path, f"contains no private key (PEM blocks found: {_found_blocks(data)})"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(path, f"private key is not valid PEM: {_one_line(e)}") from None


def _public_key_bytes(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches_leaf(
    cert_path: str, key_path: str, certificates: list[x509.Certificate], key: PrivateKeyTypes
) -> None:
    key_public = _public_key_bytes(key.public_key())
    if _public_key_bytes(certificates[0].public_key()) == key_public:
        return
    for position, certificate in enumerate(certificates[1:], start=2):
        if _public_key_bytes(certificate.public_key()) == key_public:
            # The usual cause is a chain concatenated in the wrong order.
            raise TLSConfigError(
                cert_path,
                f"the private key in {key_path} belongs to certificate {position} "
                f"of this file; the server certificate must come first",
            )
    raise TLSConfigError(key_path, f"private key does not match the certificate in {cert_path}")


def _check_chain_order(path: str, certificates: list[x509.Certificate]) -> None:
    # Clients build the path from what we send; a misordered chain works with
    # some clients and fails with others, which is worse than failing at once.
    for position, (certificate, issuer) in enumerate(itertools.pairwise(certificates), start=1):
        if certificate.issuer != issuer.subject:
            raise TLSConfigError(
                path,
                f"certificate {position} ({certificate.subject.rfc4514_string()}) is not "
                f"issued by certificate {position + 1} ({issuer.subject.rfc4514_string()}); "
                f"put the server certificate first, then each issuer in order",
            )


def _options_from(material: _KeyMaterial, cert_path: str) -> CertificateOptions:
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(material.key),
            certificate=crypto.X509.from_cryptography(material.leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in material.intermediates],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS),
        )
        # Build the context now, so that OpenSSL's own objections (a key too
        # small for its security level, say) surface here and not on the
        # first client to connect.
        options.getContext()
    except (SSL.Error, crypto.Error, TypeError, ValueError) as e:
        raise TLSConfigError(cert_path, f"OpenSSL refused it: {_openssl_reason(e)}") from None
    return options


def _openssl_reason(error: Exception) -> str:
    # pyOpenSSL errors carry a list of (library, function, reason) tuples.
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return "; ".join(str(entry[-1]) for entry in details)
    return _one_line(error)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------------------
# Reloading connection creator


_FileStamp = tuple[int, ...]


def _file_stamp(path: str) -> _FileStamp:
    try:
        st = os.stat(path)  # follows symlinks: a certbot "live/" switch shows up
    except OSError as e:
        return (-1, e.errno or 0)
    # ctime too, so that a chmod that fixes an unreadable key triggers a retry.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _default_clock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """
    Server TLS connection creator that follows certificate renewals.

    Use it directly for STARTTLS/STLS (``self.transport.startTLS(creator)``)
    and for implicit TLS (``wrap_implicit_tls(factory, creator)``). When a
    connection starts, and at most once per ``check_interval`` seconds of
    ``clock``, it compares the files' (device, inode, size, mtime, ctime) with
    those it last loaded and reloads on a change. A failed reload keeps the
    previous certificate and is logged once per change of the files.
    """

    log = Logger()

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        clock: IReactorTime | None = None,
        check_interval: float = 1.0,
    ) -> None:
        """
        @param clock: the reactor (the default) or any ``IReactorTime``.
        @raise TLSConfigError: if the files cannot be used now.
        """
        self.cert_path = cert_path
        self.key_path = key_path
        self._clock = clock if clock is not None else _default_clock()
        self._check_interval = check_interval
        stamp = self._stamp()
        self._options = load_certificate_options(cert_path, key_path)
        self._loaded_stamp = stamp
        self._failed_stamp: tuple[_FileStamp, _FileStamp] | None = None
        self._last_check = self._clock.seconds()

    @property
    def options(self) -> CertificateOptions:
        """The ``CertificateOptions`` new connections get now."""
        return self._options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """``IOpenSSLServerConnectionCreator``: a Connection for one new session."""
        self._reload_if_changed()
        return self._options.serverConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]

    def getContext(self) -> SSL.Context:
        """The current ``SSL.Context``, for legacy APIs that want a context factory."""
        self._reload_if_changed()
        return self._options.getContext()

    def reload(self) -> bool:
        """
        Reload now, whether or not the files look changed (for SIGHUP).

        @return: True if the new files are in use, False if they were refused
            (the error is logged and the previous certificate stays in use).
        """
        return self._load(self._stamp())

    def _stamp(self) -> tuple[_FileStamp, _FileStamp]:
        return (_file_stamp(self.cert_path), _file_stamp(self.key_path))

    def _reload_if_changed(self) -> None:
        now = self._clock.seconds()
        # A wall clock set backwards counts as time passed, not as a long pause.
        if 0 <= now - self._last_check < self._check_interval:
            return
        self._last_check = now
        stamp = self._stamp()
        if stamp == self._loaded_stamp or stamp == self._failed_stamp:
            return
        self._load(stamp)

    def _load(self, stamp: tuple[_FileStamp, _FileStamp]) -> bool:
        # The stamp was taken before reading: if the files change while we
        # read them, the next check sees a new stamp and reads them again.
        try:
            material = _load_key_material(self.cert_path, self.key_path)
            options = _options_from(material, self.cert_path)
        except TLSConfigError as e:
            self._failed_stamp = stamp
            self.log.error(
                "TLS certificate not reloaded, the previous one stays in use: {error}",
                error=str(e),
            )
            return False
        self._options = options
        self._loaded_stamp = stamp
        self._failed_stamp = None
        self.log.info(
            "TLS certificate reloaded from {cert_path}: {subject}, valid until {not_after}",
            cert_path=self.cert_path,
            subject=material.leaf.subject.rfc4514_string(),
            not_after=material.leaf.not_valid_after_utc.isoformat(),
        )
        return True


def wrap_implicit_tls(factory: object, creator: object) -> TLSMemoryBIOFactory:
    """
    Wrap a protocol factory so that every connection is TLS from the first
    byte (POP3S on 995, SMTP submissions on 465; RFC 8314).
    """
    return TLSMemoryBIOFactory(creator, False, factory)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Describing a session


def tls_description(transport: object) -> str | None:
    """
    Describe the TLS in use on a transport, e.g. ``"TLSv1.3
    TLS_AES_256_GCM_SHA384"``, for ``Received:`` headers and logs.

    Works for STARTTLS'd TCP transports, implicit-TLS ``TLSMemoryBIOProtocol``
    transports and protocol wrappers over either. Returns None when the
    transport is not under TLS (including ``StringTransport`` and closed
    connections), and ``"TLS (handshake in progress)"`` before the handshake
    has finished. Never raises.
    """
    connection = _openssl_connection_of(transport)
    if connection is None:
        return None
    cipher = connection.get_cipher_name()
    if cipher is None:
        return "TLS (handshake in progress)"
    return f"{connection.get_protocol_version_name()} {cipher}"


def _openssl_connection_of(transport: object) -> SSL.Connection | None:
    # Wrappers (policies.ProtocolWrapper, HAProxy) forward getHandle to the
    # transport beneath; walk down explicitly too, for wrappers that do not.
    for _ in range(8):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        if callable(get_handle):
            try:
                handle = get_handle()
            except AttributeError:  # a closed TCP transport has no socket left
                handle = None
            if isinstance(handle, SSL.Connection):
                return handle
        transport = getattr(transport, "transport", None)
    return None


# ---------------------------------------------------------------------------
# Self-signed certificates


def selfsigned_names(hostname: str, extra_names=()) -> list[str]:
    """The names a self-signed certificate from :func:`make_selfsigned` is for, in
    order, without repeats: ``hostname``, ``extra_names``, then ``LOCAL_NAMES``."""
    return list(dict.fromkeys([hostname, *extra_names, *LOCAL_NAMES]))


def make_selfsigned(hostname: str, cert_path: str, key_path: str, days: int = 365,
                    extra_names: tuple[str, ...] = ()) -> None:
    """
    Write a new EC P-256 key and a self-signed certificate for ``hostname``,
    ``extra_names`` and ``LOCAL_NAMES`` (subjectAltName: an iPAddress for each
    address, a dNSName for each other name).  Existing files are replaced
    atomically; the key file has mode 0600.

    @raise OSError: if a file cannot be written.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names = selfsigned_names(hostname, extra_names)
    certificate = _selfsigned_certificate(hostname, names, key, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a reloader that sees the new certificate finds its key ready.
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _subject_alt_names(hostname: str, names: list[str]) -> list[x509.GeneralName]:
    # The host name is always a dNSName too, as before: some old clients match an
    # address given as the host name against dNSNames only.
    general: list[x509.GeneralName] = [x509.DNSName(hostname)]
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if name != hostname:
                general.append(x509.DNSName(name))
    return general


def _selfsigned_certificate(
    hostname: str, names: list[str], key: ec.EllipticCurvePrivateKey, days: int
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(159) | 1)
        # Backdated a little so that clients with a slow clock accept it.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(hostname, names)), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
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
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
