"""Protocol transcripts for submission (popgate.smtp.submission): AUTH, who may send what,
the rate limit, local delivery and the outbound queue, the trace.

Sessions run over the transcript fixture (tests/transcript.py) with a fake clock, against
real Maildirs and a real queue directory in a trial temp directory.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.cred.portal import Portal
from twisted.trial.unittest import TestCase

from popgate.auth.account import AccountRealm
from popgate.auth.login import Authenticator
from popgate.auth.penalty import AuthPenalty, ChecksPerAddress
from popgate.auth.users import PasswordChecker, UserDB
from popgate.limits import ConnectionLimiter
from popgate.relay.queue import Queue
from popgate.smtp.delivery import Deliverer, Router
from popgate.smtp.submission import SendingLimit, SubmissionFactory
from popgate.store.maildir import MaildirStore
from tests.fakes import synchronous
from tests.test_smtp import HOSTNAME, Client, SMTPFixture
from tests.transcript import observed_bus

ALICE = "alice@example.org"
LOOPBACK = "127.0.0.1"
REMOTE = "192.0.2.10"
PLAIN_ALICE = base64.b64encode(b"\0alice@example.org\0pw").decode()
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class SubmissionFixture(SMTPFixture):
    def make_factory(self, *, relay=False, tls=None, implicit_tls=False, **overrides):
        self.config = self.make_config(**overrides)
        self.store = MaildirStore(self.config.mail_root, HOSTNAME)
        self.events, self.recorder = observed_bus(self.clock)
        self.deliverer = Deliverer(self.store, synchronous, hostname=HOSTNAME,
                                   now=self.clock.seconds, spares=0)
        self.addCleanup(self.deliverer.close)
        users = UserDB(self.config.users_file)
        limits = self.config.limits
        self.penalty = AuthPenalty(self.clock, limits.auth_delay, limits.auth_delay_max,
                                   limits.penalty_window)
        portal = Portal(AccountRealm(users), [PasswordChecker(users, synchronous)])
        self.queue = Queue(self.config.queue_dir) if relay else None
        if self.queue is not None:
            self.queue.prepare()
        self.queued = []
        self.factory = SubmissionFactory(
            config=self.config, router=Router(self.config, users), deliverer=self.deliverer,
            clock=self.clock, limiter=ConnectionLimiter(100, 100), events=self.events,
            tls=tls, implicit_tls=implicit_tls,
            authenticator=Authenticator(portal, self.penalty, ChecksPerAddress(), self.clock),
            sending_limit=SendingLimit(self.clock,
                                       self.config.submission.max_messages_per_hour),
            run_in_thread=synchronous, queue=self.queue, on_queued=self.queued.append)
        return self.factory

    def connect(self, host: str = LOOPBACK) -> Client:
        if not hasattr(self, "factory"):
            self.make_factory()
        client = Client(self.factory, host)
        client.replies()
        return client

    def logged_in(self, host: str = LOOPBACK) -> Client:
        client = self.connect(host)
        self.assertReplies(client.send(f"EHLO c\r\nAUTH PLAIN {PLAIN_ALICE}\r\n".encode()),
                           ["250", "235 2.7.0"])
        return client

    def queue_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.queue.directory) if n.endswith((".msg", ".env")))


class AuthTests(SubmissionFixture, TestCase):
    def test_auth_is_offered_on_loopback_and_the_port_25_listener_offers_none(self):
        ehlo = self.connect().command("EHLO c")[0]
        self.assertIn("AUTH PLAIN LOGIN", ehlo)
        from popgate.smtp.server import SMTPFactory

        smtp = SMTPFactory(config=self.config, router=self.factory.router,
                           deliverer=self.deliverer, clock=self.clock,
                           limiter=self.factory.limiter, events=self.events)
        client = Client(smtp, LOOPBACK)
        client.replies()
        self.assertNotIn("AUTH", client.command("EHLO c")[0])
        self.assertReplies(client.command(f"AUTH PLAIN {PLAIN_ALICE}"), ["500 5.5.2"])

    def test_off_loopback_auth_needs_tls_first(self):
        self.make_factory(tls=object())
        client = self.connect(REMOTE)
        ehlo = client.command("EHLO c")[0]
        self.assertNotIn("AUTH", ehlo)
        self.assertIn("STARTTLS", ehlo)
        self.assertReplies(client.command(f"AUTH PLAIN {PLAIN_ALICE}"), ["538 5.7.11"])
        self.assertEqual(self.recorder.of("login"), [], "no password was checked")
        self.assertReplies(client.command("MAIL FROM:<alice@example.org>"), ["530 5.7.0"])
        self.assertReplies(client.command("STARTTLS"), ["220 2.0.0"])
        self.assertIn("AUTH PLAIN LOGIN", client.command("EHLO c")[0])
        self.assertReplies(client.command(f"AUTH PLAIN {PLAIN_ALICE}"), ["235 2.7.0"])

    def test_implicit_tls_offers_auth_off_loopback(self):
        self.make_factory(tls=object(), implicit_tls=True)
        self.assertIn("AUTH PLAIN LOGIN", self.connect(REMOTE).command("EHLO c")[0])

    def test_mail_before_auth_is_refused(self):
        client = self.connect()
        self.assertReplies(client.send(b"EHLO c\r\nMAIL FROM:<alice@example.org>\r\n"),
                           ["250", "530 5.7.0 Authentication required"])

    def test_plain_with_an_empty_challenge_and_login_step_by_step(self):
        client = self.connect()
        client.command("EHLO c")
        self.assertEqual(client.command("AUTH PLAIN"), ["334 "])
        self.assertReplies(client.command(PLAIN_ALICE), ["235 2.7.0"])
        self.assertReplies(client.command("AUTH PLAIN x"), ["503 5.5.1"])
        client = self.connect()
        client.command("EHLO c")
        self.assertEqual(client.command("AUTH LOGIN"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(client.command(b64("alice@example.org")), ["334 UGFzc3dvcmQ6"])
        self.assertReplies(client.command(b64("pw")), ["235 2.7.0"])
        self.assertEqual([(e.data["user"], e.data["mechanism"], e.data["result"])
                          for e in self.recorder.of("login")],
                         [(ALICE, "PLAIN", "ok"), (ALICE, "LOGIN", "ok")])

    def test_login_with_initial_response_and_pipelined_mail(self):
        client = self.connect()
        replies = client.send(f"EHLO c\r\nAUTH LOGIN {b64('alice@example.org')}\r\n{b64('pw')}\r\n"
                              "MAIL FROM:<alice@example.org>\r\n".encode())
        self.assertReplies(replies, ["250", "334 UGFzc3dvcmQ6", "235 2.7.0", "250 2.1.0"])

    def test_an_over_long_response_ends_the_exchange(self):
        client = self.connect()
        client.command("EHLO c")
        self.assertEqual(client.command("AUTH LOGIN"), ["334 VXNlcm5hbWU6"])
        self.assertReplies(client.command("x" * 600), ["500 5.5.2"])
        self.assertReplies(client.command("NOOP"), ["250"], "a command again, not a response")

    def test_cancel_bad_base64_and_unknown_mechanism(self):
        client = self.connect()
        client.command("EHLO c")
        self.assertEqual(client.command("AUTH LOGIN"), ["334 VXNlcm5hbWU6"])
        self.assertReplies(client.command("*"), ["501 5.0.0 Authentication cancelled"])
        self.assertReplies(client.command("AUTH PLAIN !!!"), ["501 5.5.2"])
        self.assertReplies(client.command("AUTH CRAM-MD5"), ["504 5.5.4"])
        self.assertReplies(client.command("NOOP"), ["250"])

    def test_wrong_password_is_slowed_exactly_as_a_pop3_login(self):
        """The same Authenticator path as POP3: 535 once the address's penalty (2 s, then
        doubling) has passed; a right password is held while the penalty lasts."""
        client = self.connect()
        client.command("EHLO c")
        wrong = b64("\0alice@example.org\0wrong")
        self.assertEqual(client.command(f"AUTH PLAIN {wrong}"), [])
        self.clock.advance(1.9)
        self.assertEqual(client.replies(), [])
        self.clock.advance(0.1)
        self.assertReplies(client.replies(), ["535 5.7.8"])
        other = b64("\0alice@example.org\0other")
        self.assertEqual(client.command(f"AUTH PLAIN {other}"), [])
        self.clock.advance(3.9)
        self.assertEqual(client.replies(), [])
        self.clock.advance(0.1)
        self.assertReplies(client.replies(), ["535 5.7.8"])
        self.assertEqual(self.penalty.delay(LOOPBACK, "alice@example.org"), 4.0)
        self.assertEqual(client.command(f"AUTH PLAIN {PLAIN_ALICE}"), [])
        self.clock.advance(3.9)
        self.assertEqual(client.replies(), [])
        self.clock.advance(0.1)
        self.assertReplies(client.replies(), ["235 2.7.0"])
        self.assertEqual([e.data["result"] for e in self.recorder.of("login")],
                         ["failed", "failed", "ok"])

    def test_too_many_failures_close_the_session(self):
        client = self.connect()
        client.command("EHLO c")
        replies = []
        for n in range(3):
            client.command(f"AUTH PLAIN {b64(f'{chr(0)}{ALICE}{chr(0)}w{n}')}")
            self.clock.advance(20)
            replies += client.replies()
        self.assertReplies(replies, ["535 5.7.8", "535 5.7.8", "535 5.7.8", "421 4.7.0"])
        self.assertTrue(client.closed)

    def test_secrets_never_reach_events(self):
        client = self.connect()
        client.send(f"EHLO c\r\nAUTH PLAIN {PLAIN_ALICE}\r\nQUIT\r\n".encode())
        client = self.connect()
        client.send(f"EHLO c\r\nAUTH LOGIN\r\n{b64('alice@example.org')}\r\n{b64('pw')}\r\n"
                    .encode())
        commands = [e.data["line"] for e in self.recorder.of("command")]
        self.assertIn("AUTH PLAIN ********", commands)
        self.assertEqual(commands.count("********"), 2)
        everything = repr([e.data for e in self.recorder.events])
        for secret in (PLAIN_ALICE, b64("pw")):
            self.assertNotIn(secret, everything)


class SenderTests(SubmissionFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.make_factory(**{"aliases.sales@example.org": ["alice@example.org", "bob@example.org"],
                             "aliases.@example.org": ["alice@example.org"]})

    def test_own_address_subaddress_and_shared_alias_are_allowed(self):
        for sender in ("alice@example.org", "Alice@Example.ORG", "alice+news@example.org",
                       "sales@example.org"):
            client = self.logged_in()
            self.assertReplies(client.command(f"MAIL FROM:<{sender}>"), ["250 2.1.0"], sender)

    def test_someone_elses_address_the_catch_all_and_the_null_sender_are_refused(self):
        for sender in ("bob@example.org", "anyone@example.org", "alice@example.net",
                       "alice%example.org@example.org", ""):
            client = self.logged_in()
            self.assertReplies(client.command(f"MAIL FROM:<{sender}>"), ["553 5.7.1"], sender)

    def test_received_says_esmtpsa_and_names_the_user_only_when_configured(self):
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertReplies(client.send(MESSAGE), ["250 2.0.0"])
        message = self.take_mail("bob@example.org")[0].replace(b"\n\t", b" ")
        self.assertIn(b"with ESMTPA id", message)
        self.assertNotIn(b"authenticated as", message)
        self.make_factory(submission__show_auth_user=True)
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertReplies(client.send(MESSAGE), ["250 2.0.0"])
        self.assertIn(b"(authenticated as alice@example.org)",
                      self.take_mail("bob@example.org")[0].replace(b"\n\t", b" "))


class RateLimitTests(SubmissionFixture, TestCase):
    def test_recipients_over_the_hourly_limit_get_450(self):
        self.make_factory(submission__max_messages_per_hour=3)
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                              b"RCPT TO:<carol@example.net>\r\nDATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250", "250", "250", "354", "250 2.0.0"])
        self.clock.advance(1800)
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                              b"RCPT TO:<carol@example.net>\r\n")
        self.assertReplies(replies, ["250", "250", "450 4.7.1"])
        self.clock.advance(1800)  # the first message's two recipients leave the window
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                              b"RCPT TO:<carol@example.net>\r\n"
                              b"RCPT TO:<postmaster@example.net>\r\nRCPT TO:<bob@example.org>\r\n")
        self.assertReplies(replies, ["250", "250", "250", "250", "450 4.7.1"])


class RecipientTests(SubmissionFixture, TestCase):
    def test_without_relay_remote_recipients_are_refused_as_on_port_25(self):
        client = self.logged_in()
        self.assertReplies(client.send(b"MAIL FROM:<alice@example.org>\r\n"
                                       b"RCPT TO:<someone@elsewhere.example>\r\n"),
                           ["250", "554 5.7.1"])

    def test_a_remote_recipient_is_queued_durably_before_250(self):
        self.make_factory(relay=True)
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\n"
                              b"RCPT TO:<someone@elsewhere.example>\r\nDATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250", "250", "354", "250 2.0.0 Ok: queued as"])
        message_id = replies[-1].rsplit(" ", 1)[1]
        self.assertEqual(self.queue_files(), [f"{message_id}.env", f"{message_id}.msg"])
        self.assertEqual(self.queued, [message_id], "the runner is told at once")
        [event] = self.recorder.of("message", action="queued")
        self.assertEqual((event.data["id"], event.data["recipients"]),
                         (message_id, ("someone@elsewhere.example",)))
        self.assertEqual(self.recorder.of("message", action="delivered"), [])
        with open(self.queue.envelope_path(message_id), "rb") as f:
            envelope = json.load(f)
        self.assertEqual((envelope["sender"], envelope["user"], envelope["recipients"]),
                         ("alice@example.org", "alice@example.org",
                          [{"address": "someone@elsewhere.example", "state": "queued",
                            "reply": ""}]))
        with open(self.queue.message_path(message_id), "rb") as f:
            content = f.read()
        self.assertTrue(content.startswith(b"Received: from c (unknown [127.0.0.1])"), content)
        self.assertIn(b"with ESMTPA id " + message_id.encode(), content.replace(b"\n\t", b" "))
        self.assertTrue(content.endswith(b"\nSubject: hi\n\nHello.\n"), content)
        self.assertEqual(os.listdir(os.path.join(self.queue.directory, "tmp")), [])

    def test_bdat_to_a_remote_recipient(self):
        self.make_factory(relay=True)
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\n"
                              b"RCPT TO:<x@elsewhere.example>\r\nBDAT 9\r\nSubject: "
                              b"BDAT 6 LAST\r\nhi\r\n\r\n")
        self.assertReplies(replies, ["250", "250", "250 2.0.0 9 octets", "250 2.0.0 Ok: queued"])
        message_id = replies[-1].rsplit(" ", 1)[1]
        content = self.queue.read_message(message_id)
        self.assertTrue(content.endswith(b"\nSubject: hi\n\n"), content)

    def test_local_and_remote_recipients_are_both_durable(self):
        self.make_factory(relay=True)
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                              b"RCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@elsewhere.example>\r\n"
                              b"DATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250", "250", "250", "250", "354", "250 2.0.0"])
        message_id = replies[-1].rsplit(" ", 1)[1]
        local = self.take_mail("bob@example.org")
        self.assertEqual(len(local), 1)
        self.assertIn(f"id {message_id}".encode(), local[0])
        envelope = self.queue.load(message_id)
        self.assertEqual([r.address for r in envelope.recipients],
                         ["x@elsewhere.example", "y@elsewhere.example"])

    def test_a_queue_that_cannot_be_written_is_a_temporary_failure(self):
        self.make_factory(relay=True)
        os.rmdir(os.path.join(self.queue.directory, "tmp"))
        client = self.logged_in()
        replies = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                              b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250", "250", "250", "354", "451 4.3.0"])
        self.check_nothing_stored("bob@example.org")
        self.flushLoggedErrors(OSError)
