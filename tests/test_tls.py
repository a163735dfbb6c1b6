"""
Tests for popgate.tls: loading and checking certificates, reload, TLS version
floor, implicit TLS and STARTTLS with the reloading creator, tls_description
and self-signed certificates.

Handshakes that only need the two TLS engines run in memory (Python's ssl
client over MemoryBIOs against the server's OpenSSL.SSL.Connection), so they
are deterministic; the ones that need real Twisted transports run against a
listener on 127.0.0.1 port 0 with a blocking ssl client in a thread.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import warnings
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from popgate import tls
from popgate.tls import (
    ReloadingServerTLS,
    TLSConfigError,
    check_certificate_files,
    load_certificate_options,
    make_selfsigned,
    tls_description,
    wrap_implicit_tls,
)
from tests.certs import PKIPaths, make_test_pki

HOSTNAME = "localhost"


# ---------------------------------------------------------------------------
# Helpers


class _FakeTLSProtocol:
    """Just enough of a TLSMemoryBIOProtocol for CertificateOptions' ALPN lookup."""

    factory = SimpleNamespace(wrappedFactory=None)


def _new_server_connection(creator) -> SSL.Connection:
    return creator.serverConnectionForTLS(_FakeTLSProtocol())


def _client_context(ca_path: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_path)  # check_hostname=True
    return context


def _move_bytes_to_client(server: SSL.Connection, incoming: ssl.MemoryBIO) -> None:
    while True:
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            return


def _handshake_in_memory(
    server: SSL.Connection, client_context: ssl.SSLContext, hostname: str = HOSTNAME
) -> ssl.SSLObject:
    """Complete a handshake between a Python ssl client and ``server``."""
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        to_server = outgoing.read()
        if to_server:  # pyOpenSSL treats an empty write as an error
            server.bio_write(to_server)
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except SSL.WantReadError:
                pass
        _move_bytes_to_client(server, incoming)
        if client_done and server_done:
            return client
    raise AssertionError("TLS handshake did not finish")


def _served_certificate(server: SSL.Connection, ca_path: str) -> x509.Certificate:
    client = _handshake_in_memory(server, _client_context(ca_path))
    return x509.load_der_x509_certificate(client.getpeercert(binary_form=True))


def _leaf_of(pki: PKIPaths) -> x509.Certificate:
    with open(pki.fullchain, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())[0]


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _replace_files(target: PKIPaths, source: PKIPaths) -> None:
    """Install another pair the way certbot does: rename over the old files."""
    os.replace(source.fullchain, target.fullchain)
    os.replace(source.key, target.key)


# ---------------------------------------------------------------------------
# Loading and checking


class LoadTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.pki = make_test_pki(self.dir, HOSTNAME)

    def assertConfigError(self, cert_path, key_path, path, reason_part):
        error = self.assertRaises(TLSConfigError, load_certificate_options, cert_path, key_path)
        self.assertEqual(error.path, path)
        self.assertTrue(str(error).startswith(f"{path}: "), str(error))
        self.assertIn(reason_part, str(error))
        self.assertNotIn("\n", str(error))
        return error

    def test_valid_pair_loads_and_verifies_for_hostname(self):
        options = load_certificate_options(self.pki.fullchain, self.pki.key)
        self.assertIsInstance(options, CertificateOptions)
        served = _served_certificate(_new_server_connection(options), self.pki.ca)
        self.assertEqual(served, _leaf_of(self.pki))

    def test_check_certificate_files_accepts_valid_pair(self):
        self.assertIsNone(check_certificate_files(self.pki.fullchain, self.pki.key))

    def test_check_certificate_files_rejects_like_load(self):
        missing = os.path.join(self.dir, "nope.pem")
        error = self.assertRaises(TLSConfigError, check_certificate_files, missing, self.pki.key)
        self.assertEqual(str(error), f"{missing}: file not found")

    def test_missing_certificate_file(self):
        missing = os.path.join(self.dir, "missing.pem")
        error = self.assertConfigError(missing, self.pki.key, missing, "file not found")
        self.assertEqual(str(error), f"{missing}: file not found")

    def test_missing_key_file(self):
        missing = os.path.join(self.dir, "missing-key.pem")
        self.assertConfigError(self.pki.fullchain, missing, missing, "file not found")

    def test_unreadable_file_permission_denied(self):
        if os.geteuid() == 0:
            raise unittest.SkipTest("root reads files whatever their mode")
        os.chmod(self.pki.key, 0)
        self.assertConfigError(self.pki.fullchain, self.pki.key, self.pki.key, "permission denied")

    def test_unreadable_file_permission_denied_reported(self):
        # Root ignores file modes, so make open() fail the way it does for others.
        def denying_open(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        tls.open = denying_open
        self.addCleanup(delattr, tls, "open")
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.fullchain, "permission denied"
        )

    def test_directory_instead_of_file(self):
        self.assertConfigError(self.dir, self.pki.key, self.dir, "is a directory")

    def test_empty_file(self):
        _write(self.pki.fullchain, b"")
        self.assertConfigError(self.pki.fullchain, self.pki.key, self.pki.fullchain, "empty")

    def test_garbage_is_not_pem(self):
        _write(self.pki.fullchain, b"\x00\x01 this is not a certificate\n" * 10)
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.fullchain, "not a PEM file"
        )

    def test_der_certificate_is_not_pem(self):
        der = _leaf_of(self.pki).public_bytes(encoding=serialization.Encoding.DER)
        _write(self.pki.fullchain, der)
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.fullchain, "not a PEM file"
        )

    def test_corrupt_certificate_block(self):
        _write(
            self.pki.fullchain,
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.fullchain, "certificate is not valid PEM"
        )

    def test_key_given_as_certificate(self):
        self.assertConfigError(
            self.pki.key,
            self.pki.key,
            self.pki.key,
            "contains no certificate (PEM blocks found: PRIVATE KEY)",
        )

    def test_certificate_given_as_key(self):
        self.assertConfigError(
            self.pki.fullchain, self.pki.fullchain, self.pki.fullchain, "contains no private key"
        )

    def test_corrupt_key_block(self):
        _write(self.pki.key, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.key, "private key is not valid PEM"
        )

    def test_passphrase_protected_key(self):
        key = serialization.load_pem_private_key(_read(self.pki.key), password=None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        _write(self.pki.key, encrypted)
        self.assertConfigError(self.pki.fullchain, self.pki.key, self.pki.key, "passphrase")

    def test_key_does_not_match_certificate(self):
        other = make_test_pki(os.path.join(self.dir, "other"), HOSTNAME)
        error = self.assertConfigError(self.pki.fullchain, other.key, other.key, "does not match")
        self.assertEqual(
            str(error),
            f"{other.key}: private key does not match the certificate in {self.pki.fullchain}",
        )

    def test_chain_with_intermediate_is_sent(self):
        pki = make_test_pki(os.path.join(self.dir, "chain"), HOSTNAME, intermediate=True)
        self.assertEqual(_read(pki.fullchain).count(b"BEGIN CERTIFICATE"), 2)
        options = load_certificate_options(pki.fullchain, pki.key)
        self.assertEqual(len(options.extraCertChain), 1)
        # The client trusts only the root, so this verifies only if the
        # server sends the intermediate.
        served = _served_certificate(_new_server_connection(options), pki.ca)
        self.assertEqual(served, _leaf_of(pki))

    def test_chain_leaf_not_first(self):
        pki = make_test_pki(os.path.join(self.dir, "chain"), HOSTNAME, intermediate=True)
        leaf, intermediate = x509.load_pem_x509_certificates(_read(pki.fullchain))
        _write(pki.fullchain, _pem(intermediate) + _pem(leaf))
        self.assertConfigError(
            pki.fullchain, pki.key, pki.fullchain, "belongs to certificate 2 of this file"
        )

    def test_chain_with_unrelated_certificate(self):
        other = make_test_pki(os.path.join(self.dir, "other"), HOSTNAME, intermediate=True)
        unrelated = x509.load_pem_x509_certificates(_read(other.fullchain))[1]
        _write(self.pki.fullchain, _read(self.pki.fullchain) + _pem(unrelated))
        self.assertConfigError(
            self.pki.fullchain, self.pki.key, self.pki.fullchain, "is not issued by certificate 2"
        )

    def test_combined_certificate_and_key_file(self):
        combined = os.path.join(self.dir, "combined.pem")
        _write(combined, _read(self.pki.fullchain) + _read(self.pki.key))
        load_certificate_options(combined, combined)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------
# TLS versions


class VersionFloorTests(unittest.TestCase):
    def setUp(self):
        self.pki = make_test_pki(self.mktemp(), HOSTNAME)
        self.options = load_certificate_options(self.pki.fullchain, self.pki.key)

    def _client_limited_to(self, maximum: ssl.TLSVersion) -> ssl.SSLContext:
        context = _client_context(self.pki.ca)
        # Let the client really offer old versions, so that a refusal is the
        # server's doing and not the client library's policy.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
        return context

    def _server_context_without_security_level(self, options: CertificateOptions) -> None:
        # OpenSSL's default security level refuses TLS 1.1 by itself; lower it
        # so that the test shows what the configured version floor does.
        options.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def test_tls11_client_is_refused(self):
        self._server_context_without_security_level(self.options)
        client = self._client_limited_to(ssl.TLSVersion.TLSv1_1)
        server = _new_server_connection(self.options)
        error = self.assertRaises(SSL.Error, _handshake_in_memory, server, client)
        self.assertIn("protocol", str(error))

    def test_tls11_client_would_work_without_the_floor(self):
        # Control for the test above: the same client does get TLS 1.1 from a
        # server whose floor has been lowered.
        material = tls._load_key_material(self.pki.fullchain, self.pki.key)
        lowered = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(material.key),
            certificate=crypto.X509.from_cryptography(material.leaf),
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
        )
        self._server_context_without_security_level(lowered)
        client = self._client_limited_to(ssl.TLSVersion.TLSv1_1)
        session = _handshake_in_memory(_new_server_connection(lowered), client)
        self.assertEqual(session.version(), "TLSv1.1")

    def test_tls12_client_is_accepted(self):
        client = self._client_limited_to(ssl.TLSVersion.TLSv1_2)
        session = _handshake_in_memory(_new_server_connection(self.options), client)
        self.assertEqual(session.version(), "TLSv1.2")

    def test_context_disables_tls10_and_tls11(self):
        current_options = self.options.getContext().set_options(0)
        self.assertTrue(current_options & SSL.OP_NO_TLSv1)
        self.assertTrue(current_options & SSL.OP_NO_TLSv1_1)


# ---------------------------------------------------------------------------
# Reload


class ReloadTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.pki = make_test_pki(self.dir, HOSTNAME)
        self.clock = Clock()
        self.creator = ReloadingServerTLS(
            self.pki.fullchain, self.pki.key, clock=self.clock, check_interval=1.0
        )
        self.original_leaf = _leaf_of(self.pki)

    def _new_pki(self, name: str) -> PKIPaths:
        # Same CA file location is not needed: each test verifies with the
        # CA of the pair it expects to see.
        return make_test_pki(os.path.join(self.dir, name), HOSTNAME)

    def _leaf_for_next_connection(self) -> x509.Certificate:
        return _new_server_connection(self.creator).get_certificate().to_cryptography()

    def _reload_errors(self, events):
        return [e for e in events if e["log_level"] == LogLevel.error]

    def test_construction_with_bad_files_raises(self):
        missing = os.path.join(self.dir, "missing.pem")
        self.assertRaises(TLSConfigError, ReloadingServerTLS, missing, self.pki.key, self.clock)

    def test_provides_server_connection_creator(self):
        from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

        self.assertTrue(IOpenSSLServerConnectionCreator.providedBy(self.creator))

    def test_change_picked_up_after_check_interval_old_session_unaffected(self):
        existing = _new_server_connection(self.creator)
        new = self._new_pki("new")
        new_leaf = _leaf_of(new)
        _replace_files(self.pki, new)

        self.clock.advance(0.5)
        self.assertEqual(self._leaf_for_next_connection(), self.original_leaf)

        self.clock.advance(0.5)
        self.assertEqual(self._leaf_for_next_connection(), new_leaf)
        served = _served_certificate(_new_server_connection(self.creator), new.ca)
        self.assertEqual(served, new_leaf)

        # The connection made before the reload still completes its handshake
        # with the context (and certificate) it was created with.
        self.assertIsNot(existing.get_context(), self.creator.options.getContext())
        self.assertEqual(_served_certificate(existing, self.pki.ca), self.original_leaf)

    def test_clock_set_backwards_still_checks(self):
        new = self._new_pki("new")
        new_leaf = _leaf_of(new)
        _replace_files(self.pki, new)
        self.clock.rightNow -= 3600
        self.assertEqual(self._leaf_for_next_connection(), new_leaf)

    def test_unchanged_files_are_not_reloaded(self):
        options = self.creator.options
        self.clock.advance(5)
        _new_server_connection(self.creator)
        self.assertIs(self.creator.options, options)

    def test_broken_replacement_keeps_old_and_logs_once(self):
        _write(self.pki.fullchain, b"garbage\n")
        with capturedLogs() as events:
            for _ in range(3):
                self.clock.advance(1)
                self.assertEqual(self._leaf_for_next_connection(), self.original_leaf)
        errors = self._reload_errors(events)
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{self.pki.fullchain}: not a PEM file", errors[0]["error"])

    def test_each_new_breakage_is_logged(self):
        with capturedLogs() as events:
            _write(self.pki.fullchain, b"garbage\n")
            self.clock.advance(1)
            self._leaf_for_next_connection()
            os.unlink(self.pki.fullchain)
            self.clock.advance(1)
            self._leaf_for_next_connection()
        errors = self._reload_errors(events)
        self.assertEqual(len(errors), 2)
        self.assertIn("file not found", errors[1]["error"])

    def test_certificate_then_key_replacement(self):
        # certbot-like: the certificate lands first and for a moment does not
        # match the key; the old pair serves until the key arrives.
        new = self._new_pki("new")
        os.replace(new.fullchain, self.pki.fullchain)
        with capturedLogs() as events:
            self.clock.advance(1)
            self.assertEqual(self._leaf_for_next_connection(), self.original_leaf)
            os.replace(new.key, self.pki.key)
            self.clock.advance(1)
            new_leaf = self._leaf_for_next_connection()
        self.assertNotEqual(new_leaf, self.original_leaf)
        self.assertIn("does not match", self._reload_errors(events)[0]["error"])
        infos = [e for e in events if e["log_level"] == LogLevel.info]
        self.assertEqual(len(infos), 1)
        self.assertEqual(infos[0]["cert_path"], self.pki.fullchain)

    def test_reload_forces_immediately(self):
        new = self._new_pki("new")
        new_leaf = _leaf_of(new)
        _replace_files(self.pki, new)
        self.assertTrue(self.creator.reload())
        self.assertEqual(self._leaf_for_next_connection(), new_leaf)

    def test_reload_failure_returns_false_and_keeps_old(self):
        _write(self.pki.key, b"garbage\n")
        with capturedLogs() as events:
            self.assertFalse(self.creator.reload())
        self.assertEqual(len(self._reload_errors(events)), 1)
        self.assertEqual(self._leaf_for_next_connection(), self.original_leaf)

    def test_get_context_is_current_context(self):
        new = self._new_pki("new")
        new_leaf = _leaf_of(new)
        _replace_files(self.pki, new)
        self.creator.reload()
        context = self.creator.getContext()
        self.assertIs(context, self.creator.options.getContext())
        served = SSL.Connection(context).get_certificate().to_cryptography()
        self.assertEqual(served, new_leaf)


# ---------------------------------------------------------------------------
# Real transports: implicit TLS, STARTTLS, tls_description


class _DescribeProtocol(LineReceiver):
    """Answers every line with tls_description() of its transport; STARTTLS starts TLS."""

    delimiter = b"\n"

    def connectionMade(self):
        self.factory.sessions.append(self)

    def lineReceived(self, line):
        if line.rstrip(b"\r") == b"STARTTLS":
            self.sendLine(b"GO")
            self.transport.startTLS(self.factory.creator)
        else:
            self.sendLine((tls_description(self.transport) or "none").encode())

    def connectionLost(self, reason):
        self.factory.closed.append(self)
        self.factory.on_close.callback(None)


class _DescribeFactory(Factory):
    protocol = _DescribeProtocol

    def __init__(self, creator):
        self.creator = creator
        self.sessions = []
        self.closed = []
        self.on_close = defer.Deferred()


def _read_line(sock) -> bytes:
    # One byte at a time, so nothing after the line (TLS records) is consumed.
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"connection closed after {line!r}")
        line += byte
    return line.rstrip(b"\r\n")


def _client_session(port: int, ca_path: str, starttls: bool) -> dict:
    """Blocking client, run in a thread: returns what it saw."""
    seen = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if starttls:
            raw.sendall(b"WHO\r\n")
            seen["plain"] = _read_line(raw).decode()
            raw.sendall(b"STARTTLS\r\n")
            seen["go"] = _read_line(raw).decode()
        with _client_context(ca_path).wrap_socket(raw, server_hostname=HOSTNAME) as secure:
            secure.sendall(b"WHO\r\n")
            seen["secure"] = _read_line(secure).decode()
            seen["client"] = f"{secure.version()} {secure.cipher()[0]}"
    return seen


class RealTransportTests(unittest.TestCase):
    def setUp(self):
        self.pki = make_test_pki(self.mktemp(), HOSTNAME)
        self.creator = ReloadingServerTLS(self.pki.fullchain, self.pki.key)
        self.factory = _DescribeFactory(self.creator)

    def _listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def _run_client(self, port: int, starttls: bool):
        seen = yield deferToThread(_client_session, port, self.pki.ca, starttls)
        # Wait for the server side to see the close, so no socket outlives the test.
        yield self.factory.on_close
        return seen

    @defer.inlineCallbacks
    def test_implicit_tls_description(self):
        port = self._listen(wrap_implicit_tls(self.factory, self.creator))
        seen = yield self._run_client(port, starttls=False)
        self.assertEqual(seen["secure"], seen["client"])
        self.assertRegex(seen["secure"], r"^TLSv1\.[23] [A-Z0-9_-]+$")

    @defer.inlineCallbacks
    def test_starttls_with_reloading_creator(self):
        port = self._listen(self.factory)
        seen = yield self._run_client(port, starttls=True)
        self.assertEqual(seen["plain"], "none")
        self.assertEqual(seen["go"], "GO")
        self.assertEqual(seen["secure"], seen["client"])
        self.assertRegex(seen["secure"], r"^TLSv1\.[23] [A-Z0-9_-]+$")


class DescriptionTests(unittest.TestCase):
    def test_string_transport(self):
        self.assertIsNone(tls_description(StringTransport()))

    def test_closed_tcp_transport(self):
        class ClosedTCPTransport:
            def getHandle(self):
                # What twisted.internet.tcp does once the socket is gone.
                raise AttributeError("socket")

        self.assertIsNone(tls_description(ClosedTCPTransport()))

    def test_object_without_anything(self):
        self.assertIsNone(tls_description(object()))

    def test_handshake_in_progress(self):
        pki = make_test_pki(self.mktemp(), HOSTNAME)
        creator = ReloadingServerTLS(pki.fullchain, pki.key, clock=Clock())
        tls_factory = wrap_implicit_tls(Factory.forProtocol(LineReceiver), creator)
        tls_protocol = tls_factory.buildProtocol(None)
        tls_protocol.makeConnection(StringTransport())
        self.assertEqual(tls_description(tls_protocol), "TLS (handshake in progress)")
        wrapped_transport = tls_protocol.wrappedProtocol.transport
        self.assertEqual(tls_description(wrapped_transport), "TLS (handshake in progress)")


# ---------------------------------------------------------------------------
# Self-signed


class SelfSignedTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")

    def _subject_alt_names(self) -> x509.SubjectAlternativeName:
        certificate = x509.load_pem_x509_certificate(_read(self.cert))
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    def test_output_loads_and_verifies_for_hostname(self):
        make_selfsigned("mail.example.org", self.cert, self.key)
        options = load_certificate_options(self.cert, self.key)
        client = _handshake_in_memory(
            _new_server_connection(options), _client_context(self.cert), "mail.example.org"
        )
        self.assertTrue(client.version().startswith("TLSv1."))
        self.assertEqual(
            self._subject_alt_names().get_values_for_type(x509.DNSName),
            ["mail.example.org", "localhost"],
        )

    def test_local_names_and_extra_names(self):
        # Local clients (curl --cacert, fetchmail on the server itself) verify it too.
        make_selfsigned("mail.example.org", self.cert, self.key,
                        extra_names=("pop.example.org", "192.0.2.7", "::1"))
        sans = self._subject_alt_names()
        self.assertEqual(sans.get_values_for_type(x509.DNSName),
                         ["mail.example.org", "pop.example.org", "localhost"])
        self.assertEqual([str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
                         ["192.0.2.7", "::1", "127.0.0.1"])
        options = load_certificate_options(self.cert, self.key)
        for name in ("localhost", "127.0.0.1", "pop.example.org"):
            _handshake_in_memory(
                _new_server_connection(options), _client_context(self.cert), name
            )

    def test_ip_address_gets_ip_san(self):
        make_selfsigned("127.0.0.1", self.cert, self.key)
        sans = self._subject_alt_names()
        self.assertEqual(
            [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)], ["127.0.0.1"]
        )
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["127.0.0.1", "localhost"])
        options = load_certificate_options(self.cert, self.key)
        _handshake_in_memory(
            _new_server_connection(options), _client_context(self.cert), "127.0.0.1"
        )

    def test_file_modes_and_no_leftovers(self):
        make_selfsigned("mail.example.org", self.cert, self.key)
        self.assertEqual(stat.S_IMODE(os.stat(self.key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.cert).st_mode), 0o644)
        self.assertEqual(sorted(os.listdir(self.dir)), ["cert.pem", "key.pem"])

    def test_validity_days(self):
        make_selfsigned("mail.example.org", self.cert, self.key, days=10)
        certificate = x509.load_pem_x509_certificate(_read(self.cert))
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self.assertAlmostEqual(lifetime.total_seconds(), (10 * 24 * 60 + 5) * 60, delta=5)

    def test_replaces_existing_files(self):
        make_selfsigned("one.example.org", self.cert, self.key)
        make_selfsigned("two.example.org", self.cert, self.key)
        self.assertEqual(
            self._subject_alt_names().get_values_for_type(x509.DNSName),
            ["two.example.org", "localhost"],
        )
        load_certificate_options(self.cert, self.key)
