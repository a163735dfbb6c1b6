"""The outbound queue, the smarthost client and the queue runner against a scripted sink.

The sink (tests/smtpsink.py) is a real SMTP server on a loopback port; the runner's
schedule runs on a fake clock (retries after minutes happen at once), its sessions on
the real reactor.  Bounces go into real Maildirs through a real Deliverer.
"""

from __future__ import annotations

import email
import io
import os
import time
from functools import partial

from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.mail import smtp as twisted_smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.relay import client, dsn
from popgate.relay.client import Smarthost
from popgate.relay.queue import FAILED, QUEUED, SENT, Envelope, Queue, QueuedRecipient
from popgate.relay.runner import QueueRunner, retry_delay
from popgate.smtp.delivery import Arrival, Deliverer, Recipient
from popgate.store.maildir import MaildirStore
from tests.certs import make_test_pki
from tests.fakes import synchronous
from tests.smtpsink import Sink

SENDER = "alice@example.org"
CONTENT = (b"From: Alice <alice@example.org>\nTo: x@remote.test\nSubject: report\n\n"
           b"Hello,\n.leading dot\n..two dots\nend\n")


def queue_message(queue: Queue, recipients, message_id="MSG1", created=0.0,
                  content=CONTENT) -> Envelope:
    envelope = Envelope(message_id, SENDER, SENDER,
                        [QueuedRecipient(r) for r in recipients], created=created)
    incoming = queue.new_message(envelope)
    incoming.write(content)
    incoming.commit()
    return envelope


class QueueFileTests(TestCase):
    def setUp(self):
        self.queue = Queue(self.mktemp())
        self.queue.prepare()

    def test_a_committed_message_is_two_readable_files(self):
        queue_message(self.queue, ["x@remote.test"])
        self.assertEqual(sorted(os.listdir(self.queue.directory)),
                         ["MSG1.env", "MSG1.msg", "tmp"])
        envelope = self.queue.load("MSG1")
        self.assertEqual(envelope.recipients, [QueuedRecipient("x@remote.test")])
        self.assertEqual(self.queue.read_message("MSG1"), CONTENT)
        for name in ("MSG1.env", "MSG1.msg"):
            self.assertEqual(os.stat(os.path.join(self.queue.directory, name)).st_mode & 0o777,
                             0o640)

    def test_what_a_crash_before_250_left_is_removed_and_other_nodes_files_are_not(self):
        queue_message(self.queue, ["x@remote.test"])
        unfinished = self.queue.new_message(Envelope("MSG2", SENDER, SENDER, []))
        unfinished.write(b"half")
        other_node = Queue(self.queue.directory, node="node2")
        other_node.new_message(Envelope("MSG4", SENDER, SENDER, [])).write(b"in progress")
        self.assertEqual(self.queue.clean_tmp(), 1)
        self.assertEqual(os.listdir(os.path.join(self.queue.directory, "tmp")),
                         ["node2.MSG4.msg"])
        with open(self.queue.message_path("MSG3"), "wb") as f:
            f.write(b"renamed, but no envelope yet")
        self.assertEqual(self.queue.remove_orphans(), 0, "maybe a commit in progress")
        self.assertEqual(self.queue.remove_orphans(time.time() + 61), 1)
        self.assertEqual(self.queue.ids(), ["MSG1"])
        self.assertEqual(sorted(os.listdir(self.queue.directory)),
                         ["MSG1.env", "MSG1.msg", "tmp"])

    def test_a_removed_message_is_not_written_back(self):
        envelope = queue_message(self.queue, ["x@remote.test"])
        self.assertTrue(self.queue.remove("MSG1"))
        self.assertFalse(self.queue.save(envelope))
        self.assertEqual(self.queue.ids(), [])
        self.assertFalse(self.queue.remove("MSG1"))

    def test_backoff(self):
        self.assertEqual([retry_delay(n) for n in range(1, 7)],
                         [60, 300, 900, 3600, 3600, 3600])


class RelayFixture:
    def setUp(self):
        root = self.mktemp()
        os.makedirs(root)
        self.clock = task.Clock()
        self.queue = Queue(os.path.join(root, "queue"))
        users_file = os.path.join(root, "users")
        UserFile(users_file).add(SENDER, hash_password("pw", "PLAIN"))
        self.users = UserDB(users_file)
        self.store = MaildirStore(os.path.join(root, "mail"), "mx.test")
        self.deliverer = Deliverer(self.store, synchronous, hostname="mx.test", spares=0)
        self.addCleanup(self.deliverer.close)
        self.mail_root = os.path.join(root, "mail")

    @defer.inlineCallbacks
    def start(self, sink: Sink, *, max_queue_time=5 * 86400.0, port=None, **smarthost):
        if port is None:
            port = yield sink.listen()
            self.addCleanup(sink.stop)
        smarthost.setdefault("tls", "none")
        host = smarthost.pop("host", "127.0.0.1")
        self.smarthost = Smarthost(host, port, helo="mx.test", **smarthost)
        self.runner = QueueRunner(
            self.queue, partial(client.deliver, reactor, self.smarthost), self.clock,
            synchronous, self.deliver_bounce, hostname="mx.test",
            smarthost=f"{host}:{port}", max_queue_time=max_queue_time)
        self.queue.prepare()

    def deliver_bounce(self, name, report):
        arrival = Arrival(sender="", recipients=(Recipient(name, (self.users.get(name),)),),
                          helo="mx.test", client_ip=None, protocol="ESMTP")
        return self.deliverer.deliver(arrival, report)

    def run_due(self) -> defer.Deferred:
        """One scan; fires once every attempt it started has ended."""
        self.runner.idle = idle = defer.Deferred()
        if not self.runner.running:
            self.runner.startService()  # its first scan runs at once
            self.addCleanup(self.runner.stopService)
        else:
            self.runner.scan()
        if not self.runner._busy and not self.runner._waiting:
            self.runner.idle = None
            return defer.succeed(None)
        return idle

    def bounces(self) -> list[email.message.Message]:
        new = os.path.join(self.mail_root, "example.org", "alice", "Maildir", "new")
        if not os.path.isdir(new):
            return []
        messages = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                messages.append(email.message_from_bytes(f.read()))
        return messages


class RunnerTests(RelayFixture, TestCase):
    @defer.inlineCallbacks
    def test_451_then_250_is_retried_after_the_backoff_and_sent_once(self):
        sink = Sink(data_replies=["451 4.3.0 try again later"])
        yield self.start(sink)
        queue_message(self.queue, ["x@remote.test"])
        yield self.run_due()
        envelope = self.queue.load("MSG1")
        self.assertEqual((envelope.attempts, envelope.next_try, envelope.last_error),
                         (1, 60.0, "451 4.3.0 try again later"))
        self.assertEqual(envelope.recipients[0].state, QUEUED)
        self.clock.advance(30)
        yield self.run_due()
        self.assertEqual(len(sink.sessions), 1, "not due before its next try")
        self.clock.advance(30)
        yield self.run_due()
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(sink.messages[0].data, CONTENT.replace(b"\n", b"\r\n"),
                         "byte for byte, dot-stuffing undone by the sink")
        self.assertEqual(self.queue.ids(), [])
        self.assertFalse([n for n in os.listdir(self.queue.directory)
                          if n.endswith((".msg", ".env"))])
        self.assertEqual(self.bounces(), [])
        self.assertEqual(sink.pipelined, [True, True], "MAIL, RCPT and DATA in one write")

    @defer.inlineCallbacks
    def test_550_for_one_of_two_recipients_bounces_it_and_the_other_gets_the_mail_once(self):
        sink = Sink(rcpt={"bad@remote.test": "550 5.1.1 <bad@remote.test>: no such user"})
        yield self.start(sink)
        queue_message(self.queue, ["good@remote.test", "bad@remote.test"])
        yield self.run_due()
        self.assertEqual([m.recipients for m in sink.messages], [["good@remote.test"]])
        self.assertEqual(self.queue.ids(), [])
        [bounce] = self.bounces()
        self.check_dsn(bounce, "bad@remote.test", "5.1.1",
                       "550 5.1.1 <bad@remote.test>: no such user")
        self.clock.advance(7200)
        yield self.run_due()
        self.assertEqual(len(sink.messages), 1, "never sent again")

    def check_dsn(self, bounce, recipient, status, diagnostic):
        self.assertEqual(bounce["Return-Path"], "<>")
        self.assertEqual(bounce.get_content_type(), "multipart/report")
        self.assertEqual(bounce.get_param("report-type"), "delivery-status")
        self.assertEqual(bounce["Auto-Submitted"], "auto-replied")
        human, report, headers = bounce.get_payload()
        self.assertIn(recipient, human.get_payload())
        self.assertEqual(report.get_content_type(), "message/delivery-status")
        per_message, *per_recipient = report.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(len(per_recipient), 1)
        block = per_recipient[0]
        self.assertEqual((block["Final-Recipient"], block["Action"], block["Status"],
                          block["Diagnostic-Code"]),
                         (f"rfc822; {recipient}", "failed", status, f"smtp; {diagnostic}"))
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: report", headers.get_payload())
        self.assertNotIn("Hello", headers.get_payload(), "headers only")

    @defer.inlineCallbacks
    def test_a_temporary_and_a_permanent_refusal_with_no_recipient_accepted(self):
        """Only the 451 recipient is tried again, and only then does the bounce for the
        550 one come; Twisted's ESMTPSenderFactory cannot tell the two apart here."""
        sink = Sink(rcpt={"later@remote.test": "451 4.2.1 mailbox busy",
                          "bad@remote.test": "550 5.1.1 no such user"})
        yield self.start(sink)
        queue_message(self.queue, ["later@remote.test", "bad@remote.test"])
        yield self.run_due()
        states = {r.address: r.state for r in self.queue.load("MSG1").recipients}
        self.assertEqual(states, {"later@remote.test": QUEUED, "bad@remote.test": FAILED})
        self.assertEqual(self.bounces(), [], "no bounce while a recipient is still queued")
        del sink.rcpt["later@remote.test"]
        self.clock.advance(60)
        yield self.run_due()
        self.assertEqual([m.recipients for m in sink.messages], [["later@remote.test"]])
        self.assertEqual(sink.sessions[1].count("RCPT TO:<later@remote.test>"), 1)
        self.assertNotIn("RCPT TO:<bad@remote.test>", sink.sessions[1])
        [bounce] = self.bounces()
        self.check_dsn(bounce, "bad@remote.test", "5.1.1", "550 5.1.1 no such user")

    @defer.inlineCallbacks
    def test_why_not_twisted_esmtp_sender_it_loses_the_per_recipient_answers(self):
        sink = Sink(rcpt={"later@remote.test": "451 4.2.1 mailbox busy",
                          "bad@remote.test": "550 5.1.1 no such user"})
        port = yield sink.listen()
        self.addCleanup(sink.stop)
        done = defer.Deferred()
        factory = twisted_smtp.ESMTPSenderFactory(
            None, None, SENDER, ["later@remote.test", "bad@remote.test"],
            io.BytesIO(CONTENT), done, retries=0, requireAuthentication=False,
            requireTransportSecurity=False)
        reactor.connectTCP("127.0.0.1", port, factory)
        failure = yield self.assertFailure(done, twisted_smtp.SMTPDeliveryError)
        # One error for the message: which recipient may be retried is lost.
        self.assertNotIn("451", str(failure.resp))
        self.assertNotIn("550", str(failure.resp))
        self.assertEqual(sink.pipelined, [False], "and it waits for each reply")
        # Ours gives each recipient its own answer.
        results = yield client.deliver(reactor, Smarthost("127.0.0.1", port, tls="none"),
                                       SENDER, ["later@remote.test", "bad@remote.test"],
                                       CONTENT)
        self.assertEqual(results, {"later@remote.test": (451, "451 4.2.1 mailbox busy"),
                                   "bad@remote.test": (550, "550 5.1.1 no such user")})
        self.assertEqual(sink.pipelined, [False, True])

    @defer.inlineCallbacks
    def test_an_unreachable_smarthost_is_retried_until_max_queue_time_then_bounced(self):
        sink = Sink()
        port = yield sink.listen()
        yield sink.stop()  # nobody listens there any more
        yield self.start(sink, port=port, max_queue_time=3600.0)
        queue_message(self.queue, ["x@remote.test"])
        for expected_attempts, wait in ((1, 60), (2, 300), (3, 900)):
            yield self.run_due()
            envelope = self.queue.load("MSG1")
            self.assertEqual(envelope.attempts, expected_attempts)
            self.assertIn("cannot connect", envelope.last_error)
            self.clock.advance(wait)
        yield self.run_due()  # 1260 s: still within the hour
        self.clock.advance(3600)
        yield self.run_due()
        self.assertEqual(self.queue.ids(), [])
        [bounce] = self.bounces()
        block = bounce.get_payload()[1].get_payload()[1]
        self.assertEqual(block["Status"], "4.4.7")
        self.assertIn("delivery time expired", block["Diagnostic-Code"])

    @defer.inlineCallbacks
    def test_a_recipient_recorded_as_sent_is_never_sent_again(self):
        """What a restart after kill -9 finds: one recipient sent, one still queued."""
        sink = Sink()
        yield self.start(sink)
        envelope = queue_message(self.queue, ["done@remote.test", "todo@remote.test"])
        envelope.recipients[0].state = SENT
        self.queue.save(envelope)
        yield self.run_due()
        self.assertEqual([m.recipients for m in sink.messages], [["todo@remote.test"]])
        self.assertEqual(self.queue.ids(), [])

    @defer.inlineCallbacks
    def test_a_message_another_node_is_relaying_is_left_to_it(self):
        sink = Sink()
        yield self.start(sink)
        queue_message(self.queue, ["x@remote.test"])
        other_node = Queue(self.queue.directory, node="node2").try_lock("MSG1")
        yield self.run_due()
        self.assertEqual((sink.sessions, self.queue.load("MSG1").attempts), ([], 0))
        Queue.unlock(other_node)
        yield self.run_due()
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(sorted(os.listdir(self.queue.directory)), ["lock", "tmp"])

    @defer.inlineCallbacks
    def test_stopping_waits_for_the_session_under_way_to_be_recorded(self):
        sink = Sink()
        yield self.start(sink)
        queue_message(self.queue, ["x@remote.test"])
        self.runner.startService()
        stopped = self.runner.stopService()
        self.assertIsNotNone(stopped, "a session is under way")
        yield stopped
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(self.queue.ids(), [], "its 250 was recorded before the stop")

    @defer.inlineCallbacks
    def test_flush_request_makes_every_message_due(self):
        sink = Sink(data_replies=["451 4.3.0 later"])
        yield self.start(sink)
        queue_message(self.queue, ["x@remote.test"])
        yield self.run_due()
        self.assertEqual(self.queue.ids(), ["MSG1"])
        self.queue.request_flush()
        yield self.run_due()
        self.assertEqual(self.queue.ids(), [])
        self.assertEqual(len(sink.messages), 1)


class SmarthostTLSTests(RelayFixture, TestCase):
    def setUp(self):
        super().setUp()
        directory = self.mktemp()
        self.pki = make_test_pki(directory, "localhost")
        with open(self.pki.fullchain, "rb") as f:
            chain = f.read()
        with open(self.pki.key, "rb") as f:
            key = f.read()
        self.server_tls = ssl.PrivateCertificate.loadPEM(chain + key).options()
        with open(self.pki.ca, "rb") as f:
            self.ca = f.read()

    @defer.inlineCallbacks
    def test_starttls_with_the_private_ca_and_auth(self):
        sink = Sink(tls=self.server_tls, auth=("relay-user", "relay-secret"))
        yield self.start(sink, host="localhost", tls="required", trust_root=self.ca,
                         user="relay-user", password=b"relay-secret")
        queue_message(self.queue, ["x@remote.test"])
        yield self.run_due()
        self.assertEqual(len(sink.messages), 1)
        commands = [c.split(" ")[0] for c in sink.sessions[0]]
        self.assertEqual(commands[:4], ["EHLO", "STARTTLS", "EHLO", "AUTH"])

    @defer.inlineCallbacks
    def check_not_relayed(self, sink, error, **smarthost):
        yield self.start(sink, **smarthost)
        queue_message(self.queue, ["x@remote.test"])
        yield self.run_due()
        self.assertEqual(sink.messages, [])
        envelope = self.queue.load("MSG1")
        self.assertEqual(envelope.recipients[0].state, QUEUED, "retried, never bounced")
        self.assertIn(error, envelope.last_error)

    def test_a_certificate_from_another_ca_is_refused(self):
        other = make_test_pki(self.mktemp(), "localhost")
        with open(other.ca, "rb") as f:
            return self.check_not_relayed(Sink(tls=self.server_tls), "certificate verify failed",
                                          host="localhost", tls="required", trust_root=f.read())

    def test_a_certificate_for_another_name_is_refused(self):
        return self.check_not_relayed(Sink(tls=self.server_tls), "Mismatch",
                                      host="127.0.0.1", tls="required", trust_root=self.ca)

    def test_required_tls_without_starttls_on_offer(self):
        return self.check_not_relayed(Sink(), "does not offer STARTTLS", tls="required",
                                      trust_root=self.ca)

    @defer.inlineCallbacks
    def test_opportunistic_tls_without_starttls_sends_in_plaintext(self):
        sink = Sink()
        yield self.start(sink, tls="opportunistic")
        queue_message(self.queue, ["x@remote.test"])
        yield self.run_due()
        self.assertEqual(len(sink.messages), 1)


class DSNTests(TestCase):
    def test_status_from_the_enhanced_code_or_a_default(self):
        self.assertEqual(dsn.status_of("550 5.1.1 no such user"), "5.1.1")
        self.assertEqual(dsn.status_of("554 rejected"), "5.0.0")
        self.assertEqual(dsn.status_of("4.4.7 delivery time expired"), "4.4.7")


class ClientTranscriptTests(TestCase):
    """The smarthost client over a StringTransport: timeouts and odd replies."""

    def session(self):
        self.clock = task.Clock()
        smarthost = Smarthost("smarthost.test", 25, tls="none", helo="mx.test")
        session = client._Session(smarthost, SENDER, ["a@remote.test", "b@remote.test"],
                                  b"Subject: x\n\nbody\n", self.clock)
        self.transport = StringTransport()
        session.makeConnection(self.transport)
        return session

    def test_a_silent_smarthost_times_out(self):
        session = self.session()
        self.clock.advance(client.REPLY_TIMEOUT - 0.1)
        self.assertNoResult(session.done)
        self.clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(session.done, client.SmarthostError).value),
                         "timeout")

    def test_multi_line_replies_and_one_answer_per_recipient_without_pipelining(self):
        session = self.session()
        session.dataReceived(b"220-smarthost.test\r\n220-second line\r\n220 ready\r\n")
        self.assertEqual(self.transport.value(), b"EHLO mx.test\r\n")
        self.transport.clear()
        session.dataReceived(b"250-smarthost.test\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
        self.assertEqual(self.transport.value(), b"MAIL FROM:<alice@example.org>\r\n",
                         "no PIPELINING: one command at a time")
        self.transport.clear()
        session.dataReceived(b"250 2.1.0 ok\r\n")
        self.assertEqual(self.transport.value(), b"RCPT TO:<a@remote.test>\r\n")
        session.dataReceived(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n250 2.1.5 ok\r\n")
        self.transport.clear()
        session.dataReceived(b"354 go\r\n")
        self.assertEqual(self.transport.value(), b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.transport.clear()
        session.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.transport.value(), b"QUIT\r\n")
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(session.done), {
            "a@remote.test": (550, "550 5.1.1 no such 5.1.1 user"),
            "b@remote.test": (250, "250 2.0.0 queued")})

    def test_a_malformed_reply_ends_the_session(self):
        session = self.session()
        session.dataReceived(b"hello there\r\n")
        self.assertIn("malformed reply",
                      str(self.failureResultOf(session.done, client.SmarthostError).value))
