"""End to end: TLS with real clients against a real ``twistd -n popgate`` process.

The server gets a certificate for ``localhost`` (with a subjectAltName) from a throwaway
test CA, STARTTLS/STLS on the plain listeners and an implicit-TLS listener for each
protocol (SMTPS, POP3S).  Covered here, beyond what test_e2e_smtp / test_e2e_pop3 do:

- ``openssl s_client`` with ``-starttls smtp``, ``-starttls pop3`` and implicit TLS on
  SMTPS and POP3S, verifying the chain and the host name; a command sent through it is
  answered inside TLS; a wrong host name fails verification; TLS 1.1 is refused.
- ``curl --ssl-reqd smtp://`` and ``curl smtps://`` delivering a message whose Received
  header says ``with ESMTPS (using TLSv1.x ...)``.
- ``fetchmail`` with ``sslcertck`` over STLS and over POP3S; a certificate for another
  name or from another CA makes it stop before it sends the user name.
- A certificate swapped on disk is used by new connections on every listener while a
  session opened before keeps working; a half-installed pair keeps the old certificate;
  SIGHUP reloads at once, and a SIGHUP on a mismatched pair keeps the old one; SIGHUP
  (systemd's ExecReload) must not stop a server that has no TLS configured.
- The plaintext-authentication policy: USER and SASL PLAIN are offered on loopback, and
  refused on a non-loopback address until STLS (when the machine has such an address).
- ``STARTTLS`` + ``RSET`` in one packet: the first reply inside TLS answers the EHLO.

A missing client program skips its test, except under CI (``CI`` set), where it fails
(:func:`tests.harness.require_tool`).
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import shlex
import signal
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.certs import PKIPaths, make_test_pki
from tests.harness import (
    ProxiedPOP3,
    deferred_sleep,
    read,
    read_reply,
    require_tool,
    run_client,
    start_twistd,
    write_private,
)

USER, PASSWORD = "alice@example.org", "pw"
TIMEOUT = 60
RELOAD_WAIT = 1.2  # ReloadingServerTLS looks at the files at most once a second

MESSAGES = [
    b"From: sender@example.net\nTo: alice@example.org\nSubject: first over TLS\n\nOne.\n",
    b"From: sender@example.net\nTo: alice@example.org\nSubject: second over TLS\n\n"
    b".a line starting with a dot\nTwo.\n",
]


# -- helpers --------------------------------------------------------------------------





def leaf_der(fullchain: str) -> bytes:
    """The server certificate (the first of the chain file), DER-encoded."""
    leaf = x509.load_pem_x509_certificates(read(fullchain))[0]
    return leaf.public_bytes(serialization.Encoding.DER)


def verifying_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def tls_session(kind: str, port: int, cafile: str, hostname: str = "localhost",
                address: str = "127.0.0.1") -> bytes:
    """Open a TLS session to one listener the way its clients do, end it with QUIT inside
    TLS, and return the certificate the server presented (DER).

    ``kind`` is the listener: "SMTP" and "POP3" upgrade with STARTTLS / STLS, "SMTPS" and
    "POP3S" are TLS from the first byte.  Verification against ``cafile`` and
    ``hostname`` failing raises ``ssl.SSLCertVerificationError``.  Blocking: run it in a
    thread.
    """
    context = verifying_context(cafile)
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw:
        plain = raw.makefile("rb")
        if kind == "POP3":
            assert plain.readline().startswith(b"+OK ")
            raw.sendall(b"STLS\r\n")
            assert plain.readline() == b"+OK Begin TLS negotiation\r\n"
        elif kind == "SMTP":
            assert read_reply(plain).startswith(b"220 ")
            raw.sendall(b"EHLO client.test\r\n")
            assert b"STARTTLS" in read_reply(plain)
            raw.sendall(b"STARTTLS\r\n")
            assert read_reply(plain) == b"220 2.0.0 Ready to start TLS\r\n"
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            stream = tls.makefile("rb")
            if kind == "POP3S":
                assert stream.readline().startswith(b"+OK ")
            elif kind == "SMTPS":
                assert read_reply(stream).startswith(b"220 ")
            tls.sendall(b"QUIT\r\n")
            answer = stream.readline()
            assert answer.startswith(b"221 " if kind.startswith("SMTP") else b"+OK "), answer
            return tls.getpeercert(binary_form=True)


def replace_atomically(source: str, destination: str) -> None:
    """Install ``source``'s bytes at ``destination`` as certificate tools do: write a
    temporary file next to it, then rename it over the old one."""
    temporary = destination + ".new"
    with open(temporary, "wb") as f:
        f.write(read(source))
    os.replace(temporary, destination)


@defer.inlineCallbacks
def wait_for_log(testcase: TestCase, server, pattern: bytes, count: int = 1):
    """Wait up to 10 s until ``pattern`` (a regex) has matched ``count`` times in the
    server's log: a session's closing line is written after the client has gone."""
    for _ in range(100):
        if len(re.findall(pattern, server.log)) >= count:
            return
        yield deferred_sleep(0.1)
    testcase.fail(f"{pattern!r} not {count} times in the log:\n"
                  + server.log.decode("utf-8", "replace"))


# -- the server -----------------------------------------------------------------------


class TLSServerTestCase(TestCase):
    """A popgate with the test CA's certificate for localhost, STARTTLS/STLS on the plain
    listeners and one implicit-TLS listener per protocol; alice has two messages."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.pki = make_test_pki(os.path.abspath(self.mktemp()), "localhost")
        self.server = yield start_twistd(self, users=[(USER, PASSWORD)],
                                         settings=self.make_settings())

    def make_settings(self) -> dict:
        return {"tls": {"certificate": self.pki.fullchain, "key": self.pki.key},
                "smtp": {"tls_listen": ["tcp:0:interface=127.0.0.1"]},
                "pop3": {"tls_listen": ["tcp:0:interface=127.0.0.1"]}}

    def path(self, name: str) -> str:
        return os.path.join(self.server.directory, name)

    def other_pki(self, name: str = "other") -> PKIPaths:
        """A certificate for localhost from another, unrelated test CA."""
        return make_test_pki(self.path(name), "localhost")

    def deliver(self, messages=MESSAGES) -> None:
        self.server.store(USER, messages)
        self.assertEqual(len(self.server.messages(USER)), len(messages))


# -- openssl s_client ---------------------------------------------------------------


class OpenSSLClientTests(TLSServerTestCase):
    """``openssl s_client`` verifying the chain and the name, on all four listeners."""

    # What to type through s_client, and what must come back inside TLS.  -starttls
    # does its own EHLO/STLS in plaintext without printing the replies, so every reply
    # s_client prints after the handshake was sent inside TLS.
    SMTP_INPUT, SMTP_OUTPUT = b"EHLO x\nQUIT\n", [b"250-mx.test\n", b"221 2.0.0 Bye\n"]
    POP3_INPUT = b"CAPA\nQUIT\n"
    POP3_OUTPUT = [b"+OK Capability list follows\n", b"\nUSER\n", b"+OK popgate signing off"]

    def s_client(self, label: str, starttls: str | None, stdin: bytes,
                 hostname: str = "localhost", extra=()) -> defer.Deferred:
        require_tool("openssl")
        args = ["openssl", "s_client", "-connect", f"localhost:{self.server.port(label)}",
                "-CAfile", self.pki.ca, "-verify_hostname", hostname, "-verify_return_error",
                # -ign_eof: keep reading after stdin ends (the server closes after QUIT),
                # and do not take a line starting with Q as s_client's own "quit".
                "-crlf", "-ign_eof", *extra]
        if starttls:
            args += ["-starttls", starttls]
        return run_client(args, stdin=stdin, timeout=TIMEOUT)

    def assertAnsweredInsideTLS(self, out: bytes, expected: list[bytes]) -> None:
        out = out.replace(b"\r\n", b"\n")
        handshake, marker, inside = out.partition(b"Verify return code: 0 (ok)\n---\n")
        self.assertTrue(marker, out.decode("utf-8", "replace"))
        self.assertIn(b"Verification: OK\nVerified peername: localhost\n", handshake)
        self.assertIn(b"-----BEGIN CERTIFICATE-----", handshake)
        for text in expected:
            self.assertIn(text, inside)
        self.assertNotIn(b"STARTTLS", inside)
        self.assertNotIn(b"\nSTLS\n", inside)

    @defer.inlineCallbacks
    def test_starttls_smtp(self):
        out, err, code = yield self.s_client("SMTP", "smtp", self.SMTP_INPUT)
        self.assertEqual(code, 0, out + err)
        self.assertAnsweredInsideTLS(out, self.SMTP_OUTPUT)

    @defer.inlineCallbacks
    def test_implicit_tls_smtps(self):
        out, err, code = yield self.s_client("SMTPS", None, self.SMTP_INPUT)
        self.assertEqual(code, 0, out + err)
        self.assertAnsweredInsideTLS(out, [b"220 mx.test ESMTP", *self.SMTP_OUTPUT])

    @defer.inlineCallbacks
    def test_starttls_pop3(self):
        out, err, code = yield self.s_client("POP3", "pop3", self.POP3_INPUT)
        self.assertEqual(code, 0, out + err)
        self.assertAnsweredInsideTLS(out, self.POP3_OUTPUT)

    @defer.inlineCallbacks
    def test_implicit_tls_pop3s(self):
        out, err, code = yield self.s_client("POP3S", None, self.POP3_INPUT)
        self.assertEqual(code, 0, out + err)
        self.assertAnsweredInsideTLS(out, [b"+OK popgate ready", *self.POP3_OUTPUT])

    @defer.inlineCallbacks
    def test_wrong_hostname_fails_verification(self):
        for label, starttls, stdin in [("SMTP", "smtp", self.SMTP_INPUT),
                                       ("SMTPS", None, self.SMTP_INPUT),
                                       ("POP3", "pop3", self.POP3_INPUT),
                                       ("POP3S", None, self.POP3_INPUT)]:
            out, err, code = yield self.s_client(label, starttls, stdin,
                                                 hostname="wrong.example")
            self.assertNotEqual(code, 0, label)
            self.assertIn(b"Verify return code: 62 (hostname mismatch)", out, label)
            self.assertIn(b"verify error:num=62:hostname mismatch", err, label)
            # -verify_return_error: the handshake was abandoned, nothing was sent.
            for reply in (b"250-mx.test", b"221 ", b"Capability list", b"signing off"):
                self.assertNotIn(reply, out, label)

    @defer.inlineCallbacks
    def test_tls_1_1_is_refused_and_tls_1_2_accepted(self):
        # SECLEVEL=0 so that our own OpenSSL is willing to offer TLS 1.1: the refusal
        # must come from the server, as a protocol_version alert.
        old = ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]
        for label, starttls in [("SMTP", "smtp"), ("POP3S", None)]:
            out, err, code = yield self.s_client(label, starttls, b"QUIT\n", extra=old)
            self.assertNotEqual(code, 0, label)
            self.assertIn(b"alert protocol version", err, label)
            out, err, code = yield self.s_client(label, starttls, b"QUIT\n",
                                                 extra=["-tls1_2"])
            self.assertEqual(code, 0, out + err)
            self.assertIn(b"Protocol  : TLSv1.2", out, label)

    @defer.inlineCallbacks
    def test_tls_1_2_offers_only_forward_secret_aead_ciphers(self):
        # Mozilla "intermediate": a CBC suite is refused in TLS 1.2 by the server (a
        # handshake failure alert, not a client-side "no ciphers available"), an AEAD
        # suite is accepted, and TLS 1.3 still works.
        for label, starttls in [("SMTP", "smtp"), ("POP3S", None)]:
            out, err, code = yield self.s_client(
                label, starttls, b"QUIT\n", extra=["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"])
            self.assertNotEqual(code, 0, label)
            self.assertIn(b"alert handshake failure", err, label)
            for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
                out, err, code = yield self.s_client(
                    label, starttls, b"QUIT\n", extra=["-tls1_2", "-cipher", cipher])
                self.assertEqual(code, 0, out + err)
                self.assertIn(f"Cipher is {cipher}".encode(), out, label)
            out, err, code = yield self.s_client(label, starttls, b"QUIT\n", extra=["-tls1_3"])
            self.assertEqual(code, 0, out + err)
            self.assertIn(b"Protocol  : TLSv1.3", out, label)


# -- curl SMTP ------------------------------------------------------------------------


class CurlSMTPTests(TLSServerTestCase):
    MESSAGE = (b"From: a@remote.example\r\nTo: alice@example.org\r\nSubject: curl tls\r\n"
               b"\r\nSent by curl.\r\n")

    def curl(self, url: str, cacert: str) -> defer.Deferred:
        require_tool("curl")
        upload = self.path("curl-message.txt")
        with open(upload, "wb") as f:
            f.write(self.MESSAGE)
        # The URL's path is the EHLO name.
        return run_client(["curl", "--silent", "--show-error", "--max-time", str(TIMEOUT),
                           "--cacert", cacert, "--mail-from", "a@remote.example",
                           "--mail-rcpt", USER, "--upload-file", upload,
                           "--ssl-reqd", url + "/client.test"])

    @defer.inlineCallbacks
    def assertDeliveredOverTLS(self):
        [path] = self.server.messages(USER)
        stored = read(path)
        received = stored.replace(b"\n\t", b" ").split(b"\n")[2]
        self.assertRegex(received, rb"^Received: from client\.test \(unknown \[127\.0\.0\.1\]\)"
                                   rb" by mx\.test \(popgate\) with ESMTPS id \w+ "
                                   rb"\(using TLSv1\.[23] with cipher \S+\) for "
                                   rb"<alice@example\.org>; ")
        self.assertTrue(stored.endswith(b"Subject: curl tls\n\nSent by curl.\n"), stored)
        yield wait_for_log(self, self.server,
                           rb"closed \(quit\): 1 message\(s\) accepted TLSv1\.[23] ")

    @defer.inlineCallbacks
    def test_starttls_smtp(self):
        out, err, code = yield self.curl(f"smtp://localhost:{self.server.port('SMTP')}",
                                         self.pki.ca)
        self.assertEqual(code, 0, out + err)
        yield self.assertDeliveredOverTLS()

    @defer.inlineCallbacks
    def test_implicit_tls_smtps(self):
        out, err, code = yield self.curl(f"smtps://localhost:{self.server.port('SMTPS')}",
                                         self.pki.ca)
        self.assertEqual(code, 0, out + err)
        yield self.assertDeliveredOverTLS()

    @defer.inlineCallbacks
    def test_untrusted_certificate_sends_nothing(self):
        stranger = self.other_pki()
        for scheme, label in [("smtp", "SMTP"), ("smtps", "SMTPS")]:
            out, err, code = yield self.curl(
                f"{scheme}://localhost:{self.server.port(label)}", stranger.ca)
            self.assertEqual(code, 60, out + err)  # CURLE_PEER_FAILED_VERIFICATION
        self.assertEqual(self.server.messages(USER), [])


# -- fetchmail ------------------------------------------------------------------------


class FetchmailTLSTests(TLSServerTestCase):
    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.deliver())
        return d

    def fetchmail(self, poll: str, port: int, options: str, cafile: str) -> defer.Deferred:
        """Run fetchmail once (verbose, in the foreground), delivering each message to a
        file of its own in ``fetched/`` through an MDA script."""
        require_tool("fetchmail")
        home = self.path("fetchmail-home")
        fetched = self.path("fetched")
        os.makedirs(home, exist_ok=True)
        os.makedirs(fetched, exist_ok=True)
        mda = self.path("deliver.sh")
        with open(mda, "w") as f:
            f.write(f'#!/bin/sh\nexec cat > {shlex.quote(fetched)}/msg.$$\n')
        os.chmod(mda, 0o755)
        rc = write_private(self.path("fetchmailrc"), (
            f'poll {poll} protocol POP3 port {port}\n'
            f'  user "{USER}" there with password "{PASSWORD}" is "someone" here\n'
            f'  options nokeep sslcertck sslcertfile "{cafile}" {options}\n'
            f'  mda "{mda}"\n'))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HOME=home, FETCHMAILHOME=home)
        return run_client(["fetchmail", "--verbose", "--nodetach", "--nosyslog", "-f", rc,
                           "--pidfile", os.path.join(home, "pid"),
                           "--idfile", os.path.join(home, "ids")], env=env, timeout=TIMEOUT)

    def fetched(self) -> list[bytes]:
        directory = self.path("fetched")
        return sorted(read(os.path.join(directory, name)) for name in os.listdir(directory))

    def assertFetchedEverything(self, out: bytes) -> None:
        self.assertIn(b"SSL/TLS: using protocol TLSv1.", out)
        fetched = self.fetched()
        self.assertEqual(len(fetched), len(MESSAGES), out)
        for message in MESSAGES:  # fetchmail adds its own Received header on top
            self.assertEqual(sum(m.endswith(message) for m in fetched), 1, (message, fetched))
        self.assertEqual(self.server.messages(USER), [], "deleted at QUIT, inside TLS")

    @defer.inlineCallbacks
    def test_stls_with_sslcertck(self):
        # A TLS sslproto makes STLS mandatory: no fallback to plaintext.
        out, err, code = yield self.fetchmail("localhost", self.server.port("POP3"),
                                              'sslproto "TLS1.2+"', self.pki.ca)
        self.assertEqual(code, 0, out + err)
        before_tls, _, after_tls = out.partition(b"POP3< +OK Begin TLS negotiation")
        self.assertIn(b"POP3> STLS", before_tls)
        self.assertNotIn(b"POP3> USER", before_tls)
        self.assertIn(b"localhost: upgrade to TLS succeeded.", after_tls)
        self.assertIn(b"POP3> USER alice@example.org", after_tls)
        self.assertFetchedEverything(out)
        # fetchmail reads with TOP n 99999999 when it deletes: "retrieved" counts RETR.
        yield wait_for_log(self, self.server,
                           rb"user=alice@example\.org retr=\d+/\d+ del=2/\d+ TLS ")

    @defer.inlineCallbacks
    def test_implicit_tls_pop3s_with_sslcertck(self):
        out, err, code = yield self.fetchmail("localhost", self.server.port("POP3S"),
                                              "ssl", self.pki.ca)
        self.assertEqual(code, 0, out + err)
        self.assertNotIn(b"POP3> STLS", out)
        self.assertFetchedEverything(out)

    @defer.inlineCallbacks
    def test_certificate_for_another_name_or_ca_stops_before_the_password(self):
        stranger = self.other_pki()
        cases = [  # the certificate names localhost, not 127.0.0.1
            ("127.0.0.1", "POP3", 'sslproto "TLS1.2+"', self.pki.ca,
             b"Server certificate verification error: hostname mismatch"),
            ("127.0.0.1", "POP3S", "ssl", self.pki.ca,
             b"Server certificate verification error: hostname mismatch"),
            ("localhost", "POP3", 'sslproto "TLS1.2+"', stranger.ca,
             b"Server certificate verification error"),
        ]
        for poll, label, options, cafile, complaint in cases:
            out, err, code = yield self.fetchmail(poll, self.server.port(label), options,
                                                  cafile)
            self.assertEqual(code, 2, out + err)  # PS_SOCKET
            self.assertIn(complaint, out + err)
            self.assertNotIn(b"POP3> USER", out)
            self.assertNotIn(b"POP3> PASS", out)
        self.assertEqual(self.fetched(), [])
        self.assertEqual(len(self.server.messages(USER)), len(MESSAGES))


# -- certificate reload ---------------------------------------------------------------


class CertificateReloadTests(TLSServerTestCase):
    LABELS = ("POP3", "POP3S", "SMTP", "SMTPS")

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.deliver())
        return d

    def presented(self, label: str, cafile: str) -> defer.Deferred:
        return threads.deferToThread(tls_session, label, self.server.port(label), cafile)

    @defer.inlineCallbacks
    def assertPresents(self, pki: PKIPaths, refused_ca: str) -> None:
        """Every TLS listener presents ``pki``'s certificate to a new connection, which
        verifies with ``pki``'s CA and not with ``refused_ca``."""
        for label in self.LABELS:
            try:
                der = yield self.presented(label, pki.ca)
            except ssl.SSLCertVerificationError as e:
                self.fail(f"{label}: a new connection did not get the new certificate: {e}")
            self.assertEqual(der, leaf_der(pki.fullchain), label)
            with self.assertRaises(ssl.SSLCertVerificationError):
                yield self.presented(label, refused_ca)

    def reload_messages(self, outcome: bytes) -> int:
        return self.server.log.count(b"TLS certificate " + outcome)

    def wait_for_log(self, outcome: bytes, count: int) -> defer.Deferred:
        return wait_for_log(self, self.server, b"TLS certificate " + outcome, count)

    def open_old_session(self) -> defer.Deferred:
        def session():
            client = poplib.POP3("localhost", self.server.port("POP3"), timeout=TIMEOUT)
            client.stls(verifying_context(self.pki.ca))
            client.user(USER)
            client.pass_(PASSWORD)
            return client
        return threads.deferToThread(session)

    @defer.inlineCallbacks
    def test_swap_on_disk_new_connections_get_it_old_session_keeps_working(self):
        a = self.pki
        # A chain with an intermediate, as public CAs issue them: clients that trust only
        # the root verify it only if the server sends the intermediate too.
        b = make_test_pki(self.path("b"), "localhost", intermediate=True)
        old = yield self.open_old_session()
        self.addCleanup(old.close)
        self.assertEqual(old.sock.getpeercert(binary_form=True), leaf_der(a.fullchain))

        replace_atomically(b.key, a.key)
        replace_atomically(b.fullchain, a.fullchain)
        yield deferred_sleep(RELOAD_WAIT)
        yield self.assertPresents(b, refused_ca=a.ca)
        yield self.wait_for_log(b"reloaded", 1)
        self.assertEqual(self.reload_messages(b"reloaded"), 1)

        def carry_on():
            stat = old.stat()
            body = old.retr(2)[1]
            old.dele(1)
            return stat, body, old.quit()
        stat, body, quit_answer = yield threads.deferToThread(carry_on)
        self.assertEqual(stat[0], len(MESSAGES))
        self.assertEqual(b"\n".join(body) + b"\n", MESSAGES[1])
        self.assertEqual(quit_answer, b"+OK popgate signing off (1 message deleted)")
        self.assertEqual(len(self.server.messages(USER)), len(MESSAGES) - 1)

    @defer.inlineCallbacks
    def test_half_installed_pair_keeps_the_old_certificate(self):
        a = self.pki
        b = self.other_pki(name="b")
        a_leaf = leaf_der(a.fullchain)
        # The certificate first, the key a moment later: in between they do not match.
        replace_atomically(b.fullchain, a.fullchain)
        yield deferred_sleep(RELOAD_WAIT)
        der = yield self.presented("POP3S", a.ca)
        self.assertEqual(der, a_leaf)
        yield self.wait_for_log(b"not reloaded, .* private key does not match", 1)
        yield deferred_sleep(RELOAD_WAIT)
        der = yield self.presented("SMTP", a.ca)
        self.assertEqual(der, a_leaf)
        self.assertEqual(self.reload_messages(b"not reloaded"), 1, "logged once per change")

        replace_atomically(b.key, a.key)
        yield deferred_sleep(RELOAD_WAIT)
        yield self.assertPresents(b, refused_ca=a.ca)
        yield self.wait_for_log(b"reloaded", 1)
        self.assertEqual(self.reload_messages(b"reloaded"), 1)

    @defer.inlineCallbacks
    def test_sighup_reloads_at_once(self):
        a = self.pki
        b = self.other_pki(name="b")
        a_leaf = leaf_der(a.fullchain)

        # A mismatched pair on SIGHUP: refused, logged, the old certificate stays.
        replace_atomically(b.key, a.key)
        os.kill(self.server.pid, signal.SIGHUP)
        yield self.wait_for_log(b"not reloaded", 1)
        der = yield self.presented("SMTPS", a.ca)
        self.assertEqual(der, a_leaf)

        # Completed: SIGHUP installs it with no connection needed to notice the change.
        replace_atomically(b.fullchain, a.fullchain)
        os.kill(self.server.pid, signal.SIGHUP)
        yield self.wait_for_log(b"reloaded", 1)
        yield self.assertPresents(b, refused_ca=a.ca)
        self.assertEqual(self.reload_messages(b"reloaded"), 1)


# -- plaintext policy -----------------------------------------------------------------


def capabilities_and_login(port: int, cafile: str):
    """CAPA, then USER, PASS and AUTH PLAIN in plaintext, then STLS, CAPA and a login."""
    client = ProxiedPOP3("127.0.0.1", port, timeout=TIMEOUT)
    before = client.capa()
    refusals = []
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for command in (f"USER {USER}", f"PASS {PASSWORD}", f"AUTH PLAIN {plain}"):
        try:
            refusals.append(client._shortcmd(command))
        except poplib.error_proto as e:
            refusals.append(e.args[0])
    client.host = "localhost"  # the name to verify: the certificate's, not the address
    client.stls(verifying_context(cafile))
    after = client.capa()
    client.user(USER)
    client.pass_(PASSWORD)
    stat = client.stat()
    client.quit()
    return before, refusals, after, stat


class PlaintextPolicyTests(TLSServerTestCase):
    @defer.inlineCallbacks
    def test_loopback_offers_plaintext_login(self):
        def session():
            client = poplib.POP3("127.0.0.1", self.server.port("POP3"), timeout=TIMEOUT)
            capabilities = client.capa()
            client.user(USER)
            answer = client.pass_(PASSWORD)
            client.quit()
            return capabilities, answer
        capabilities, answer = yield threads.deferToThread(session)
        self.assertIn("USER", capabilities)
        self.assertEqual(capabilities["SASL"], ["PLAIN"])
        self.assertIn("STLS", capabilities)
        self.assertTrue(answer.startswith(b"+OK"), answer)


class NonLoopbackPlaintextPolicyTests(TLSServerTestCase):
    """A client that is not on loopback: USER, PASS and AUTH PLAIN are neither offered
    nor accepted until STLS.  All traffic stays on loopback: the listener speaks the
    PROXY protocol, whose header makes the session's peer 203.0.113.9 (TEST-NET-3)."""

    def make_settings(self) -> dict:
        settings = super().make_settings()
        settings["pop3"] = {"listen": ["haproxy:tcp:0:interface=127.0.0.1"]}
        settings["limits"] = {"trusted_proxies": ["127.0.0.1/32"]}
        return settings

    @defer.inlineCallbacks
    def test_plaintext_login_refused_until_stls(self):
        before, refusals, after, stat = yield threads.deferToThread(
            capabilities_and_login, self.server.port("POP3"), self.pki.ca)
        self.assertNotIn("USER", before)
        self.assertNotIn("SASL", before)
        self.assertIn("STLS", before)
        refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connection"
        self.assertEqual(refusals, [refused] * 3)
        self.assertIn("USER", after)
        self.assertEqual(after["SASL"], ["PLAIN"])
        self.assertNotIn("STLS", after)
        self.assertEqual(stat, (0, 0))


class UntrustedProxyTests(TLSServerTestCase):
    """A PROXY header is taken only from a trusted proxy (DESIGN.md): anyone else could
    name a loopback client address and get plaintext logins."""

    def make_settings(self) -> dict:
        settings = super().make_settings()
        settings["pop3"] = {"listen": ["haproxy:tcp:0:interface=127.0.0.1"]}
        settings["limits"] = {"trusted_proxies": ["192.0.2.0/24"]}
        return settings

    @defer.inlineCallbacks
    def test_connection_from_an_untrusted_peer_is_dropped(self):
        def session():
            with socket.create_connection(("127.0.0.1", self.server.port("POP3")),
                                          timeout=TIMEOUT) as sock:
                sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 110\r\nCAPA\r\n")
                return sock.recv(4096)
        self.assertEqual((yield threads.deferToThread(session)), b"")
        yield wait_for_log(self, self.server, rb"dropped connection from 127\.0\.0\.1: "
                                              rb"not a trusted proxy")


# -- STARTTLS command injection -------------------------------------------------------


class SMTPInjectionTests(TLSServerTestCase):
    @defer.inlineCallbacks
    def test_rset_pipelined_behind_starttls_is_not_answered_inside_tls(self):
        def session():
            port = self.server.port("SMTP")
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                plain = sock.makefile("rb", buffering=0)  # consume nothing past the 220
                read_reply(plain)
                sock.sendall(b"EHLO client.test\r\n")
                read_reply(plain)
                sock.sendall(b"STARTTLS\r\nRSET\r\n")  # one packet
                answer = read_reply(plain)
                context = verifying_context(self.pki.ca)
                with context.wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(b"EHLO client.test\r\n")
                    replies = tls.makefile("rb")
                    first = read_reply(replies)
                    tls.sendall(b"QUIT\r\n")
                    return answer, first, read_reply(replies)
        answer, first, bye = yield threads.deferToThread(session)
        self.assertEqual(answer, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(first.startswith(b"250-mx.test\r\n"), first)
        self.assertNotIn(b"STARTTLS", first)
        self.assertEqual(bye, b"221 2.0.0 Bye\r\n")


# -- SIGHUP without TLS ---------------------------------------------------------------


class SighupWithoutTLSTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sighup_does_not_stop_a_server_without_tls(self):
        # popgate/data/systemd/popgate.service reloads with SIGHUP whatever the configuration, and
        # systemd does not restart a service that SIGHUP ended (Restart=on-failure).
        server = yield start_twistd(self, users=[(USER, PASSWORD)])
        os.kill(server.pid, signal.SIGHUP)
        yield deferred_sleep(0.5)
        self.assertFalse(server.process.ended.called,
                         "twistd exited on SIGHUP:\n" + server.log.decode("utf-8", "replace"))

        def greeting():
            with socket.create_connection(("127.0.0.1", server.port("POP3")),
                                          timeout=TIMEOUT) as sock:
                return sock.makefile("rb").readline()
        self.assertTrue((yield threads.deferToThread(greeting)).startswith(b"+OK "))
