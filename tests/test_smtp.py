"""Protocol-transcript tests for popgate.smtp.server: bytes in, replies and Maildir files out.

Every session runs over a ``StringTransport`` with a ``MemoryReactorClock``, against real
Maildirs in a trial temp directory.  Transcripts run twice: one command at a time, and
everything pipelined in a single packet.
"""

from __future__ import annotations

import glob
import os
import random

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from popgate import config, lineproto
from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.limits import ConnectionLimiter
from popgate.smtp.delivery import Deliverer, Router, Verdict, commit_group, make_spares
from popgate.smtp.reply import Reply
from popgate.smtp.server import SMTPFactory
from popgate.store.maildir import MaildirStore
from tests.fakes import Deferring, synchronous
from tests.transcript import SMTPConnection, observed_bus

HOSTNAME = "mx.example.net"
USERS = ("alice@example.org", "bob@example.org", "carol@example.net",
         "postmaster@example.net")



Client = SMTPConnection


class SMTPFixture:
    """Mixin for trial TestCases: users, a config and factories over a temp Maildir."""

    users = USERS

    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.clock = MemoryReactorClock()
        users_file = os.path.join(self.data_dir, "users")
        for name in self.users:
            UserFile(users_file).add(name, hash_password("pw", "PLAIN"))

    def make_config(self, **overrides):
        settings = {"server.data_dir": self.data_dir, "server.hostname": HOSTNAME}
        settings.update({key.replace("__", "."): value for key, value in overrides.items()})
        return config.load(None, settings)

    def make_factory(self, *, lmtp=False, implicit_tls=False, tls=None,
                     run_in_thread=synchronous, limiter=None, config=None, spares=0,
                     checks=(), **overrides):
        self.config = config or self.make_config(**overrides)
        self.store = MaildirStore(self.config.mail_root, HOSTNAME)
        self.limiter = limiter or ConnectionLimiter(100, 100)
        self.events, self.recorder = observed_bus(self.clock)
        self.deliverer = Deliverer(self.store, run_in_thread, hostname=HOSTNAME,
                                   now=self.clock.seconds, spares=spares, checks=checks)
        self.addCleanup(self.deliverer.close)
        self.factory = SMTPFactory(
            config=self.config, router=Router(self.config, UserDB(self.config.users_file)),
            deliverer=self.deliverer, clock=self.clock, limiter=self.limiter,
            events=self.events, tls=tls, lmtp=lmtp, implicit_tls=implicit_tls)
        return self.factory

    def connect(self, host: str = "192.0.2.10") -> Client:
        if not hasattr(self, "factory"):
            self.make_factory()
        client = Client(self.factory, host)
        client.replies()  # the greeting
        return client

    def maildir_files(self, user: str, sub: str = "new") -> list[str]:
        local, domain = user.split("@")
        pattern = os.path.join(self.data_dir, "mail", domain, local, "Maildir", sub, "*")
        return sorted(glob.glob(pattern))

    def check_nothing_stored(self, user: str = "alice@example.org") -> None:
        self.assertEqual(self.maildir_files(user, "tmp"), [])
        self.assertEqual(self.maildir_files(user), [])

    def take_mail(self, user: str) -> list[bytes]:
        """The messages delivered to ``user`` so far, removed from the Maildir."""
        messages = []
        for path in self.maildir_files(user):
            with open(path, "rb") as f:
                messages.append(f.read())
            os.unlink(path)
        return messages

    def assertReplies(self, replies: list[str], expected: list[str], context: str = ""):
        """Each reply starts with the expected prefix, and there are as many of them."""
        matches = len(replies) == len(expected) and all(
            reply.startswith(prefix) for reply, prefix in zip(replies, expected, strict=False))
        if not matches:
            self.fail(f"{context}replies {replies!r}\n do not match {expected!r}")

    def assertTranscript(self, steps, check=None, connect=None):
        """Run ``steps`` [(bytes, [reply prefixes])] unpipelined, then all in one packet.

        ``check`` (if given) runs after each of the two runs, e.g. to inspect the Maildir.
        """
        connect = connect or self.connect
        for pipelined in (False, True):
            client = connect()
            context = "pipelined: " if pipelined else "one command at a time: "
            if pipelined:
                replies = client.send(b"".join(data for data, _ in steps))
                self.assertReplies(replies, [r for _, want in steps for r in want], context)
            else:
                for data, want in steps:
                    self.assertReplies(client.send(data), want, f"{context}{data!r}: ")
            if check is not None:
                check()


EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@remote.example>\r\n"
RCPT_ALICE = b"RCPT TO:<alice@example.org>\r\n"
MESSAGE = b"Subject: hello\r\n\r\nHello Alice.\r\n.\r\n"


def header_lines(message: bytes) -> list[bytes]:
    return message.split(b"\n\n", 1)[0].split(b"\n")


class GreetingTests(SMTPFixture, TestCase):
    def test_greeting(self):
        self.make_factory()
        client = Client(self.factory)
        self.assertEqual(client.replies(), [f"220 {HOSTNAME} ESMTP popgate"])

    def test_ehlo_lists_the_extensions(self):
        client = self.connect()
        [reply] = client.send(EHLO)
        self.assertEqual(reply.split("\n"), [
            f"250-{HOSTNAME}", "250-SIZE 26214400", "250-8BITMIME", "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250 CHUNKING"])

    def test_ehlo_advertises_the_configured_size(self):
        self.make_factory(smtp__max_message_size=1000)
        [reply] = self.connect().send(EHLO)
        self.assertIn("250-SIZE 1000", reply)

    def test_starttls_advertised_only_with_a_certificate(self):
        self.make_factory(tls=object())
        [reply] = self.connect().send(EHLO)
        self.assertIn("250 STARTTLS", reply)
        self.assertNotIn("AUTH", reply)

    def test_helo(self):
        self.assertTranscript([
            (b"HELO client.example\r\n", [f"250 {HOSTNAME}"]),
            (b"MAIL FROM:<a@remote.example> BODY=8BITMIME\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<a@remote.example>\r\n", ["250 2.1.0"]),
        ])

    def test_ehlo_needs_a_name(self):
        self.assertTranscript([
            (b"EHLO\r\n", ["501 5.5.4"]),
            (b"EHLO two words\r\n", ["501 5.5.4"]),
            (b"HELO \r\n", ["501 5.5.4"]),
            (EHLO, ["250-"]),
        ])

    def test_ehlo_resets_the_transaction(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250 2.1.0"]), (EHLO, ["250-"]),
            (RCPT_ALICE, ["503 5.5.1"]),
        ])

    def test_simple_commands(self):
        self.assertTranscript([
            (b"NOOP\r\n", ["250 2.0.0"]),
            (b"noop with an argument\r\n", ["250 2.0.0"]),
            (b"RSET\r\n", ["250 2.0.0"]),
            (b"RSET now\r\n", ["501 5.5.4"]),
            (b"HELP\r\n", ["214-2.0.0 Commands: EHLO HELO MAIL"]),
            (b"EXPN staff\r\n", ["502 5.5.1"]),  # RFC 5321 §4.2.4: known, not offered
            (b"\r\n", ["500 5.5.2"]),
        ])

    def test_vrfy_says_the_same_for_every_address(self):
        client = self.connect()
        known = client.send(b"VRFY <alice@example.org>\r\n")
        unknown = client.send(b"VRFY <nobody@example.org>\r\n")
        self.assertEqual(known, unknown)
        self.assertReplies(known, ["252 2.5.0"])
        self.assertReplies(client.send(b"VRFY\r\n"), ["501 5.5.4"])

    def test_quit_closes(self):
        client = self.connect()
        self.assertReplies(client.send(b"QUIT\r\nNOOP\r\n"), ["221 2.0.0"])
        self.assertTrue(client.closed)
        self.assertReplies(client.send(b"NOOP\r\n"), [])

    def test_quit_takes_no_argument(self):
        client = self.connect()
        self.assertReplies(client.send(b"QUIT now\r\n"), ["501 5.5.4"])
        self.assertFalse(client.closed)

    def test_commands_are_case_insensitive_and_bare_lf_is_tolerated(self):
        self.assertTranscript([
            (b"ehlo client.example\n", ["250-"]),
            (b"mail from:<a@remote.example>\n", ["250 2.1.0"]),
            (b"rcpt to:<alice@example.org>\n", ["250 2.1.5"]),
        ])


class DeliveryTests(SMTPFixture, TestCase):
    def test_one_message(self):
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250-", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0 Ok"])
        queue_id = replies[-1].rsplit(" ", 1)[1]
        [message] = self.take_mail("alice@example.org")
        headers = header_lines(message)
        self.assertEqual(headers[0], b"Return-Path: <sender@remote.example>")
        self.assertEqual(headers[1], b"Delivered-To: alice@example.org")
        received = b"\n".join(headers[2:-1])
        self.assertTrue(received.startswith(
            b"Received: from client.example (unknown [192.0.2.10])"), received)
        self.assertIn(f"by {HOSTNAME} (popgate) with ESMTP".encode(), received)
        self.assertIn(f"id {queue_id}".encode(), received)
        self.assertIn(b"for <alice@example.org>;", received)
        self.assertTrue(message.endswith(b"Subject: hello\n\nHello Alice.\n"), message)
        self.assertNotIn(b"\r", message)

    def test_transcript(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250 2.1.0"]), (RCPT_ALICE, ["250 2.1.5"]),
            (b"DATA\r\n", ["354"]), (MESSAGE, ["250 2.0.0 Ok: queued as "]),
            (b"QUIT\r\n", ["221 2.0.0"]),
        ], check=lambda: self.assertEqual(len(self.take_mail("alice@example.org")), 1))

    def test_two_messages_in_one_session(self):
        client = self.connect()
        one = MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE
        replies = client.send(EHLO + one + one)
        self.assertReplies(replies, ["250-"] + ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"] * 2)
        self.assertEqual(len(self.take_mail("alice@example.org")), 2)

    def test_null_sender(self):
        client = self.connect()
        client.send(EHLO + b"MAIL FROM:<>\r\n" + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.startswith(b"Return-Path: <>\n"))

    def test_space_after_colon_is_tolerated(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (b"MAIL FROM: <a@remote.example>\r\n", ["250 2.1.0"]),
            (b"RCPT TO: <alice@example.org>\r\n", ["250 2.1.5"]),
        ])

    def test_several_recipients_get_one_copy_each(self):
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"RCPT TO:<bob@example.org>\r\n"
                              + b"RCPT TO:<Alice+news@EXAMPLE.org>\r\n" + b"DATA\r\n"
                              + MESSAGE)
        self.assertReplies(replies, ["250-", "250", "250 2.1.5", "250 2.1.5", "250 2.1.5",
                                     "354", "250 2.0.0"])
        [alice] = self.take_mail("alice@example.org")
        [bob] = self.take_mail("bob@example.org")
        self.assertIn(b"Delivered-To: alice@example.org\n", alice)
        self.assertIn(b"Delivered-To: bob@example.org\n", bob)
        self.assertIn(b"for <alice@example.org>", alice)

    def test_dot_stuffing_is_undone(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n..first\r\nmiddle\r\n..\r\n"
                    b"...\r\n.\r\n")
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.endswith(b"\n.first\nmiddle\n.\n..\n"), message)

    def test_empty_message(self):
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n.\r\n")
        self.assertReplies(replies, ["250-", "250", "250", "354", "250 2.0.0"])
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.endswith(b"\n"))
        self.assertIn(b"Received:", message)

    def test_eight_bit_and_utf8(self):
        body = "Grüße, ☃\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n.\r\n"
        client = self.connect()
        client.send(EHLO + b"MAIL FROM:<a@remote.example> BODY=8BITMIME SMTPUTF8\r\n"
                    + RCPT_ALICE + b"DATA\r\n" + body)
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.endswith("Grüße, ☃\n".encode() + bytes(range(0x80, 0x100))
                                         + b"\n"))
        self.assertIn(b"with UTF8SMTP id", message)

    def test_smtputf8_addresses(self):
        client = self.connect()
        replies = client.send(EHLO + "MAIL FROM:<jösé@remote.example> SMTPUTF8\r\n".encode()
                              + "RCPT TO:<ünknown@example.org>\r\n".encode() + RCPT_ALICE
                              + b"DATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250-", "250 2.1.0", "550 5.1.1", "250 2.1.5", "354",
                                     "250 2.0.0"])
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.startswith("Return-Path: <jösé@remote.example>\n".encode()))

    def test_non_ascii_address_needs_smtputf8(self):
        self.assertTranscript([
            (EHLO, ["250-"]),
            ("MAIL FROM:<jösé@remote.example>\r\n".encode(), ["553 5.6.7"]),
            (MAIL, ["250 2.1.0"]),
            ("RCPT TO:<ünknown@example.org>\r\n".encode(), ["553 5.6.7"]),
        ])

    def test_invalid_utf8_in_a_command(self):
        self.assertTranscript([(b"NOOP \xff\xfe\r\n", ["500 5.5.2"]), (b"NOOP\r\n", ["250"])])

    def test_250_only_after_the_message_is_durable(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
        # 354 comes at once, with the replies before it; the message waits in the input
        # buffer until its file is open (a little input: reading goes on).
        self.assertReplies(replies, ["250-", "250", "250", "354"])
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(self.maildir_files("alice@example.org", "tmp"), [])
        threads.run_next()  # the files are open: the message is read, then fsynced
        self.assertEqual(client.replies(), [])
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(len(self.maildir_files("alice@example.org", "tmp")), 1)
        self.assertEqual(self.maildir_files("alice@example.org"), [])
        self.clock.advance(1000)  # no idle timeout while the server owes the answer
        self.assertFalse(client.closed)
        threads.run_next()
        self.assertReplies(client.replies(), ["250 2.0.0 Ok: queued as", "250 2.0.0 Ok"])
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(self.maildir_files("alice@example.org")), 1)

    def test_with_spare_files_data_needs_no_thread_call(self):
        """Files made ahead of time: 354 and the message need no thread call of their own,
        and the 250 still waits for the commit."""
        threads = Deferring()
        self.make_factory(run_in_thread=threads, spares=8)
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        while threads.calls:  # the first message: its files, then alice's spares, the commit
            threads.run_next()
        self.assertReplies(replies + client.replies(),
                           ["250-", "250", "250", "354", "250 2.0.0 Ok"])
        spares = self.maildir_files("alice@example.org", "tmp")
        self.assertEqual(len(spares), 2)
        replies = client.send(MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
        self.assertReplies(replies, ["250", "250", "354"])
        # The message went into a spare and is being committed; the spare it took is
        # being replaced.
        self.assertEqual([f for _, f, _ in threads.calls], [make_spares, commit_group])
        self.assertEqual(self.maildir_files("alice@example.org", "tmp"), spares)
        threads.run_next()
        self.assertEqual(len(self.maildir_files("alice@example.org", "tmp")), 3)
        self.assertEqual(client.replies(), [])
        threads.run_next()
        self.assertReplies(client.replies(), ["250 2.0.0 Ok: queued as", "250 2.0.0 Ok"])
        self.assertEqual(len(self.maildir_files("alice@example.org", "tmp")), 2)
        [first, second] = self.take_mail("alice@example.org")
        self.assertTrue(second.startswith(b"Return-Path: <sender@remote.example>\n"))
        self.assertTrue(second.endswith(b"\n\nHello Alice.\n"))
        self.assertEqual(first.split(b"\n", 3)[3].split(b";", 1)[0].split(b" id ")[0],
                         second.split(b"\n", 3)[3].split(b";", 1)[0].split(b" id ")[0])
        # When the server stops, the spares go.
        self.deliverer.close()
        self.assertEqual(self.maildir_files("alice@example.org", "tmp"), [])

    def test_message_data_waits_for_its_file_within_a_bound(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        self.assertReplies(client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n"),
                           ["250-", "250", "250", "354"])
        line = b"x" * 998 + b"\r\n"
        for _ in range(65):
            client.send(line)
        self.assertEqual(client.transport.producerState, "producing")
        client.send(line)  # 64 KiB wait unprocessed: stop reading
        self.assertEqual(client.transport.producerState, "paused")
        threads.run_next()
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b".\r\n")
        threads.run_next()
        self.assertReplies(client.replies(), ["250 2.0.0 Ok: queued as"])
        [message] = self.take_mail("alice@example.org")
        self.assertEqual(message.count(b"x" * 998 + b"\n"), 66)

    def test_failed_commit_answers_451_and_leaves_nothing(self):
        def commit_fails(f, *args):
            if f is commit_group:
                return defer.fail(OSError(28, "No space left on device"))
            return synchronous(f, *args)

        self.make_factory(run_in_thread=commit_fails)
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]), (b"DATA\r\n", ["354"]),
            (MESSAGE, ["452 4.3.1"]), (b"NOOP\r\n", ["250 2.0.0"]),
        ], check=self.check_nothing_stored)

    def test_files_that_cannot_be_created_answer_451(self):
        def open_fails(f, *args):
            if f is not commit_group:
                return defer.fail(OSError(24, "Too many open files"))
            return synchronous(f, *args)

        self.make_factory(run_in_thread=open_fails)
        # DATA is answered 354 before the files exist: the message is read, then refused.
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"DATA\r\n", ["354"]), (MESSAGE, ["451 4.3.0"]), (b"DATA\r\n", ["503 5.5.1"]),
            (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 12\r\nRSET\r\nQUIT\r\n", ["451 4.3.0"]), (b"NOOP\r\n", ["250 2.0.0"]),
        ], check=self.check_nothing_stored)

    def test_connection_lost_while_the_files_are_opened(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        client.disconnect()
        threads.run_next()
        self.check_nothing_stored()

    def test_transaction_is_reset_after_data(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]), (b"DATA\r\n", ["354"]),
            (MESSAGE, ["250 2.0.0"]), (b"DATA\r\n", ["503 5.5.1"]),
            (RCPT_ALICE, ["503 5.5.1"]), (MAIL, ["250 2.1.0"]),
        ])

    def test_rset_discards_the_envelope(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]), (b"RSET\r\n", ["250"]),
            (b"DATA\r\n", ["503 5.5.1"]), (MAIL, ["250 2.1.0"]),
        ])

    def test_session_is_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
        client.disconnect()
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "popgate.session"]
        self.assertEqual(len(lines), 3, lines)
        session = self.recorder.events[0].session.id
        self.assertEqual(lines[0], f"SMTP [{session}] 192.0.2.10:40000 connected")
        [stored] = self.maildir_files("alice@example.org")
        with open(stored, "rb") as f:
            content = f.read()
        size, lines_in_file = len(content), content.count(b"\n")
        self.assertRegex(lines[1], rf"^SMTP \[{session}\] 192.0.2.10:40000 \w{{13}}: delivered "
                                   rf"from <sender@remote.example> to alice@example.org "
                                   rf"\({size} octets stored, {size + lines_in_file} as LIST "
                                   rf"reports them\)$")
        self.assertRegex(lines[2], rf"^SMTP \[{session}\] 192.0.2.10:40000 closed \(quit\): "
                                   rf"1 message\(s\) accepted 0.0 s$")


    def test_delivery_log_line_keeps_braces_and_fields(self):
        """The line is formatted by popgate (cheaper for the observer): text that looks
        like a format field is shown as sent, and the fields are still in the event."""
        events = []
        from twisted.logger import formatEvent, globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.connect()
        client.send(EHLO + b"MAIL FROM:<{peer}{0}@remote.example>\r\n" + RCPT_ALICE
                    + b"DATA\r\n" + MESSAGE)
        [event] = [e for e in events if "delivered" in e.get("log_format", "")]
        self.assertRegex(formatEvent(event), r"^SMTP \[\w+\] 192.0.2.10:40000 \w{13}: "
                                             r"delivered from <\{peer\}\{0\}@remote.example> "
                                             r"to alice@example.org \(\d+ octets stored")
        self.assertEqual(event["sender"], "{peer}{0}@remote.example")
        self.assertEqual(event["users"], ("alice@example.org",))
        self.assertEqual(event["client"], "192.0.2.10:40000")

class SequenceAndSyntaxTests(SMTPFixture, TestCase):
    def test_expn_is_recognised_but_not_available(self):
        self.assertTranscript([(EHLO, ["250-"]), (b"EXPN staff\r\n", ["502 5.5.1"])])

    def test_help_lists_only_what_this_session_can_use(self):
        client = self.connect()
        [reply] = client.send(b"HELP\r\n")
        self.assertIn("EXPN", reply)
        self.assertNotIn("STARTTLS", reply)  # no certificate configured

    def test_refusals_are_logged_once_per_client_and_code(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.connect()
        client.send(EHLO + MAIL)
        for _ in range(3):
            client.send(b"RCPT TO:<nobody@example.org>\r\n")
        # A client guessing addresses is one cause too: the reply's text quotes each one.
        for guess in ("a", "b", "c"):
            client.send(f"RCPT TO:<{guess}@example.org>\r\n".encode())
        refused = [formatEvent(e) for e in events if "refused:" in formatEvent(e)]
        self.assertEqual(len(refused), 1, refused)
        self.assertIn("192.0.2.10", refused[0])
        self.assertIn("550 5.1.1", refused[0])

    def test_mail_needs_ehlo(self):
        self.assertTranscript([(MAIL, ["503 5.5.1"]), (EHLO, ["250-"]), (MAIL, ["250"])])

    def test_nested_mail(self):
        self.assertTranscript([(EHLO, ["250-"]), (MAIL, ["250"]), (MAIL, ["503 5.5.1"])])

    def test_rcpt_needs_mail(self):
        self.assertTranscript([(EHLO, ["250-"]), (RCPT_ALICE, ["503 5.5.1"])])

    def test_data_needs_mail_and_a_recipient(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (b"DATA\r\n", ["503 5.5.1"]), (MAIL, ["250"]),
            (b"RCPT TO:<nobody@example.org>\r\n", ["550 5.1.1"]),
            (b"DATA\r\n", ["554 5.5.1"]), (RCPT_ALICE, ["250"]),
            (b"DATA now\r\n", ["501 5.5.4"]),
        ])

    def test_mail_syntax(self):
        self.assertTranscript([
            (EHLO, ["250-"]),
            (b"MAIL\r\n", ["501 5.5.4"]),
            (b"MAIL FROM\r\n", ["501 5.5.4"]),
            (b"MAIL TO:<a@remote.example>\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:a@remote.example\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example>SIZE=1\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@@remote.example>\r\n", ["501 5.1.7"]),
            (b"MAIL FROM:<a b@remote.example>\r\n", ["501"]),
            (b"MAIL FROM:<\"a b\"@remote.example>\r\n", ["250 2.1.0"]),
        ])

    def test_rcpt_syntax(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]),
            (b"RCPT alice@example.org\r\n", ["501 5.5.4"]),
            (b"RCPT TO:<alice@@example.org>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<alice@example.org> NOTIFY=NEVER\r\n", ["555 5.5.4"]),
            (RCPT_ALICE, ["250 2.1.5"]),
        ])

    def test_mail_parameters(self):
        self.assertTranscript([
            (EHLO, ["250-"]),
            (b"MAIL FROM:<a@remote.example> SIZE=abc\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> SIZE\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> BODY=9BIT\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> BODY\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> SMTPUTF8=yes\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> SIZE=1 SIZE=2\r\n", ["501 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> RET=HDRS\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> AUTH=<>\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> size=100 body=8bitmime smtputf8\r\n",
             ["250 2.1.0"]),
        ])

    def test_a_failed_mail_leaves_no_parameters_behind(self):
        self.assertTranscript([
            (EHLO, ["250-"]),
            (b"MAIL FROM:<bad@@address> BODY=8BITMIME\r\n", ["501 5.1.7"]),
            (MAIL, ["250 2.1.0"]), (RCPT_ALICE, ["250"]), (b"DATA\r\n", ["354"]),
        ])

    def test_declared_size_over_the_limit(self):
        self.make_factory(smtp__max_message_size=1000)
        self.assertTranscript([
            (EHLO, ["250-"]),
            (b"MAIL FROM:<a@remote.example> SIZE=1001\r\n", ["552 5.3.4"]),
            (b"MAIL FROM:<a@remote.example> SIZE=1000\r\n", ["250 2.1.0"]),
        ])

    def test_command_line_over_512_octets(self):
        long_line = b"NOOP " + b"x" * 600 + b"\r\n"
        self.assertTranscript([
            (EHLO, ["250-"]), (long_line, ["500 5.5.2"]), (b"NOOP\r\n", ["250 2.0.0"]),
            (b"MAIL FROM:<" + b"a" * 600 + b"@remote.example>\r\n", ["500 5.5.2"]),
            (MAIL, ["250 2.1.0"]),
        ])

    def test_512_octets_is_still_a_command(self):
        line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        self.assertEqual(len(line), 512)
        self.assertTranscript([(line, ["250 2.0.0"]), (b"NOOP " + line, ["500 5.5.2"])])

    def test_a_100kb_command_line_is_discarded_without_buffering_it(self):
        client = self.connect()
        client.send(EHLO)
        for _ in range(100):
            self.assertEqual(client.send(b"RCPT TO:<x@example.org>" * 44), [])
            self.assertLessEqual(len(client.protocol._buffer), 512)
        replies = client.send(b"\r\n" + MAIL + b"QUIT\r\n")
        self.assertReplies(replies, ["500 5.5.2", "250 2.1.0", "221"])

    def test_a_100kb_line_in_one_packet_then_commands(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (b"A" * 100_000 + b"\r\n", ["500 5.5.2"]),
            (MAIL, ["250 2.1.0"]), (RCPT_ALICE, ["250 2.1.5"]),
        ])


class AddressingTests(SMTPFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.make_factory(**{
            "server__postmaster": "bob@example.org",
            "server__domains": ["extra.example"],
            "aliases.sales@example.org": ["alice@example.org", "bob@example.org"],
            "aliases.@example.net": ["carol@example.net"],
        })

    def rcpt(self, address: str) -> list[str]:
        client = self.connect()
        return client.send(EHLO + MAIL + f"RCPT TO:{address}\r\n".encode())[2:]

    def deliver_to(self, address: str) -> None:
        client = self.connect()
        replies = client.send(EHLO + MAIL + f"RCPT TO:{address}\r\n".encode() + b"DATA\r\n"
                              + MESSAGE)
        self.assertReplies(replies, ["250-", "250", "250 2.1.5", "354", "250 2.0.0"])

    def test_unknown_user(self):
        self.assertReplies(self.rcpt("<nobody@example.org>"),
                           ["550 5.1.1 <nobody@example.org>: no such user here"])
        self.assertReplies(self.rcpt("<nobody@extra.example>"), ["550 5.1.1"])

    def test_relay_denied(self):
        for address in ["<alice@remote.example>", "<@relay.example:alice@example.org>",
                        "<alice%remote.example@example.org>", "<remote!alice@example.org>",
                        '<"alice@remote.example"@example.org>', "<alice@[192.0.2.1]>",
                        "<alice@example.org.remote.example>"]:
            self.assertReplies(self.rcpt(address), ["554 5.7.1"], address + ": ")

    def test_sub_address_and_case(self):
        self.deliver_to("<Alice+Lists@Example.ORG>")
        [message] = self.take_mail("alice@example.org")
        self.assertIn(b"for <Alice+Lists@example.org>", message)

    def test_alias_delivers_to_every_target(self):
        self.deliver_to("<sales@example.org>")
        self.assertEqual(len(self.take_mail("alice@example.org")), 1)
        self.assertEqual(len(self.take_mail("bob@example.org")), 1)

    def test_catch_all(self):
        self.deliver_to("<anything@example.net>")
        [message] = self.take_mail("carol@example.net")
        self.assertIn(b"Delivered-To: carol@example.net\n", message)

    def test_postmaster_of_every_local_domain(self):
        for address in ["<postmaster@example.org>", "<POSTMASTER@extra.example>",
                        "<Postmaster>", "<postmaster@example.net>"]:
            self.deliver_to(address)
            self.assertEqual(len(self.take_mail("bob@example.org")), 1, address)

    def test_postmaster_of_a_foreign_domain_is_relaying(self):
        self.assertReplies(self.rcpt("<postmaster@remote.example>"), ["554 5.7.1"])

    def test_too_many_recipients(self):
        self.make_factory(smtp__max_recipients=2, smtp__max_errors=2)
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250 2.1.5"]),
            (b"RCPT TO:<bob@example.org>\r\n", ["250 2.1.5"]),
            (b"RCPT TO:<carol@example.net>\r\n", ["452 4.5.3"]),
            (b"RCPT TO:<carol@example.net>\r\n", ["452 4.5.3"]),
            (b"RCPT TO:<carol@example.net>\r\n", ["452 4.5.3"]),
            (b"DATA\r\n", ["354"]), (MESSAGE, ["250 2.0.0"]),
        ])


class DataSafetyTests(SMTPFixture, TestCase):
    SMUGGLED = (b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.org>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n")
    END_SEQUENCES = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"]

    def smuggle(self, end: bytes, how: str) -> list[str]:
        client = self.connect()
        envelope = EHLO + MAIL + RCPT_ALICE + b"DATA\r\n"
        message = b"Subject: one\r\n\r\nbody" + end + self.SMUGGLED + b".\r\n"
        if how == "pipelined":
            return client.send(envelope + message)
        replies = client.send(envelope)
        if how == "bytewise":
            for byte in message:
                replies += client.send(bytes([byte]))
        else:
            replies += client.send(message)
        return replies

    def test_bare_line_ends_never_end_data(self):
        for end in self.END_SEQUENCES:
            for how in ("pipelined", "after 354", "bytewise"):
                context = f"{end!r} {how}: "
                replies = self.smuggle(end, how)
                self.assertReplies(replies, ["250-", "250", "250", "354", "250 2.0.0"], context)
                [message] = self.take_mail("alice@example.org")
                self.assertIn(b"\nMAIL FROM:<evil@remote.example>\nRCPT TO:<bob@example.org>"
                              b"\nDATA\nSubject: smuggled\n", message, context)
                self.assertEqual(self.take_mail("bob@example.org"), [], context)

    def test_bare_line_ends_refused_when_configured(self):
        self.make_factory(smtp__bare_newline="reject")
        for end in self.END_SEQUENCES:
            for how in ("pipelined", "after 354", "bytewise"):
                context = f"{end!r} {how}: "
                replies = self.smuggle(end, how)
                self.assertReplies(replies, ["250-", "250", "250", "354", "554 5.6.0"], context)
                self.assertEqual(self.maildir_files("alice@example.org"), [], context)
                self.assertEqual(self.maildir_files("alice@example.org", "tmp"), [], context)
                self.assertEqual(self.maildir_files("bob@example.org"), [], context)

    def test_clean_message_accepted_when_bare_line_ends_are_refused(self):
        self.make_factory(smtp__bare_newline="reject")
        replies = self.connect().send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["250-", "250", "250", "354", "250 2.0.0"])

    def test_bare_line_ends_are_stored_as_line_ends(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\na\nb\rc\r\n.\r\n")
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.endswith(b"\na\nb\nc\n"), message)

    def test_a_100kb_data_line_never_flips_to_command_mode(self):
        line = b"x" * 100_000
        body = line + b"\r\n" + self.SMUGGLED + b".\r\n"
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]), (b"DATA\r\n", ["354"]),
            (body, ["250 2.0.0"]), (b"NOOP\r\n", ["250 2.0.0"]),
        ], check=lambda: self.check_one_message_with(line + b"\nMAIL FROM:<evil"))

    def check_one_message_with(self, content: bytes) -> None:
        [message] = self.take_mail("alice@example.org")
        self.assertIn(content, message)
        self.assertEqual(self.take_mail("bob@example.org"), [])

    def test_message_over_the_size_limit(self):
        self.make_factory(smtp__max_message_size=1000)
        body = (b"y" * 99 + b"\r\n") * 20 + b".\r\n"
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]), (b"DATA\r\n", ["354"]),
            (body, ["552 5.3.4"]), (b"NOOP\r\n", ["250 2.0.0"]),
            (MAIL, ["250 2.1.0"]),
        ], check=self.check_nothing_stored)

    def test_oversized_message_is_not_buffered(self):
        self.make_factory(smtp__max_message_size=1000)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        for _ in range(1000):
            self.assertEqual(client.send(b"z" * 1000 + b"\r\n"), [])
            self.assertLess(len(client.protocol._buffer), 10)
        self.assertReplies(client.send(b".\r\n"), ["552 5.3.4"])
        self.check_nothing_stored()

    def test_message_at_the_size_limit(self):
        self.make_factory(smtp__max_message_size=1010)
        body = (b"y" * 99 + b"\r\n") * 10 + b".\r\n"
        replies = self.connect().send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + body)
        self.assertReplies(replies, ["250-", "250", "250", "354", "250 2.0.0"])


class BDATTests(SMTPFixture, TestCase):
    def test_a_refused_chunk_fails_the_transaction(self):
        """RFC 3030 §2: after a failed chunk the later ones are discarded, never stored as
        a truncated message (the files cannot be opened for the first chunk here)."""
        calls = []

        def fail_first(f, *args):
            calls.append(f)
            if len(calls) == 1:
                return defer.fail(OSError(28, "No space left on device"))
            return synchronous(f, *args)

        self.make_factory(run_in_thread=fail_first)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE)
        replies = client.send(b"BDAT 6\r\nPART1\nBDAT 7 LAST\r\nPART2\r\n")
        self.assertReplies(replies, ["452 4.3.1", "503 5.5.1"])
        self.assertEqual(self.take_mail("alice@example.org"), [])

    def test_bdat_zero_last_pipelined_replies_stay_in_order(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE)
        replies = client.send(b"BDAT 0 LAST\r\nMAIL FROM:<z@remote.example>\r\nNOOP\r\n")
        while threads.calls:
            self.assertEqual(replies, [], "nothing may be answered before the message")
            threads.run_next()
            replies += client.replies()
        self.assertReplies(replies, ["250 2.0.0 Ok: queued as", "250 2.1.0", "250 2.0.0"])

    def test_connection_lost_while_the_files_of_an_empty_chunk_are_opened(self):
        """BDAT 0 (LAST or not) ends its chunk as soon as the files are open: if the
        session went away meanwhile there is no message left to end, and no error."""
        for command in (b"BDAT 0 LAST\r\n", b"BDAT 0\r\n"):
            threads = Deferring()
            self.make_factory(run_in_thread=threads)
            client = self.connect()
            client.send(EHLO + MAIL + RCPT_ALICE + command)
            client.disconnect()
            while threads.calls:
                threads.run_next()
            self.assertEqual(self.flushLoggedErrors(), [], command)
            self.check_nothing_stored()

    def test_a_drain_while_the_files_of_an_empty_chunk_are_opened(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"BDAT 0 LAST\r\n")
        d = self.factory.sessions.drain(5)
        self.assertReplies(client.replies(), ["421 4.3.2"])
        while threads.calls:
            threads.run_next()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(client.replies(), [])
        client.disconnect()
        self.successResultOf(d)
        self.check_nothing_stored()

    def test_chunks(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 18\r\nSubject: x\r\n\r\nab\r\n", ["250 2.0.0 18 octets received"]),
            (b"BDAT 22 LAST\r\nQUIT\r\n.\r\nRSET\r\nfinal\r\n", ["250 2.0.0 Ok: queued as"]),
            (b"NOOP\r\n", ["250 2.0.0"]),
        ], check=lambda: self.assertTrue(self.take_mail("alice@example.org")[0].endswith(
            b"Subject: x\n\nab\nQUIT\n.\nRSET\nfinal\n")))

    def test_crlf_split_between_chunks(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd")
        [message] = self.take_mail("alice@example.org")
        self.assertTrue(message.endswith(b"\nab\ncd\n"), message)

    def test_bdat_zero_last(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 5\r\nhello", ["250 2.0.0 5 octets"]),
            (b"BDAT 0 LAST\r\n", ["250 2.0.0 Ok: queued"]),
        ])

    def test_binarymime_is_refused(self):
        # Maildir keeps LF line ends, so a binary body could not be stored unaltered.
        self.assertTranscript([
            (EHLO, ["250-"]),
            (b"MAIL FROM:<a@remote.example> BODY=BINARYMIME\r\n", ["555 5.5.4"]),
            (b"MAIL FROM:<a@remote.example> BODY=8BITMIME\r\n", ["250"]),
        ])

    def test_no_data_after_bdat(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 2\r\nab", ["250 2.0.0"]), (b"DATA\r\n", ["503 5.5.1"]),
            (b"BDAT 2 LAST\r\ncd", ["250 2.0.0 Ok: queued"]),
        ])

    def test_chunk_out_of_sequence_is_read_then_refused(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (b"BDAT 12\r\nQUIT\r\nNOOP\r\n", ["503 5.5.1"]),
            (MAIL, ["250"]), (b"BDAT 6 LAST\r\nRSET\r\n", ["554 5.5.1"]),
            (b"NOOP\r\n", ["250 2.0.0"]),
        ])

    def test_bdat_syntax(self):
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT\r\n", ["501 5.5.4"]), (b"BDAT x\r\n", ["501 5.5.4"]),
            (b"BDAT -1\r\n", ["501 5.5.4"]), (b"BDAT 1 FIRST\r\n", ["501 5.5.4"]),
            (b"BDAT 1 LAST now\r\n", ["501 5.5.4"]),
        ])

    def test_chunks_over_the_size_limit(self):
        self.make_factory(smtp__max_message_size=100)
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 60\r\n" + b"a" * 60, ["250 2.0.0"]),
            (b"BDAT 60\r\n" + b"b" * 60, ["552 5.3.4"]),
            (b"BDAT 10 LAST\r\n" + b"c" * 10, ["503 5.5.1"]),
            (b"NOOP\r\n", ["250 2.0.0"]),
        ], check=lambda: self.assertEqual(self.maildir_files("alice@example.org", "tmp"), []))

    def test_last_chunk_over_the_size_limit(self):
        self.make_factory(smtp__max_message_size=100)
        self.assertTranscript([
            (EHLO, ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"BDAT 1000 LAST\r\n" + b"a" * 1000, ["552 5.3.4"]),
            (MAIL, ["250 2.1.0"]),
        ], check=lambda: self.assertEqual(self.maildir_files("alice@example.org"), []))


class STARTTLSTests(SMTPFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.creator = object()
        self.make_factory(tls=self.creator)

    def test_injected_commands_are_discarded(self):
        client = self.connect()
        client.send(EHLO)
        replies = client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.example>\r\n")
        self.assertEqual(replies, ["220 2.0.0 Ready to start TLS"])
        self.assertIs(client.transport.tls_creator, self.creator)
        # Nothing was written after the 220 that precedes the handshake.
        self.assertEqual(client.transport.written_before_tls,
                         b"220 2.0.0 Ready to start TLS\r\n")
        # After the handshake: a fresh session that needs EHLO, and no injected MAIL.
        self.assertReplies(client.send(RCPT_ALICE), ["503 5.5.1"])
        self.assertReplies(client.send(MAIL), ["503 5.5.1"])

    def test_session_is_reset(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE)
        client.send(b"STARTTLS\r\n")
        [ehlo] = client.send(EHLO)
        self.assertNotIn("STARTTLS", ehlo)
        replies = client.send(RCPT_ALICE + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        self.assertReplies(replies, ["503 5.5.1", "250", "250", "354", "250 2.0.0"])
        [message] = self.take_mail("alice@example.org")
        self.assertIn(b"with ESMTPS id", message)

    def test_starttls_twice(self):
        client = self.connect()
        client.send(EHLO + b"STARTTLS\r\n")
        self.assertReplies(client.send(EHLO + b"STARTTLS\r\n"), ["250-", "503 5.5.1"])

    def test_starttls_takes_no_argument(self):
        self.assertReplies(self.connect().send(b"STARTTLS now\r\n"), ["501 5.5.4"])

    def test_starttls_without_a_certificate(self):
        self.make_factory()
        self.assertReplies(self.connect().send(EHLO + b"STARTTLS\r\n"), ["250-", "502 5.5.1"])

    def test_implicit_tls(self):
        self.make_factory(tls=self.creator, implicit_tls=True)
        client = self.connect()
        [ehlo] = client.send(EHLO)
        self.assertNotIn("STARTTLS", ehlo)
        self.assertReplies(client.send(b"STARTTLS\r\n"), ["503 5.5.1"])
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE)
        [message] = self.take_mail("alice@example.org")
        self.assertIn(b"with ESMTPS id", message)


class LMTPTests(SMTPFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.make_factory(lmtp=True)

    def test_greeting_and_lhlo(self):
        client = Client(self.factory)
        self.assertEqual(client.replies(), [f"220 {HOSTNAME} LMTP popgate"])
        self.assertReplies(client.send(EHLO + b"HELO x\r\n"), ["500 5.5.2", "500 5.5.2"])
        [reply] = client.send(b"LHLO client.example\r\n")
        self.assertIn("250-PIPELINING", reply)
        self.assertIn("250 CHUNKING", reply)

    def test_data_without_recipients_is_a_sequence_error(self):
        client = Client(self.factory)
        client.send(b"LHLO client.example\r\n" + MAIL)
        self.assertReplies(client.send(b"RCPT TO:<nobody@example.org>\r\nDATA\r\n"),
                           ["550 5.1.1", "503 5.5.1"])  # RFC 2033 §4.2

    def test_lhlo_is_not_smtp(self):
        self.make_factory()
        self.assertReplies(self.connect().send(b"LHLO x\r\n"), ["500 5.5.2"])

    def test_one_reply_per_recipient(self):
        steps = [
            (b"LHLO client.example\r\n", ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"RCPT TO:<nobody@example.org>\r\n", ["550 5.1.1"]),
            (b"RCPT TO:<bob@example.org>\r\n", ["250"]), (b"DATA\r\n", ["354"]),
            (MESSAGE, ["250 2.0.0 <alice@example.org> Ok: queued as",
                       "250 2.0.0 <bob@example.org> Ok: queued as"]),
        ]

        def check():
            [message] = self.take_mail("alice@example.org")
            self.assertIn(b" with LMTP id ", message)
            self.assertEqual(len(self.take_mail("bob@example.org")), 1)
        self.assertTranscript(steps, check=check)

    def test_refusal_per_recipient(self):
        self.make_factory(lmtp=True, smtp__max_message_size=10)
        self.assertTranscript([
            (b"LHLO client.example\r\n", ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"RCPT TO:<bob@example.org>\r\n", ["250"]), (b"DATA\r\n", ["354"]),
            (MESSAGE, ["552 5.3.4 <alice@example.org>", "552 5.3.4 <bob@example.org>"]),
        ])

    def test_bdat(self):
        self.assertTranscript([
            (b"LHLO client.example\r\n", ["250-"]), (MAIL, ["250"]), (RCPT_ALICE, ["250"]),
            (b"RCPT TO:<bob@example.org>\r\n", ["250"]),
            (b"BDAT 3\r\nab\n", ["250 2.0.0 3 octets"]),
            (b"BDAT 0 LAST\r\n", ["250 2.0.0 <alice@example.org>",
                                  "250 2.0.0 <bob@example.org>"]),
        ])


class TimeoutTests(SMTPFixture, TestCase):
    def test_a_peer_that_stops_reading_is_cut_after_the_grace_period(self):
        client = self.connect()
        client.transport.abortConnection = lambda: setattr(client, "aborted", True)
        client.send(b"QUIT\r\n")
        self.assertTrue(client.closed)
        # The transport could not flush (the peer reads nothing): connectionLost is
        # never called, so the session must end itself.
        self.clock.advance(lineproto.CLOSE_GRACE - 1)
        self.assertFalse(getattr(client, "aborted", False))
        self.clock.advance(1)
        self.assertTrue(getattr(client, "aborted", False))

    def setUp(self):
        super().setUp()
        self.make_factory(smtp__command_timeout=300, smtp__data_timeout=180,
                          smtp__max_session_time=1000)

    def test_the_session_limit_waits_for_a_commit_in_flight(self):
        """A message being made durable is answered before the 421: its 250 must not be
        lost (the client would send it again, and it would be stored twice)."""
        threads = Deferring()
        self.make_factory(run_in_thread=threads, smtp__max_session_time=100)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        threads.run_next()  # the files open
        self.clock.advance(90)
        self.assertReplies(client.send(MESSAGE + b"NOOP\r\n"), [])  # the commit waits
        self.clock.advance(10)  # the session's time is up
        self.assertEqual(client.replies(), [])
        self.assertFalse(client.closed)
        threads.run_next()
        self.assertReplies(client.replies(), ["250 2.0.0 Ok: queued as",
                                              f"421 4.4.2 {HOSTNAME} Error: session time"])
        self.assertTrue(client.closed)
        self.assertEqual(len(self.maildir_files("alice@example.org")), 1)

    def test_command_timeout(self):
        client = self.connect()
        self.clock.advance(299)
        self.assertReplies(client.send(b"NOOP\r\n"), ["250"])
        self.clock.advance(299)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertReplies(client.replies(), [f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"])
        self.assertTrue(client.closed)

    def test_a_trickled_command_line_does_not_reset_the_timeout(self):
        client = self.connect()
        for byte in b"NOOP":
            self.clock.advance(100)
            client.send(bytes([byte]))
        self.assertTrue(client.closed)

    def test_data_timeout_per_block(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        for _ in range(3):
            self.clock.advance(179)
            client.send(b"more data\r\n")
        self.assertEqual(len(self.maildir_files("alice@example.org", "tmp")), 1)
        self.clock.advance(180)
        self.assertReplies(client.replies(), ["421 4.4.2"])
        self.assertTrue(client.closed)
        self.assertEqual(self.maildir_files("alice@example.org", "tmp"), [])

    def test_session_time_limit(self):
        client = self.connect()
        for _ in range(9):
            self.clock.advance(100)
            client.send(b"NOOP\r\n")
        self.assertFalse(client.closed)
        self.clock.advance(100)
        self.assertReplies(client.replies(), ["421 4.4.2"])
        self.assertTrue(client.closed)

    def test_timers_stop_when_the_connection_is_lost(self):
        client = self.connect()
        client.disconnect()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AbuseTests(SMTPFixture, TestCase):
    def test_error_limit(self):
        self.make_factory(smtp__max_errors=3)
        self.assertTranscript([
            (b"FOO\r\n", ["500 5.5.2"]), (b"MAIL FROM:<a@b.example>\r\n", ["503 5.5.1"]),
            (b"NOOP\r\n", ["250"]),
            (b"BAR\r\n", ["500 5.5.2", f"421 4.7.0 {HOSTNAME} Error: too many errors"]),
            (b"NOOP\r\n", []),
        ])

    def test_unknown_recipients_count_as_errors(self):
        self.make_factory(smtp__max_errors=3)
        client = self.connect()
        replies = client.send(EHLO + MAIL + b"".join(
            f"RCPT TO:<user{n}@example.org>\r\n".encode() for n in range(5)))
        self.assertReplies(replies, ["250-", "250", "550 5.1.1", "550 5.1.1", "550 5.1.1",
                                     "421 4.7.0"])
        self.assertTrue(client.closed)

    def test_connection_cap_per_ip(self):
        from popgate.limits import ConnectionLimiter
        self.make_factory(limiter=ConnectionLimiter(10, 1))
        first = self.connect("192.0.2.1")
        refused = Client(self.factory, "192.0.2.1")
        self.assertEqual(refused.replies(),
                         [f"421 4.7.0 {HOSTNAME} too many sessions from your address"])
        self.assertTrue(refused.closed)
        other = Client(self.factory, "192.0.2.2")
        self.assertTrue(other.replies()[0].startswith("220 "))
        first.disconnect()
        again = Client(self.factory, "192.0.2.1")
        self.assertTrue(again.replies()[0].startswith("220 "))

    def test_total_connection_cap(self):
        from popgate.limits import ConnectionLimiter
        self.make_factory(limiter=ConnectionLimiter(2, 10))
        self.connect("192.0.2.1")
        self.connect("192.0.2.2")
        refused = Client(self.factory, "192.0.2.3")
        self.assertEqual(refused.replies(), [f"421 4.7.0 {HOSTNAME} too many sessions"])
        self.assertEqual(self.limiter.total, 2)

    def test_replies_stop_while_the_client_does_not_read(self):
        client = self.connect()
        client.protocol.pauseProducing()  # as the transport does when its buffer is full
        self.assertEqual(client.send(b"NOOP\r\n" * 3), [])
        # The transport keeps reading (a TLS handshake may need it) until input backs up.
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.send(b"NOOP\r\n" * 11_000), [])
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.resumeProducing()
        self.assertReplies(client.replies(), ["250"] * 11_003)
        self.assertEqual(client.transport.producerState, "producing")

    def test_internal_errors_are_answered_451(self):
        self.make_factory()

        def broken(mailbox):
            raise RuntimeError("secret internals")

        self.factory.router.resolve = broken
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"NOOP\r\n")
        self.assertReplies(replies, ["250-", "250", "451 4.3.0", "250 2.0.0"])
        self.assertNotIn(b"secret", client.output)
        self.assertNotIn(b"Traceback", client.output)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_internal_error_during_data_closes_the_session(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")

        def broken(data):
            raise RuntimeError("secret internals")

        client.protocol.message.data_decoder.feed = broken
        self.assertReplies(client.send(b"x\r\nRSET\r\n"), ["451 4.3.0"])
        self.assertTrue(client.closed)
        self.assertEqual(self.maildir_files("alice@example.org", "tmp"), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_random_byte_soup(self):
        rng = random.Random(20260310)
        pieces = [b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b"EHLO x", b"HELO y", b"MAIL FROM:",
                  b"RCPT TO:", b"<alice@example.org>", b"<>", b"DATA", b"BDAT ", b"LAST",
                  b"RSET", b"NOOP", b"STARTTLS", b"VRFY", b"HELP", b" SIZE=", b" BODY=",
                  b"BINARYMIME", b"SMTPUTF8", b"9" * 30, b"1", b"0", b"\x00", b"\xff",
                  "ü".encode(), b" ", b"<", b">", b"@", b"%", b"!", b'"', b"x" * 600]
        self.make_factory(tls=object(), smtp__max_errors=1000, smtp__max_message_size=5000)
        for _ in range(300):
            client = self.connect()
            soup = b"".join(rng.choice(pieces) if rng.random() < 0.8 else rng.randbytes(3)
                            for _ in range(rng.randrange(1, 200)))
            position = 0
            while position < len(soup):
                size = rng.randrange(1, 64)
                client.protocol.dataReceived(soup[position:position + size])
                position += size
            output = client.output
            self.assertNotIn(b"Traceback", output)
            for line in output.split(b"\r\n")[:-1]:
                self.assertRegex(line, rb"^[2-5]\d\d[ -]", soup)
            self.assertNotIn(b"\r\n451 ", b"\r\n" + output, soup)
            client.disconnect()
        self.assertEqual(self.limiter.total, 0)


class MessageCheckTests(SMTPFixture, TestCase):
    """The seam between the end of data and 250: checks the protocol knows nothing of."""

    def test_a_check_adds_a_header_above_the_trace_headers(self):
        seen = []

        class Stamp:
            def check(self, transaction):
                with transaction.open_content() as content:
                    seen.append(content.read())
                return Verdict(headers=("Authentication-Results: mx.example.net; none",))

        big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000  # past one write buffer
        for body in (MESSAGE, big + b".\r\n"):
            self.make_factory(checks=[Stamp()])
            client = self.connect()
            replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + body)
            self.assertReplies(replies, ["250-", "250", "250", "354", "250 2.0.0 Ok"])
            [message] = self.take_mail("alice@example.org")
            self.assertTrue(message.startswith(
                b"Authentication-Results: mx.example.net; none\nReturn-Path: <"), message[:80])
            self.assertEqual(seen.pop(), body[:-3].replace(b"\r\n", b"\n"))
            [delivered] = self.recorder.of("message", action="delivered")
            self.assertEqual(delivered.data["octets"], len(message))

    def test_a_refusing_check_stops_the_later_ones_and_stores_nothing(self):
        later = []

        class Refuse:
            def check(self, transaction):
                return defer.succeed(Verdict(reply=Reply(550, "5.7.1", "Rejected by policy")))

        class Later:
            def check(self, transaction):
                later.append(transaction)
                return Verdict()

        self.make_factory(checks=[Refuse(), Later()])
        client = self.connect()
        replies = client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
        self.assertReplies(replies, ["250-", "250", "250", "354",
                                     "550 5.7.1 Rejected by policy", "250 2.0.0 Ok"])
        self.assertEqual(later, [])
        self.check_nothing_stored()
        self.assertEqual(self.recorder.of("message"), [])


class SessionEventTests(SMTPFixture, TestCase):
    def test_an_unoffered_auth_is_published_without_its_secret(self):
        """popgate's SMTP offers no AUTH, but a client may still send its password in an
        initial response (RFC 4954 §4): the command event never carries it."""
        client = self.connect()
        secret = "AGFsaWNlAHMzY3JldA=="  # PLAIN: alice / s3cret
        sent = f"AUTH PLAIN {secret}\r\nAUTH LOGIN\r\nPASS s3cret\r\n"  # or a POP3 client
        self.assertReplies(client.send(sent.encode()), ["500 5.5.2"] * 3)
        commands = [e.data["line"] for e in self.recorder.of("command")]
        self.assertEqual(commands, ["AUTH PLAIN ********", "AUTH LOGIN", "PASS ********"])

    def test_a_session_publishes_what_it_does(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"RCPT TO:<nobody@example.org>\r\n"
                    + b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
        client.disconnect()  # what the reactor does once the 221 is flushed
        kinds = [e.kind for e in self.recorder.events]
        self.assertEqual(kinds[0], "connected")
        self.assertEqual(kinds[-1], "closed")
        commands = [e.data["line"] for e in self.recorder.of("command")]
        self.assertEqual(commands, ["EHLO client.example", "MAIL FROM:<sender@remote.example>",
                                    "RCPT TO:<alice@example.org>",
                                    "RCPT TO:<nobody@example.org>", "DATA", "QUIT"])
        replies = [e.data["line"] for e in self.recorder.of("reply")]
        self.assertEqual(replies[0], f"220 {HOSTNAME} ESMTP popgate")
        self.assertEqual(replies[1], f"250-{HOSTNAME}")  # a multi-line reply: its first line
        self.assertEqual(self.recorder.of("reply")[1].data["lines"], 7)
        self.assertTrue(replies[-2].startswith("250 2.0.0 Ok: queued as "))
        [refused] = self.recorder.of("refused")
        self.assertEqual(refused.data["reply"],
                         "550 5.1.1 <nobody@example.org>: no such user here")
        [delivered] = self.recorder.of("message")
        self.assertEqual(delivered.data["recipients"], ("alice@example.org",))
        self.assertEqual(delivered.data["summary"], "Subject: hello")
        self.assertEqual(delivered.data["latency"], 0.0)  # the fake clock did not move
        [stored] = self.maildir_files("alice@example.org")
        with open(stored, "rb") as f:
            content = f.read()
        self.assertEqual(delivered.data["octets"], len(content))
        self.assertEqual(delivered.data["list_octets"], len(content) + content.count(b"\n"))
        [closed] = self.recorder.of("closed")
        self.assertEqual((closed.data["reason"], closed.data["messages"]), ("quit", 1))
        ids = {e.session.id for e in self.recorder.events}
        self.assertEqual(len(ids), 1)

    def test_two_sessions_from_one_host_have_their_own_ids(self):
        first, second = self.connect(), self.connect()
        self.assertNotEqual(first.protocol.info.id, second.protocol.info.id)


class ShutdownDrainTests(SMTPFixture, TestCase):
    """SIGTERM: idle sessions get 421 4.3.2, a commit in flight is answered first."""

    def test_an_idle_session_is_told_and_closed(self):
        client = self.connect()
        client.send(EHLO + MAIL)
        d = self.factory.sessions.drain(5)
        self.assertReplies(client.replies(), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertNoResult(d)
        client.disconnect()
        self.successResultOf(d)
        [closed] = self.recorder.of("closed")
        self.assertEqual(closed.data["reason"], "server shutdown")

    def test_a_message_half_sent_is_refused_and_not_stored(self):
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\nSubject: half\r\n")
        self.factory.sessions.drain(5)
        self.assertReplies(client.replies(), ["421 4.3.2"])
        client.disconnect()
        self.check_nothing_stored()

    def test_a_commit_in_flight_is_answered_before_the_421(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        threads.run_next()  # the files open
        self.assertReplies(client.send(MESSAGE), [])  # the commit waits in its thread
        d = self.factory.sessions.drain(5)
        self.assertEqual(client.replies(), [])
        self.assertFalse(client.closed)
        threads.run_next()
        self.assertReplies(client.replies(), ["250 2.0.0 Ok: queued as", "421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertEqual(len(self.maildir_files("alice@example.org")), 1)
        client.disconnect()
        self.successResultOf(d)

    def test_what_is_left_after_the_drain_time_is_cut(self):
        threads = Deferring()
        self.make_factory(run_in_thread=threads)
        client = self.connect()
        client.send(EHLO + MAIL + RCPT_ALICE + b"DATA\r\n")
        threads.run_next()
        client.send(MESSAGE)
        d = self.factory.sessions.drain(5)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertTrue(client.transport.disconnecting)
        client.disconnect()
        [closed] = self.recorder.of("closed")
        self.assertEqual(closed.data["reason"], "server shutdown: drain time exceeded")
