"""Direct delivery (``relay.mode = "mx"``) against a DNS server and MX hosts on loopback.

The DNS server is ``twisted.names`` (tests/dnszone.py) serving MX, A, null-MX and DKIM
TXT records; the MX hosts are scripted sinks (tests/smtpsink.py), each on its own
loopback address (127.0.0.2...) and all on one port, the server's ``relay.mx_port``.
End to end, a real ``twistd popgate`` relays what smtplib submits:

- routing: MX preference order, fallback on a ``421`` greeting and on a refused
  connection, the A record when there is no MX, a null MX and a loop bounced at once
  (one DSN in the sender's Maildir), one session per domain for all its recipients;
- DKIM: what an MX received verifies with ``dkim.verify`` against the key record the
  DNS server publishes, a tampered body does not; ``Message-ID`` and ``Date`` were added;
- TLS: STARTTLS to an MX with a certificate nobody vouches for (delivered, logged as not
  verified); ``mx_tls = "required"`` against an MX without STARTTLS (kept, then bounced).
"""

from __future__ import annotations

import os
import re
import smtplib
import time

import dkim
from twisted.internet import defer, reactor, ssl, task, threads
from twisted.names import client as names
from twisted.names import dns
from twisted.trial.unittest import TestCase

from popgate.relay import mx, sign
from popgate.relay.client import SmarthostError
from tests.certs import make_test_pki
from tests.dnszone import Zone, serve, txt
from tests.harness import start_twistd
from tests.smtpsink import Sink
from tests.test_e2e_submission import ALICE, PASSWORD, TIMEOUT, USERS, RelayServerMixin, stored


def A(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def MX(preference: int, name: str) -> dns.Record_MX:
    return dns.Record_MX(preference, name.encode("ascii"))


ZONE = {
    "pref.example": [MX(20, "mxb.pref.example"), MX(10, "mxa.pref.example")],
    "mxa.pref.example": [A("127.0.0.2")],
    "mxb.pref.example": [A("127.0.0.3")],
    "busy.example": [MX(5, "mx.busy.example"), MX(10, "down.busy.example"),
                     MX(20, "mxb.pref.example")],
    "mx.busy.example": [A("127.0.0.4")],  # greets 421
    "down.busy.example": [A("127.0.0.5")],  # nothing listens
    "bare.example": [A("127.0.0.3")],  # no MX: the A record is the MX
    "null.example": [MX(0, "")],  # RFC 7505: "0 ."
    "loop.example": [MX(10, "mx.test")],  # the server's own name (tests/harness.py)
}


def resolver(port: int):
    return names.Resolver(servers=[("127.0.0.1", port)])


def submit(server, recipients, message: bytes):
    def send():
        with smtplib.SMTP("127.0.0.1", server.port("SUBMISSION"), timeout=TIMEOUT) as c:
            c.login(ALICE, PASSWORD)
            return c.sendmail(ALICE, recipients, message)
    return threads.deferToThread(send)


class RouteTests(TestCase):
    """:func:`popgate.relay.mx.mx_hosts` against the DNS server, without SMTP."""

    def setUp(self):
        self.resolver = resolver(serve(self, Zone("example", ZONE)))

    @defer.inlineCallbacks
    def test_preference_order_implicit_mx_null_mx_and_no_such_domain(self):
        hosts = yield defer.ensureDeferred(mx.mx_hosts(self.resolver, "pref.example"))
        self.assertEqual(hosts, ["mxa.pref.example", "mxb.pref.example"])
        hosts = yield defer.ensureDeferred(mx.mx_hosts(self.resolver, "bare.example"))
        self.assertEqual(hosts, ["bare.example"])
        addresses = yield defer.ensureDeferred(mx.addresses(self.resolver, "bare.example"))
        self.assertEqual(addresses, ["127.0.0.3"])
        for domain, text in (("null.example", "556 5.1.10"), ("nowhere.example", "550 5.1.2"),
                             ("bücher.example", "550 5.1.2"), ("a..example", "550 5.1.2")):
            e = yield self.assertFailure(
                defer.ensureDeferred(mx.mx_hosts(self.resolver, domain)),
                mx.PermanentRouteError)
            self.assertTrue(str(e).startswith(text), str(e))


class PrepareTests(TestCase):
    """:func:`popgate.relay.sign.prepare`: what submission changes in a message."""

    TRACE = b"Received: from client\n\tby mx.test; now\n"

    def prepare(self, content: bytes, key_dir=None, warnings=None) -> bytes:
        return sign.prepare(self.TRACE + content, len(self.TRACE), message_id="Q1",
                            hostname="mx.test", now=0.0, key_dir=key_dir,
                            warn=(warnings if warnings is not None else []).append)

    def test_message_id_and_date_are_added_only_when_missing(self):
        complete = (b"Date: Thu, 1 Jan 2026 00:00:00 +0000\nmessage-id: <own@example.org>\n"
                    b"From: alice@example.org\n\nbody\n")
        self.assertEqual(self.prepare(complete), self.TRACE + complete, "no key: unchanged")
        added = self.prepare(b"From: alice@example.org\n\nbody\n")
        self.assertRegex(added, rb"^Received: from client\n\tby mx.test; now\n"
                                rb"Message-ID: <Q1\.[0-9a-f]{8}@mx\.test>\n"
                                rb"Date: Thu, 01 Jan 1970 \d\d:00:00 [+-]\d{4}\n"
                                rb"From: alice@example.org\n\nbody\n$")

    def test_only_a_from_domain_with_a_key_is_signed_and_a_bad_key_is_a_warning(self):
        key_dir = self.mktemp()
        sign.keygen(key_dir, "example.org", "s1", "ed25519")
        message = b"From: bob@example.net\nSubject: x\n\nbody\n"
        self.assertFalse(self.prepare(message, key_dir).startswith(b"DKIM-Signature:"))
        signed = self.prepare(message.replace(b"example.net", b"Example.ORG"), key_dir)
        self.assertTrue(signed.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; "
                                          b"c=relaxed/relaxed; d=example.org;"), signed)
        self.assertIn(b"h=from : from : subject : date : message-id;",
                      re.sub(rb"\n ", b" ", signed))
        with open(sign.key_path(key_dir, "example.org", "s1"), "wb") as f:
            f.write(b"not a key\n")
        warnings = []
        unsigned = self.prepare(message.replace(b"example.net", b"example.org"), key_dir,
                                warnings)
        self.assertFalse(unsigned.startswith(b"DKIM-Signature:"))
        self.assertEqual(len(warnings), 1)
        self.assertIn("Q1: not DKIM-signed (example.org, selector s1)", warnings[0])


class BoundTests(TestCase):
    """:class:`popgate.relay.mx.MXSender`'s bounds, with a stand-in for the session."""

    @defer.inlineCallbacks
    def test_one_session_per_domain_and_the_connection_bounds(self):
        zone = {f"{n}.example": [A(f"127.0.0.{i}")] for i, n in enumerate("abc", 2)}
        sessions, active, most = [], [], {"total": 0, "a.example": 0}

        def deliver(reactor, host, sender, recipients, message):
            sessions.append((host.host, host.address, recipients))
            active.append(host.host)
            most["total"] = max(most["total"], len(active))
            most["a.example"] = max(most["a.example"], active.count("a.example"))

            def done():
                active.remove(host.host)
                return {r: (250, "250 ok") for r in recipients}
            return task.deferLater(reactor, 0.1, done)

        send = mx.MXSender(reactor, resolver(serve(self, Zone("example", zone))), deliver,
                           port=25, tls="opportunistic", helo="mx.test",
                           max_connections=2, max_connections_per_domain=1)
        results = yield defer.gatherResults([
            send(ALICE, ["1@a.example", "2@A.example", "4@b.example"], b"m"),
            send(ALICE, ["3@a.example"], b"m"), send(ALICE, ["5@c.example"], b"m")])
        self.assertEqual(results[0], dict.fromkeys(["1@a.example", "2@A.example",
                                                    "4@b.example"], (250, "250 ok")))
        self.assertEqual(sorted(sessions), [
            ("a.example", "127.0.0.2", ["1@a.example", "2@A.example"]),
            ("a.example", "127.0.0.2", ["3@a.example"]),
            ("b.example", "127.0.0.3", ["4@b.example"]),
            ("c.example", "127.0.0.4", ["5@c.example"])])
        self.assertEqual(most, {"total": 2, "a.example": 1})


class LoopTests(TestCase):
    @defer.inlineCallbacks
    def test_as_a_backup_mx_only_better_mx_hosts_are_tried(self):
        zone = {"backup.example": [MX(10, "primary.example"), MX(20, "me.example"),
                                   MX(30, "worse.example")],
                "primary.example": [A("127.0.0.2")], "me.example": [A("127.0.0.3")],
                "worse.example": [A("127.0.0.4")], "self.example": [MX(10, "me.example")]}
        tried = []

        def deliver(reactor, host, sender, recipients, message):
            tried.append(host.host)
            return defer.fail(SmarthostError("connection refused"))

        send = mx.MXSender(reactor, resolver(serve(self, Zone("example", zone))), deliver,
                           port=25, tls="opportunistic", helo="me.example",
                           is_own=lambda host, ip, port: ip == "127.0.0.3")
        results = yield send(ALICE, ["b@backup.example", "s@self.example"], b"m")
        self.assertEqual(tried, ["primary.example"])
        self.assertEqual(results, {
            "b@backup.example": (451, "451 4.4.1 primary.example [127.0.0.2]: "
                                      "connection refused"),
            "s@self.example": (554, "554 5.4.6 self.example: MX me.example [127.0.0.3] "
                                    "is this server (loop)")})


class MXCase(RelayServerMixin, TestCase):
    relay: dict = {}

    @defer.inlineCallbacks
    def start(self, zone: dict, *sinks: Sink, **relay):
        port = 0
        for sink in sinks:
            port = yield sink.listen(port)
            self.addCleanup(sink.stop)
        self.key_dir = os.path.abspath(self.mktemp())
        _, record = sign.keygen(self.key_dir, "example.org", "s1")
        self.dkim_record = re.sub(r'" "', "", record.split(" IN TXT ", 1)[1]).strip('"')
        self.dns_port = serve(self, Zone("example", zone), Zone("example.org", {
            "s1._domainkey.example.org": [txt(self.dkim_record)]}),
            Zone("mx.test", {"mx.test": [A("127.0.0.6")]}))
        self.server = yield start_twistd(self, users=USERS, settings={
            "relay": {"mode": "mx", "dns_servers": [f"127.0.0.1:{self.dns_port}"],
                      "mx_port": port, **relay},
            "dkim": {"key_dir": self.key_dir}})


class DeliveryTests(MXCase):
    @defer.inlineCallbacks
    def test_routing_batching_fallback_bounces_and_a_dkim_signature_that_verifies(self):
        a, b = Sink(interface="127.0.0.2"), Sink(interface="127.0.0.3")
        busy = Sink(interface="127.0.0.4", greeting="421 4.3.2 too busy")
        yield self.start(ZONE, a, b, busy)
        yield submit(self.server, ["p1@pref.example", "p2@pref.example", "x@busy.example",
                                   "y@bare.example", "z@null.example", "w@loop.example"],
                     b"From: Alice <alice@example.org>\r\nTo: friends\r\n"
                     b"Subject: direct\r\n\r\nHello MX.\r\n")
        yield self.until(lambda: stored(self.server, ALICE) and not self.envelopes())

        # One session per domain, the best MX first; 421 and a refusal fall through.
        self.assertEqual([m.recipients for m in a.messages],
                         [["p1@pref.example", "p2@pref.example"]])
        self.assertEqual(sorted(m.recipients for m in b.messages),
                         [["x@busy.example"], ["y@bare.example"]])
        self.assertEqual((len(busy.sessions), busy.messages), (1, []))
        self.assertIn(b"down.busy.example [127.0.0.5] failed", self.server.log)

        [bounce] = stored(self.server, ALICE)
        self.assertIn(b"Final-Recipient: rfc822; z@null.example\nAction: failed\n"
                      b"Status: 5.1.10\n", bounce)
        self.assertIn(b"Final-Recipient: rfc822; w@loop.example\nAction: failed\n"
                      b"Status: 5.4.6\n", bounce)

        # Signed once, at submission: every MX got the same signature.
        data = a.messages[0].data
        signatures = {re.search(rb"DKIM-Signature:.*?\r\n(?! )", m.data, re.S).group()
                      for m in a.messages + b.messages}
        self.assertEqual(len(signatures), 1)
        self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; "
                                        b"c=relaxed/relaxed; d=example.org;"), data[:200])
        self.assertRegex(data, rb"\r\nMessage-ID: <[^>]+@mx\.test>\r\nDate: [^\r]+\r\n"
                               rb"From: Alice <alice@example.org>\r\n")
        answers, _, _ = yield resolver(self.dns_port).lookupText("s1._domainkey.example.org")
        published = b"".join(answers[0].payload.data)

        def lookup(name, timeout=5):
            self.assertEqual(name, b"s1._domainkey.example.org.")
            return published

        self.assertTrue(dkim.verify(data, dnsfunc=lookup))
        self.assertFalse(dkim.verify(data.replace(b"Hello MX.", b"Hello MY."), dnsfunc=lookup))


class OpportunisticTLSTests(MXCase):
    @defer.inlineCallbacks
    def test_starttls_to_an_mx_with_an_unverifiable_certificate(self):
        pki = make_test_pki(self.mktemp(), "mx.tls.example")  # a CA nobody trusts
        with open(pki.fullchain, "rb") as f, open(pki.key, "rb") as k:
            options = ssl.PrivateCertificate.loadPEM(f.read() + k.read()).options()
        sink = Sink(interface="127.0.0.2", tls=options)
        yield self.start({"tls.example": [MX(10, "mx.tls.example")],
                          "mx.tls.example": [A("127.0.0.2")]}, sink)
        yield submit(self.server, ["t@tls.example"], b"Subject: tls\r\n\r\nsecret\r\n")
        yield self.until(lambda: sink.messages)
        self.assertIn("STARTTLS", sink.sessions[0])
        self.assertRegex(self.server.log.decode(), r"mx\.tls\.example \[127\.0\.0\.2\]: "
                                                   r"TLSv1\.[23], certificate NOT verified")


class RequiredTLSTests(MXCase):
    @defer.inlineCallbacks
    def test_an_mx_without_starttls_is_never_sent_plaintext_and_the_message_bounces(self):
        sink = Sink(interface="127.0.0.2")
        yield self.start({"plain.example": [MX(10, "mx.plain.example")],
                          "mx.plain.example": [A("127.0.0.2")]}, sink,
                         mx_tls="required", max_queue_time=2.0)
        submitted = time.monotonic()
        yield submit(self.server, ["p@plain.example"], b"Subject: no tls\r\n\r\nx\r\n")
        yield self.until(lambda: b"does not offer STARTTLS" in self.envelopes())
        self.assertFalse(stored(self.server, ALICE), "kept in the queue")
        yield self.until(lambda: time.monotonic() - submitted > 2.5)
        out, err, code = yield self.cli("flush")
        self.assertEqual(code, 0, err)
        yield self.until(lambda: stored(self.server, ALICE))
        [bounce] = stored(self.server, ALICE)
        self.assertIn(b"Final-Recipient: rfc822; p@plain.example\nAction: failed\n"
                      b"Status: 4.4.7\n", bounce)
        self.assertIn(b"does not offer STARTTLS", bounce)
        self.assertEqual(sink.messages, [])
        self.assertFalse([c for s in sink.sessions for c in s if c.startswith("MAIL")])


del MXCase
