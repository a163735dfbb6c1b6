"""Protocol-transcript tests for popgate.pop3.server over StringTransport and a fake clock.

Every test drives a real POP3Server (built by POP3Factory) against a real Maildir in a
temporary directory, a real user file, the real cred checker and the real realm; only the
thread pool is replaced by a synchronous stand-in and time by ``task.Clock``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import subprocess
import sys

from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from popgate import __version__, config, lineproto
from popgate.auth.login import Authenticator
from popgate.auth.penalty import CHECKS_PER_ADDRESS, AuthPenalty, ChecksPerAddress
from popgate.auth.users import PasswordChecker, UserDB, UserFile, hash_password
from popgate.limits import ConnectionLimiter
from popgate.pop3 import server as pop3
from popgate.pop3.realm import Maildrop, MaildropRealm, apply_update
from popgate.store.maildir import Maildir, MaildirStore, commit
from tests.fakes import synchronous
from tests.transcript import Connection, observed_bus

ALICE = "alice@example.org"
BOB = "bob@example.org"
LOOPBACK = "127.0.0.1"
REMOTE = "192.0.2.7"  # TEST-NET-1: neither loopback nor TLS
TLS_CREATOR = object()  # startTLS is recorded, not performed, by RecordingTransport


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


def wire(stored: bytes) -> bytes:
    """How RFC 1939 §3 says a stored (LF) message travels: CRLF, dot-stuffed, '.' ends it."""
    lines = stored.split(b"\n")
    ends_with_newline = lines[-1] == b""
    if ends_with_newline:
        lines.pop()
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)
    return body + b".\r\n"


def unstuff(reply: bytes) -> bytes:
    """What a client keeps of a multi-line body (without the status line)."""
    assert reply.endswith(b"\r\n.\r\n") or reply == b".\r\n", reply[-20:]
    lines = reply[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def holding_the_update():
    """A run_in_thread that holds the UPDATE step (QUIT's deletions) until released."""
    pending = []

    def run_in_thread(f, *args):
        if f is apply_update:
            d = defer.Deferred()
            pending.append(lambda: d.callback(f(*args)))
            return d
        return synchronous(f, *args)

    return run_in_thread, pending


Session = Connection


class POP3TestCase(unittest.TestCase):
    """A user database, a Maildir store, a fake clock and a factory per test."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.users_path = os.path.join(self.root, "users")
        UserFile(self.users_path).add(ALICE, hash_password("pw", "PLAIN"))
        UserFile(self.users_path).add(BOB, hash_password("bob secret", "PLAIN"))
        self.users = UserDB(self.users_path)
        self.store = MaildirStore(os.path.join(self.root, "mail"), "test.host")
        self.clock = task.Clock()
        self.checker = PasswordChecker(self.users, synchronous)
        self.factory = self.make_factory()

    def make_factory(self, tls=None, implicit_tls=False, run_in_thread=synchronous,
                     **overrides) -> pop3.POP3Factory:
        settings = {"server.data_dir": self.root, "server.hostname": "mx.test"}
        settings.update(overrides)
        self.config = config.load(None, settings)
        limits = self.config.limits
        self.penalty = AuthPenalty(self.clock, limits.auth_delay, limits.auth_delay_max,
                                   limits.penalty_window)
        self.limiter = ConnectionLimiter(limits.max_sessions, limits.max_sessions_per_ip)
        portal = Portal(MaildropRealm(self.users, self.store, run_in_thread), [self.checker])
        self.password_checks = ChecksPerAddress()
        self.events, self.recorder = observed_bus(self.clock)
        authenticator = Authenticator(portal, self.penalty, self.password_checks, self.clock)
        return pop3.POP3Factory(config=self.config, authenticator=authenticator,
                                clock=self.clock, limiter=self.limiter, events=self.events,
                                tls=tls, implicit_tls=implicit_tls)

    def connect(self, peer: str = LOOPBACK, factory=None, **transport_options) -> Session:
        session = Connection(factory or self.factory, peer, **transport_options)
        self.addCleanup(session.drop)
        return session

    def open_session(self, user=ALICE, password="pw", **options) -> Session:
        """Connected, greeted and logged in."""
        session = self.connect(**options)
        session.take()
        reply = session.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        self.assertIn(b"+OK Logged in", reply)
        return session

    def maildir(self, user=ALICE) -> Maildir:
        return self.store.maildir(self.users.get(user))

    def deliver(self, body: bytes, user=ALICE) -> str:
        """Deliver as popgate's SMTP side does; return the path in new/."""
        message = self.store.new_message(self.maildir(user))
        message.write(body)
        commit([message])
        return message.final_path

    def deliver_foreign(self, name: str, body: bytes, sub: str = "new") -> str:
        """A message written by another tool: no S=/W= in its name."""
        path = os.path.join(self.maildir().path, sub, name)
        with open(path, "wb") as f:
            f.write(body)
        return path

    def message_files(self, user=ALICE) -> list[str]:
        return [info.path for info in self.maildir(user).scan()]


class GreetingAndCapabilityTests(POP3TestCase):
    def test_greeting_without_apop_has_no_timestamp(self):
        self.assertEqual(self.connect().take(), b"+OK popgate ready.\r\n")

    def test_greeting_with_apop_has_a_fresh_timestamp(self):
        factory = self.make_factory(**{"pop3.apop": True})
        first = self.connect(factory=factory).take()
        second = self.connect(factory=factory).take()
        self.assertRegex(first, rb"^\+OK popgate ready\. <\d+\.[0-9.a-f]+@mx\.test>\r\n$")
        self.assertNotEqual(first, second)

    def test_tcp_nodelay_is_set(self):
        self.assertIs(self.connect().transport.no_delay, True)

    def capabilities(self, session: Session) -> list[str]:
        session.take()
        reply = session.command("CAPA")
        lines = reply.split("\r\n")
        self.assertEqual(lines[0], "+OK Capability list follows")
        self.assertEqual(lines[-2:], [".", ""])
        return lines[1:-2]

    def test_capa_on_loopback_before_login(self):
        session = self.connect()
        session.take()
        self.assertEqual(self.capabilities(session), [
            "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER",
            "SASL PLAIN", f"IMPLEMENTATION popgate {__version__}"])

    def test_capa_after_login_is_the_same_without_stls(self):
        factory = self.make_factory(tls=TLS_CREATOR)
        session = self.connect(factory=factory)
        self.assertIn("STLS", self.capabilities(session))
        session.send(b"USER alice@example.org\r\nPASS pw\r\n")
        capabilities = self.capabilities(session)
        self.assertNotIn("STLS", capabilities)
        self.assertIn("USER", capabilities)
        self.assertIn("UIDL", capabilities)

    def test_capa_off_loopback_hides_plaintext_mechanisms(self):
        capabilities = self.capabilities(self.connect(peer=REMOTE))
        self.assertNotIn("USER", capabilities)
        self.assertFalse([c for c in capabilities if c.startswith("SASL")])
        self.assertNotIn("STLS", capabilities, "no TLS configured")

    def test_capa_off_loopback_offers_stls_when_configured(self):
        factory = self.make_factory(tls=TLS_CREATOR)
        capabilities = self.capabilities(self.connect(peer=REMOTE, factory=factory))
        self.assertIn("STLS", capabilities)
        self.assertNotIn("USER", capabilities)

    def test_capa_never_claims_unenforced_policies(self):
        capabilities = self.capabilities(self.connect())
        for absent in ("EXPIRE", "LOGIN-DELAY", "PIPELINE", "UTF8"):
            self.assertFalse([c for c in capabilities if c.startswith(absent + " ")
                              or c == absent], absent)

    def test_capa_with_allow_plaintext_auth(self):
        factory = self.make_factory(**{"tls.allow_plaintext_auth": True})
        self.assertIn("USER", self.capabilities(self.connect(peer=REMOTE, factory=factory)))

    def test_capa_on_implicit_tls_listener(self):
        factory = self.make_factory(tls=TLS_CREATOR, implicit_tls=True)
        capabilities = self.capabilities(self.connect(peer=REMOTE, factory=factory))
        self.assertIn("USER", capabilities)
        self.assertNotIn("STLS", capabilities)

    def test_capa_takes_no_argument(self):
        session = self.connect()
        session.take()
        self.assertTrue(session.command("CAPA now").startswith("-ERR"))


class CommandParsingTests(POP3TestCase):
    def test_commands_are_case_insensitive(self):
        self.deliver(b"Subject: x\n\nbody\n")
        session = self.connect()
        session.take()
        self.assertTrue(session.command("capa").startswith("+OK"))
        self.assertEqual(session.command("uSeR alice@example.org"), "+OK Send your password\r\n")
        self.assertTrue(session.command("pass pw").startswith("+OK Logged in, 1 message "))
        self.assertTrue(session.command("Stat").startswith("+OK 1 "))
        self.assertEqual(session.command("noop"), "+OK\r\n")

    def test_unknown_and_empty_commands_are_errors_and_the_session_goes_on(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("HELO there"), "-ERR Unknown command\r\n")
        self.assertEqual(session.command(""), "-ERR Unknown command\r\n")
        self.assertEqual(session.command("\x00\xff"), "-ERR Unknown command\r\n")
        self.assertEqual(session.command("LAST"), "-ERR Unknown command\r\n")
        self.assertFalse(session.closed)
        self.assertTrue(session.command("CAPA").startswith("+OK"))

    def test_transaction_commands_before_login(self):
        session = self.connect()
        session.take()
        for command in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 1",
                        "UIDL"):
            reply = session.command(command)
            self.assertTrue(reply.startswith("-ERR Not logged in"), (command, reply))
            self.assertEqual(reply.count("\r\n"), 1)
        self.assertFalse(session.closed)

    def test_logging_in_twice_is_refused(self):
        session = self.open_session()
        for command in ("USER bob@example.org", "PASS bob secret", "APOP a b",
                        "AUTH PLAIN " + plain("", BOB, "bob secret").decode(), "STLS"):
            self.assertTrue(session.command(command).startswith("-ERR Already logged in"))
        self.assertTrue(session.command("STAT").startswith("+OK"))

    def test_bare_lf_line_ends_are_accepted(self):
        session = self.connect()
        session.take()
        self.assertTrue(session.send(b"CAPA\n").startswith(b"+OK"))

    def test_line_of_255_octets_is_a_command(self):
        session = self.connect()
        session.take()
        line = b"USER " + b"a" * 248 + b"\r\n"
        self.assertEqual(len(line), 255)
        self.assertEqual(session.send(line), b"+OK Send your password\r\n")

    def test_line_of_256_octets_is_refused(self):
        session = self.connect()
        session.take()
        line = b"USER " + b"a" * 249 + b"\r\n"
        self.assertEqual(session.send(line), b"-ERR Line too long\r\n")
        self.assertEqual(session.command("PASS pw"), "-ERR USER first\r\n")

    def test_over_long_line_is_discarded_as_it_arrives(self):
        session = self.connect()
        session.take()
        for _ in range(100):
            self.assertEqual(session.send(b"x" * 1000), b"")
            self.assertLessEqual(len(session.protocol._buffer), pop3.MAX_COMMAND_LINE)
        self.assertEqual(session.send(b"yyy\r\nNOOP"), b"-ERR Line too long\r\n")
        self.assertEqual(session.send(b"\r\n"), b"-ERR Not logged in: NOOP is not valid "
                                                b"before login\r\n")

    def test_sustained_garbage_ends_the_session(self):
        session = self.connect()
        session.take()
        reply = session.send(b"garbage\r\n" * (pop3.MAX_CONSECUTIVE_ERRORS + 5))
        self.assertEqual(reply.count(b"-ERR"), pop3.MAX_CONSECUTIVE_ERRORS)
        self.assertTrue(session.closed)

    def test_a_success_resets_the_error_count(self):
        session = self.connect()
        session.take()
        for _ in range(5):
            session.send(b"bad\r\n" * (pop3.MAX_CONSECUTIVE_ERRORS - 1))
            session.command("CAPA")
        self.assertFalse(session.closed)

    def test_every_error_is_one_line(self):
        session = self.open_session()
        self.deliver(b"Subject: late\n\nbody\n")
        bad = ["LIST x", "LIST 1 2", "LIST 0", "LIST 99", "RETR", "RETR -1", "RETR 1.5",
               "DELE", "TOP 1", "TOP 1 x", "TOP 0 1", "TOP 1 -1", "UIDL 0", "STAT 1",
               "NOOP x", "RSET x", "LIST 99999999999999999999"]
        for command in bad:
            session.command("NOOP")  # keep the consecutive-error count low
            reply = session.command(command)
            self.assertTrue(reply.startswith("-ERR"), (command, reply))
            self.assertEqual(reply.count("\r\n"), 1, (command, reply))
        self.assertFalse(session.closed)


class AuthenticationTests(POP3TestCase):
    def test_user_pass(self):
        self.deliver(b"Subject: x\n\nbody\n")
        session = self.connect()
        session.take()
        self.assertEqual(session.command("USER alice@example.org"), "+OK Send your password\r\n")
        self.assertEqual(session.command("PASS pw"), "+OK Logged in, 1 message (20 octets)\r\n")
        self.assertEqual(session.protocol.state, pop3.State.TRANSACTION)

    def test_password_with_spaces(self):
        session = self.connect()
        session.take()
        reply = session.send(b"USER bob@example.org\r\nPASS bob secret\r\n")
        self.assertIn(b"+OK Logged in", reply)

    def test_user_names_are_case_insensitive(self):
        session = self.connect()
        session.take()
        self.assertIn(b"+OK Logged in", session.send(b"USER Alice@Example.ORG\r\nPASS pw\r\n"))

    def test_pass_needs_user_first(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("PASS pw"), "-ERR USER first\r\n")
        self.assertEqual(session.command("USER"), "-ERR Syntax error: USER name\r\n")

    def test_wrong_password_is_answered_after_the_delay(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.send(b"USER alice@example.org\r\nPASS wrong\r\n"),
                         b"+OK Send your password\r\n")
        self.clock.advance(1.9)
        self.assertEqual(session.take(), b"")
        self.clock.advance(0.1)
        self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertFalse(session.closed)

    def test_unknown_user_is_answered_like_a_wrong_password(self):
        session = self.connect()
        session.take()
        session.send(b"USER nobody@example.org\r\nPASS pw\r\n")
        self.clock.advance(2)
        self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_pipelined_commands_wait_for_the_delayed_answer(self):
        session = self.connect()
        session.take()
        reply = session.send(b"USER alice@example.org\r\nPASS wrong\r\nCAPA\r\n")
        self.assertEqual(reply, b"+OK Send your password\r\n")
        self.assertEqual(session.transport.producerState, "paused")
        self.clock.advance(2)
        reply = session.take()
        self.assertTrue(reply.startswith(b"-ERR [AUTH] Authentication failed\r\n+OK Capa"))
        self.assertEqual(session.transport.producerState, "producing")

    def test_session_closes_after_max_failures_and_delays_grow(self):
        session = self.connect()
        session.take()
        delays = []
        for attempt in range(3):
            session.send(b"USER alice@example.org\r\nPASS wrong%d\r\n" % attempt)
            waited = 0.0
            while not session.transport.value().startswith(b"-ERR"):
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
            session.take()
        self.assertEqual(delays, [2.0, 4.0, 8.0])
        self.assertTrue(session.closed)

    def test_penalty_carries_over_to_the_next_connection(self):
        first = self.connect()
        first.send(b"USER alice@example.org\r\nPASS wrong\r\n")
        self.clock.advance(2)
        first.drop()
        second = self.connect()
        second.take()
        second.send(b"USER alice@example.org\r\nPASS other\r\n")
        self.clock.advance(3.9)
        self.assertEqual(second.take(), b"")
        self.clock.advance(0.1)
        self.assertEqual(second.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_same_wrong_password_repeated_does_not_escalate(self):
        for _ in range(3):
            session = self.connect()
            session.take()
            session.send(b"USER alice@example.org\r\nPASS stale\r\n")
            self.clock.advance(2)
            self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n")
            session.drop()

    def test_right_password_after_failures_works_once_the_delay_has_passed(self):
        session = self.connect()
        session.take()
        session.send(b"USER alice@example.org\r\nPASS wrong\r\n")
        self.clock.advance(2)
        session.take()
        self.assertEqual(session.send(b"USER alice@example.org\r\nPASS pw\r\n"),
                         b"+OK Send your password\r\n",
                         "success is held while the address carries a penalty")
        self.clock.advance(2)
        self.assertIn(b"+OK Logged in", session.take())
        self.assertEqual(self.penalty.delay(LOOPBACK, b"alice@example.org"), 0.0)

    def test_hanging_up_early_does_not_escape_the_penalty(self):
        session = self.connect()
        session.send(b"USER alice@example.org\r\nPASS wrong\r\n")
        session.drop()
        self.assertEqual(self.penalty.delay(LOOPBACK, b"alice@example.org"), 2.0)
        self.clock.advance(10)  # the delayed answer was cancelled with the connection

    def test_a_penalised_address_waits_before_its_password_is_checked(self):
        self.penalty.failed(LOOPBACK, b"alice@example.org", b"y")
        checked = []
        check = self.checker.requestAvatarId
        self.patch(self.checker, "requestAvatarId", lambda c: checked.append(c) or check(c))
        hit_and_run = self.connect()
        hit_and_run.send(b"USER alice@example.org\r\nPASS guess\r\n")
        hit_and_run.drop()
        self.clock.advance(20)
        self.assertEqual(checked, [], "no hashing for a guesser that did not wait")
        patient = self.connect()
        patient.send(b"USER alice@example.org\r\nPASS guess\r\n")
        self.clock.advance(1.9)
        self.assertEqual(checked, [])
        self.clock.advance(0.1)
        self.assertEqual(len(checked), 1)

    def test_dropping_while_held_leaves_the_mailbox_free(self):
        self.penalty.failed(LOOPBACK, b"alice@example.org", b"y")
        session = self.connect()
        session.send(b"USER alice@example.org\r\nPASS pw\r\n")
        session.drop()
        self.clock.advance(2)
        self.penalty.succeeded(LOOPBACK, "alice@example.org")
        self.open_session()  # the mailbox lock is free

    def test_auth_plain_with_initial_response(self):
        session = self.connect()
        session.take()
        reply = session.command("AUTH PLAIN " + plain("", ALICE, "pw").decode())
        self.assertTrue(reply.startswith("+OK Logged in"))

    def test_auth_plain_with_authzid_equal_to_authcid(self):
        session = self.connect()
        session.take()
        reply = session.command("AUTH PLAIN " + plain(ALICE, ALICE, "pw").decode())
        self.assertTrue(reply.startswith("+OK Logged in"))

    def test_auth_plain_without_initial_response(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("auth plain"), "+ \r\n")
        self.assertTrue(session.command(plain("", BOB, "bob secret").decode())
                        .startswith("+OK Logged in"))

    def test_auth_plain_long_response_on_a_continuation_line(self):
        UserFile(self.users_path).add("carol@example.org", hash_password("p" * 600, "PLAIN"))
        session = self.connect()
        session.take()
        session.command("AUTH PLAIN")
        reply = session.command(plain("", "carol@example.org", "p" * 600).decode())
        self.assertTrue(reply.startswith("+OK Logged in"))

    def test_auth_cancelled(self):
        session = self.connect()
        session.take()
        session.command("AUTH PLAIN")
        self.assertEqual(session.command("*"), "-ERR Authentication cancelled\r\n")
        self.assertTrue(session.command("CAPA").startswith("+OK"))

    def test_auth_bad_base64_and_malformed_responses(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("AUTH PLAIN !!!notbase64"),
                         "-ERR Invalid base64 in the PLAIN response\r\n")
        session.command("AUTH PLAIN")
        self.assertEqual(session.command("%%%"), "-ERR Invalid base64 in the PLAIN response\r\n")
        self.assertEqual(session.command("AUTH PLAIN ="), "-ERR Malformed PLAIN response\r\n")
        no_nul = base64.b64encode(b"alice pw").decode()
        self.assertEqual(session.command("AUTH PLAIN " + no_nul),
                         "-ERR Malformed PLAIN response\r\n")
        self.assertFalse(session.closed)

    def test_auth_as_another_user_is_refused(self):
        session = self.connect()
        session.take()
        reply = session.command("AUTH PLAIN " + plain(BOB, ALICE, "pw").decode())
        self.assertTrue(reply.startswith("-ERR [AUTH]"))

    def test_auth_plain_wrong_password_is_delayed(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("AUTH PLAIN " + plain("", ALICE, "no").decode()), "")
        self.clock.advance(2)
        self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_auth_lists_mechanisms_and_refuses_unknown_ones(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("AUTH"), "+OK Supported mechanisms\r\nPLAIN\r\n.\r\n")
        self.assertEqual(session.command("AUTH CRAM-MD5"),
                         "-ERR Unsupported authentication mechanism\r\n")
        self.assertTrue(session.command("AUTH PLAIN a b").startswith("-ERR Syntax"))

    def test_apop(self):
        factory = self.make_factory(**{"pop3.apop": True})
        session = self.connect(factory=factory)
        timestamp = session.take().split(b" ")[-1].strip()
        digest = hashlib.md5(timestamp + b"pw").hexdigest()
        self.assertTrue(session.command(f"APOP {ALICE} {digest}").startswith("+OK Logged in"))

    def test_apop_wrong_digest_is_delayed(self):
        factory = self.make_factory(**{"pop3.apop": True})
        session = self.connect(factory=factory)
        session.take()
        digest = hashlib.md5(b"<other@host>pw").hexdigest()
        self.assertEqual(session.command(f"APOP {ALICE} {digest}"), "")
        self.clock.advance(2)
        self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n")

    def test_apop_malformed_and_disabled(self):
        session = self.connect(factory=self.make_factory(**{"pop3.apop": True}))
        session.take()
        self.assertTrue(session.command(f"APOP {ALICE}").startswith("-ERR Syntax"))
        self.assertTrue(session.command(f"APOP {ALICE} xyz").startswith("-ERR Syntax"))
        self.assertTrue(session.command(f"APOP {ALICE} {'g' * 32}").startswith("-ERR Syntax"))
        disabled = self.connect()
        disabled.take()
        self.assertEqual(disabled.command(f"APOP {ALICE} {'0' * 32}"),
                         "-ERR APOP is not enabled\r\n")

    def test_plaintext_is_refused_off_loopback(self):
        refusal = ("-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                   "connection\r\n")
        session = self.connect(peer=REMOTE)
        session.take()
        self.assertEqual(session.command("USER alice@example.org"), refusal)
        self.assertEqual(session.command("PASS pw"), refusal)
        self.assertEqual(session.command("AUTH PLAIN " + plain("", ALICE, "pw").decode()),
                         refusal)
        self.assertEqual(session.command("AUTH PLAIN"), refusal)
        self.assertEqual(session.command("AUTH"), "+OK Supported mechanisms\r\n.\r\n")
        self.assertEqual(session.protocol.state, pop3.State.AUTHORIZATION)

    def test_apop_is_allowed_off_loopback(self):
        session = self.connect(peer=REMOTE, factory=self.make_factory(**{"pop3.apop": True}))
        timestamp = session.take().split(b" ")[-1].strip()
        digest = hashlib.md5(timestamp + b"pw").hexdigest()
        self.assertTrue(session.command(f"APOP {ALICE} {digest}").startswith("+OK Logged in"))

    def test_plaintext_allowed_off_loopback_when_configured(self):
        factory = self.make_factory(**{"tls.allow_plaintext_auth": True})
        self.open_session(peer=REMOTE, factory=factory)

    def test_plaintext_allowed_on_implicit_tls(self):
        factory = self.make_factory(tls=TLS_CREATOR, implicit_tls=True)
        self.open_session(peer=REMOTE, factory=factory)

    def test_ipv6_loopback_and_unix_sockets_count_as_local(self):
        for address in (IPv6Address("TCP", "::1", 4000), UNIXAddress(None)):
            protocol = self.factory.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            protocol.dataReceived(b"USER alice@example.org\r\n")
            self.assertIn(b"+OK Send your password", transport.value())
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limiter.total, 0)


class PasswordCheckQueueTests(POP3TestCase):
    """One address gets a bounded number of password checks at once; others are not held up."""

    def setUp(self):
        super().setUp()
        self.hashing = []  # password checks handed to the "thread pool", not yet run

        def run_later(f, *args):
            d = defer.Deferred()
            self.hashing.append(lambda: d.callback(f(*args)))
            return d

        self.checker = PasswordChecker(self.users, run_later)
        self.factory = self.make_factory()

    def attempt(self, peer: str, password: str = "wrong") -> Session:
        session = self.connect(peer=peer)
        session.take()
        session.send(f"USER alice@example.org\r\nPASS {password}\r\n".encode())
        return session

    def test_checks_in_progress_per_address_are_bounded(self):
        attackers = [self.attempt(LOOPBACK) for _ in range(5)]
        self.assertEqual(len(self.hashing), CHECKS_PER_ADDRESS)
        honest = self.attempt("127.0.0.2", "pw")
        self.assertEqual(len(self.hashing), CHECKS_PER_ADDRESS + 1,
                         "another address is not queued behind them")
        self.hashing.pop(0)()  # an attacker's check ends: the next one of theirs starts,
        self.assertEqual(len(self.hashing), CHECKS_PER_ADDRESS + 1)
        self.hashing.pop(1)()  # ... queued behind the honest one
        self.assertIn(b"+OK Logged in", honest.take())
        while self.hashing:
            self.hashing.pop(0)()
        self.clock.advance(100)
        for session in attackers:
            self.assertIn(b"-ERR [AUTH]", session.take())
        self.assertEqual(len(self.password_checks), 0, "no state left behind")

    def test_a_session_gone_while_queued_is_not_checked(self):
        for _ in range(CHECKS_PER_ADDRESS):
            self.attempt(LOOPBACK)
        self.attempt(LOOPBACK).drop()
        for _ in range(CHECKS_PER_ADDRESS):
            self.hashing.pop(0)()
        self.assertEqual(self.hashing, [])
        self.assertEqual(len(self.password_checks), 0)


class MailboxLockTests(POP3TestCase):
    def test_second_session_gets_in_use(self):
        first = self.open_session()
        second = self.connect()
        second.take()
        reply = second.send(b"USER alice@example.org\r\nPASS pw\r\n")
        self.assertEqual(reply, b"+OK Send your password\r\n"
                                b"-ERR [IN-USE] Mailbox is in use by another session\r\n")
        self.assertEqual(second.protocol.state, pop3.State.AUTHORIZATION)
        first.command("QUIT")
        self.assertIn(b"+OK Logged in", second.send(b"USER alice@example.org\r\nPASS pw\r\n"))

    def test_other_users_are_not_blocked(self):
        self.open_session()
        self.open_session(user=BOB, password="bob secret")

    def test_lock_held_by_another_process(self):
        lock_path = os.path.join(self.maildir().path, "popgate.lock")
        code = ("import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n")
        holder = subprocess.Popen([sys.executable, "-c", code, lock_path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def release():
            holder.stdin.close()  # the child exits at end of input
            holder.wait(10)
            holder.stdout.close()

        self.addCleanup(release)
        self.assertEqual(holder.stdout.readline(), b"locked\n")
        session = self.connect()
        session.take()
        reply = session.send(b"USER alice@example.org\r\nPASS pw\r\n")
        self.assertIn(b"-ERR [IN-USE]", reply)
        release()
        self.addCleanup(lambda: None)
        self.open_session()

    def test_in_use_is_held_like_a_success_under_penalty(self):
        self.open_session()
        self.penalty.failed(LOOPBACK, b"alice@example.org", b"y")
        second = self.connect()
        second.take()
        self.assertEqual(second.send(b"USER alice@example.org\r\nPASS pw\r\n"),
                         b"+OK Send your password\r\n")
        self.clock.advance(2)
        self.assertIn(b"[IN-USE]", second.take())

    def test_drop_releases_the_lock(self):
        first = self.open_session()
        first.drop()
        self.open_session()


class TransactionTests(POP3TestCase):
    MESSAGES = [
        b"Subject: one\n\nfirst body\n",
        b"Subject: two\n\n.starts with a dot\n..two dots\n.\nend\n",
        b"From: x\nSubject: three\n\nline 1\nline 2\nline 3\n",
    ]

    def setUp(self):
        super().setUp()
        for body in self.MESSAGES:
            self.deliver(body)
        self.bodies = [read(path) for path in self.message_files()]
        self.session = self.open_session()

    def test_stat(self):
        octets = sum(len(b) + b.count(b"\n") for b in self.bodies)
        self.assertEqual(self.session.command("STAT"), f"+OK 3 {octets}\r\n")

    def test_list_and_list_n(self):
        sizes = [len(b) + b.count(b"\n") for b in self.bodies]
        self.assertEqual(self.session.command("LIST"),
                         f"+OK 3 messages ({sum(sizes)} octets)\r\n"
                         f"1 {sizes[0]}\r\n2 {sizes[1]}\r\n3 {sizes[2]}\r\n.\r\n")
        self.assertEqual(self.session.command("LIST 2"), f"+OK 2 {sizes[1]}\r\n")
        self.assertEqual(self.session.command("LIST 0"), "-ERR No such message\r\n")
        self.assertEqual(self.session.command("LIST 4"), "-ERR No such message\r\n")

    def test_list_is_one_write(self):
        self.session.transport.writes.clear()
        self.session.command("LIST")
        self.session.command("UIDL")
        self.assertEqual(len(self.session.transport.writes), 2)

    def test_uidl(self):
        uidls = [info.uidl for info in self.maildir().scan()]
        self.assertEqual(self.session.command("UIDL"),
                         "+OK Unique-ID listing follows\r\n"
                         + "".join(f"{n} {u}\r\n" for n, u in enumerate(uidls, 1)) + ".\r\n")
        self.assertEqual(self.session.command("UIDL 3"), f"+OK 3 {uidls[2]}\r\n")
        for uidl in uidls:
            self.assertTrue(0 < len(uidl) <= 70)
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in uidl))

    def test_retr_sends_exact_dot_stuffed_crlf(self):
        for number, body in enumerate(self.bodies, 1):
            reply = self.session.send(b"RETR %d\r\n" % number)
            status, _, rest = reply.partition(b"\r\n")
            octets = len(body) + body.count(b"\n")
            self.assertEqual(status, b"+OK %d octets" % octets)
            self.assertEqual(rest, wire(body))
            self.assertEqual(len(unstuff(rest)), octets, "LIST octets == bytes un-stuffed")

    def test_retr_status_and_first_block_are_one_write(self):
        self.session.transport.writes.clear()
        self.session.command("RETR 1")
        self.assertEqual(len(self.session.transport.writes), 1)

    def test_dele_marks_and_hides(self):
        self.assertEqual(self.session.command("DELE 2"), "+OK Message 2 deleted\r\n")
        self.assertEqual(self.session.command("DELE 2"), "-ERR Message 2 is deleted\r\n")
        for command in ("RETR 2", "LIST 2", "TOP 2 0", "UIDL 2"):
            self.assertEqual(self.session.command(command), "-ERR Message 2 is deleted\r\n")
        sizes = [len(b) + b.count(b"\n") for b in self.bodies]
        self.assertEqual(self.session.command("STAT"), f"+OK 2 {sizes[0] + sizes[2]}\r\n")
        listing = self.session.command("LIST").split("\r\n")
        self.assertEqual([line.split()[0] for line in listing[1:-2]], ["1", "3"])
        self.assertEqual(len(self.message_files()), 3, "DELE only marks")

    def test_rset_unmarks(self):
        self.session.command("DELE 1")
        self.session.command("DELE 3")
        total = sum(len(b) + b.count(b"\n") for b in self.bodies)
        self.assertEqual(self.session.command("RSET"),
                         f"+OK Maildrop has 3 messages ({total} octets)\r\n")
        self.assertTrue(self.session.command("RETR 1").startswith("+OK"))

    def test_noop(self):
        self.assertEqual(self.session.command("NOOP"), "+OK\r\n")

    def test_dele_then_quit_removes(self):
        self.session.command("DELE 1")
        self.session.command("DELE 3")
        self.assertEqual(self.session.command("QUIT"),
                         "+OK popgate signing off (2 messages deleted)\r\n")
        self.assertTrue(self.session.closed)
        self.assertEqual([read(p) for p in self.message_files()],
                         [self.bodies[1]])

    def test_dele_then_drop_keeps_everything(self):
        self.session.command("DELE 1")
        self.session.drop()
        self.assertEqual(len(self.message_files()), 3)
        self.open_session()

    def test_retr_then_quit_moves_to_cur_and_keeps_uidl(self):
        uidls = self.session.command("UIDL")
        self.session.command("RETR 2")
        self.session.command("TOP 3 0")
        self.session.command("QUIT")
        cur = os.listdir(os.path.join(self.maildir().path, "cur"))
        self.assertEqual(len(cur), 1, "only RETR marks a message seen, not TOP")
        self.assertTrue(cur[0].endswith(":2,S"))
        self.assertEqual(self.open_session().command("UIDL"), uidls)

    def test_uidl_is_stable_across_sessions(self):
        first = self.session.command("UIDL")
        self.session.command("QUIT")
        self.deliver(b"Subject: four\n\nnew\n")
        second = self.open_session().command("UIDL")
        self.assertTrue(second.startswith(first[:-3]))

    def test_uidl_is_stable_across_a_restart(self):
        before = self.session.command("UIDL")
        self.session.command("RETR 1")
        self.session.command("QUIT")
        self.store = MaildirStore(os.path.join(self.root, "mail"), "other.host")
        self.users = UserDB(self.users_path)
        self.factory = self.make_factory()
        self.assertEqual(self.open_session().command("UIDL"), before)

    def test_quit_reports_failed_deletions(self):
        def broken_remove(messages):
            raise OSError("read-only file system")

        self.patch(Maildir, "remove", lambda self, messages: broken_remove(messages))
        self.session.command("DELE 1")
        self.assertEqual(self.session.command("QUIT"),
                         "-ERR [SYS/TEMP] Some messages could not be deleted\r\n")
        self.assertTrue(self.session.closed)
        # An expected fault: one line naming it, no traceback.
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        self.open_session()  # the lock was released

    def login_with_broken_scan(self, error: OSError) -> bytes:
        def broken_scan(maildir):
            raise error

        patch = self.patch(Maildir, "scan", broken_scan)
        session = self.connect()
        session.take()
        reply = session.send(b"USER alice@example.org\r\nPASS pw\r\n")
        self.assertEqual(self.flushLoggedErrors(type(error)), [])  # one line, no traceback
        self.assertEqual(session.protocol.state, pop3.State.AUTHORIZATION)
        patch.restore()
        return reply

    def test_unreadable_maildir_is_a_system_error(self):
        self.session.command("QUIT")
        self.assertEqual(self.login_with_broken_scan(OSError("I/O error")),
                         b"+OK Send your password\r\n"
                         b"-ERR [SYS/TEMP] Mailbox temporarily unavailable\r\n")
        self.assertEqual(self.login_with_broken_scan(PermissionError("no access")),
                         b"+OK Send your password\r\n"
                         b"-ERR [SYS/PERM] Mailbox unavailable, please tell the "
                         b"administrator\r\n")
        self.open_session()  # the lock was released

    def session_holding_the_update(self):
        """A fresh session whose UPDATE step (QUIT's deletions) waits until released."""
        run_in_thread, pending = holding_the_update()
        self.session.command("QUIT")
        self.factory = self.make_factory(run_in_thread=run_in_thread)
        return self.open_session(), pending

    def test_drop_during_update_finishes_the_deletions_then_unlocks(self):
        session, pending = self.session_holding_the_update()
        session.command("DELE 1")
        self.assertEqual(session.command("QUIT"), "")
        session.drop()
        second = self.connect()
        second.take()
        self.assertIn(b"[IN-USE]", second.send(b"USER alice@example.org\r\nPASS pw\r\n"))
        pending.pop()()
        self.assertEqual(len(self.message_files()), 2)
        self.assertIn(b"+OK Logged in", second.send(b"USER alice@example.org\r\nPASS pw\r\n"))

    def test_closing_reads_again_so_that_tls_can_finish(self):
        session, pending = self.session_holding_the_update()
        session.command("RETR 1")
        session.send(b"QUIT\r\nNOOP\r\n")  # input waits behind the UPDATE: reading stops
        self.assertEqual(session.transport.producerState, "paused")
        pending.pop()()
        self.assertTrue(session.closed)
        self.assertEqual(session.transport.producerState, "producing")

    def test_a_connection_that_will_not_close_is_cut(self):
        self.session.command("QUIT")
        self.assertTrue(self.session.closed)
        self.clock.advance(lineproto.CLOSE_GRACE - 1)
        self.assertFalse(self.session.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.session.transport.disconnected, "aborted")

    def test_retr_of_a_vanished_file(self):
        os.unlink(self.message_files()[0])
        self.assertEqual(self.session.command("RETR 1"),
                         "-ERR [SYS/TEMP] Message temporarily unavailable\r\n")
        self.assertTrue(self.session.command("RETR 2").startswith("+OK"))

    def test_unexpected_exception_is_a_temporary_error(self):
        def explode(number):
            raise RuntimeError("bug")

        self.patch(self.session.protocol._maildrop, "delete", explode)
        self.assertEqual(self.session.command("DELE 1"), "-ERR [SYS/TEMP] internal error\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.session.command("NOOP").startswith("+OK"))

    def test_quit_in_authorization_deletes_nothing(self):
        session = self.connect()
        session.take()
        self.assertEqual(session.command("QUIT"), "+OK popgate signing off\r\n")
        self.assertTrue(session.closed)


class TopTests(POP3TestCase):
    BODY = b"From: a\nSubject: top\n\n.line 1\nline 2\nline 3\n"

    def top(self, command: str) -> bytes:
        session = self.open_session()
        reply = session.send(command.encode() + b"\r\n")
        session.command("QUIT")
        status, _, rest = reply.partition(b"\r\n")
        self.assertEqual(status, b"+OK Top of message follows")
        return rest

    def test_top_zero_lines(self):
        self.deliver(self.BODY)
        self.assertEqual(self.top("TOP 1 0"), b"From: a\r\nSubject: top\r\n\r\n.\r\n")

    def test_top_some_lines_is_dot_stuffed(self):
        self.deliver(self.BODY)
        self.assertEqual(self.top("TOP 1 2"),
                         b"From: a\r\nSubject: top\r\n\r\n..line 1\r\nline 2\r\n.\r\n")

    def test_top_more_lines_than_the_body(self):
        self.deliver(self.BODY)
        self.assertEqual(self.top("TOP 1 100"), wire(self.BODY))

    def test_top_of_a_crlf_file_from_another_tool(self):
        self.deliver_foreign("1000.foreign.host", b"Subject: crlf\r\n\r\nbody 1\r\nbody 2\r\n")
        self.assertEqual(self.top("TOP 1 1"), b"Subject: crlf\r\n\r\nbody 1\r\n.\r\n")

    def test_top_of_a_message_without_body(self):
        self.deliver(b"Subject: only headers\n")
        self.assertEqual(self.top("TOP 1 5"), b"Subject: only headers\r\n.\r\n")

    def test_top_across_tiny_blocks(self):
        self.deliver(self.BODY)
        for block_size in range(1, 9):
            with self.subTest(block_size=block_size):
                self.patch(pop3.POP3Server, "block_size", block_size)
                self.assertEqual(self.top("TOP 1 1"),
                                 b"From: a\r\nSubject: top\r\n\r\n..line 1\r\n.\r\n")


class StreamingTests(POP3TestCase):
    def test_any_binary_stream_from_the_realm_will_do(self):
        """docs/design.md: the protocol reaches mail only through IMaildrop.open(n), "a
        binary stream"; another store's stream need not be an OS file."""
        body = b"Subject: a\n\n" + b".dot\n" * 30
        self.deliver(body)
        self.patch(Maildrop, "open", lambda maildrop, number: io.BytesIO(
            read(maildrop.message(number).path)))
        for block_size in (7, 64 * 1024):
            self.patch(pop3.POP3Server, "block_size", block_size)
            session = self.open_session()
            reply = session.send(b"RETR 1\r\nTOP 1 1\r\n")
            self.assertEqual(reply, b"+OK %d octets\r\n" % (len(body) + 32) + wire(body)
                             + b"+OK Top of message follows\r\n" + wire(body[:17]))
            session.command("QUIT")

    def test_dot_stuffing_at_every_block_boundary(self):
        body = b"".join(b"." * (n % 4) + b"x" * (n % 3) + b"\n" for n in range(60)) + b".\n"
        self.deliver(body)
        expected = wire(body)
        for block_size in (1, 2, 3, 5, 7, 11, 64):
            self.patch(pop3.POP3Server, "block_size", block_size)
            session = self.open_session()
            reply = session.send(b"RETR 1\r\n")
            self.assertEqual(reply.partition(b"\r\n")[2], expected, block_size)
            session.command("QUIT")

    def test_first_line_starting_with_a_dot(self):
        self.deliver_foreign("1.dot.host", b".hidden\n")
        reply = self.open_session().send(b"RETR 1\r\n")
        self.assertEqual(reply, b"+OK 9 octets\r\n..hidden\r\n.\r\n")

    def test_foreign_file_without_size_fields(self):
        body = b"Subject: foreign\r\n\r\nmixed\nline ends\r\n"
        self.deliver_foreign("1234.foreign.host", body)
        session = self.open_session()
        self.assertEqual(session.command("LIST 1"), "+OK 1 38\r\n")
        reply = session.send(b"RETR 1\r\n")
        self.assertEqual(reply, b"+OK 38 octets\r\nSubject: foreign\r\n\r\nmixed\r\n"
                                b"line ends\r\n.\r\n")
        self.assertEqual(session.command("UIDL 1"), "+OK 1 1234.foreign.host\r\n")

    def test_message_without_final_newline(self):
        self.deliver_foreign("1.nonl.host", b"Subject: x\n\nno newline")
        reply = self.open_session().send(b"RETR 1\r\n")
        self.assertTrue(reply.endswith(b"\r\nno newline\r\n.\r\n"))

    def test_large_message_streams_in_blocks_under_flow_control(self):
        line = b"0123456789" * 10 + b"\n"
        body = line * 20_000  # 2 MB
        self.deliver(body)
        self.patch(pop3.POP3Server, "block_size", 16 * 1024)
        session = self.open_session(socket_buffer=1024)
        session.transport.writes.clear()
        session.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(len(session.transport.writes), 1, "paused after the first block")
        self.assertEqual(session.transport.producerState, "paused",
                         "reading stops while a message streams")
        rest = session.drain()
        writes = session.transport.writes
        self.assertGreater(len(writes), 100)
        self.assertLessEqual(max(len(w) for w in writes), 2 * 16 * 1024 + 64)
        self.assertTrue(rest.endswith(b"\r\n.\r\n+OK\r\n"), "NOOP answered after the body")
        self.assertEqual(session.transport.producerState, "producing")

    def test_pipelined_commands_after_a_streaming_retr_run_in_order(self):
        self.deliver(b"Subject: a\n\n" + b"x" * 5000 + b"\n")
        self.deliver(b"Subject: b\n\nshort\n")
        self.patch(pop3.POP3Server, "block_size", 1000)
        session = self.open_session(socket_buffer=1024)
        out = session.send(b"RETR 1\r\nDELE 1\r\nRETR 2\r\nSTAT\r\nQUIT\r\n")
        while not session.closed:
            session.protocol.resumeProducing()
        out += session.take()
        status_lines = [line for line in out.split(b"\r\n")
                        if line.startswith((b"+OK", b"-ERR"))]
        self.assertEqual([line.split()[0:2] for line in status_lines], [
            [b"+OK", b"5016"], [b"+OK", b"Message"], [b"+OK", b"21"], [b"+OK", b"1"],
            [b"+OK", b"popgate"]])
        self.assertEqual(len(self.message_files()), 1)

    def test_read_error_mid_stream_closes_the_connection(self):
        self.deliver(b"Subject: a\n\n" + b"x" * 5000 + b"\n")
        self.patch(pop3.POP3Server, "block_size", 1000)
        session = self.open_session(socket_buffer=1024)
        session.send(b"RETR 1\r\n")
        stream = session.protocol._stream

        class FailingFile:
            def read(self, size):
                raise OSError("I/O error")

            def close(self):
                pass

        stream._file.close()
        stream._file = FailingFile()
        session.protocol.resumeProducing()
        self.assertTrue(session.closed)
        session.drop()
        self.open_session()

    def test_drop_mid_stream_closes_the_file(self):
        self.deliver(b"Subject: a\n\n" + b"x" * 5000 + b"\n")
        self.patch(pop3.POP3Server, "block_size", 1000)
        session = self.open_session(socket_buffer=1024)
        session.send(b"RETR 1\r\nDELE 1\r\n")
        stream = session.protocol._stream
        session.drop()
        self.assertTrue(stream._file.closed)
        self.assertEqual(len(self.message_files()), 1)


class PipeliningTests(POP3TestCase):
    def test_whole_session_in_one_packet(self):
        self.deliver(b"Subject: a\n\nbody\n")
        session = self.connect()
        session.take()
        reply = session.send(b"CAPA\r\nUSER alice@example.org\r\nPASS pw\r\nSTAT\r\n"
                             b"LIST\r\nUIDL\r\nRETR 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n")
        self.assertEqual(reply.count(b"+OK"), 10)
        self.assertTrue(reply.endswith(b"+OK popgate signing off (1 message deleted)\r\n"))
        self.assertEqual(self.message_files(), [])

    def test_commands_split_across_packets(self):
        session = self.connect()
        session.take()
        out = b"".join(session.send(bytes([c])) for c in b"USER alice@example.org\r\nPASS pw\r\n")
        self.assertIn(b"+OK Logged in", out)

    def test_nothing_after_quit_is_answered(self):
        session = self.open_session()
        self.assertEqual(session.send(b"QUIT\r\nSTAT\r\n"),
                         b"+OK popgate signing off (0 messages deleted)\r\n")

    def test_a_full_output_buffer_stops_commands_but_not_reading(self):
        # A TLS layer that is still handshaking pauses its producer at the first write
        # (the greeting); it needs to read to finish the handshake.
        session = self.connect(socket_buffer=0)
        self.assertTrue(session.protocol.output_full)
        self.assertEqual(session.transport.producerState, "producing")
        session.take()
        self.assertEqual(session.send(b"CAPA\r\n"), b"", "commands wait for the output")
        self.assertTrue(session.drain().startswith(b"+OK Capability list follows"))

    def test_client_that_never_reads_meets_back_pressure_then_the_bound(self):
        session = self.connect(socket_buffer=0)
        backlog = pop3.POP3Server.max_backlog
        sent = 0
        while session.transport.producerState == "producing":
            session.send(b"CAPA\r\n")
            sent += 6
        # Reading stops once the backlog bound waits (nothing was answered: the greeting
        # filled the socket already).
        self.assertEqual(sent, backlog - backlog % 6 + 6)
        self.assertFalse(session.closed)
        # A transport delivers nothing more while paused; should one read overshoot four
        # times the bound all the same, the session ends.
        session.send(b"CAPA\r\n" * (3 * backlog // 6 + 10))
        self.assertTrue(session.closed)

    def test_too_much_input_while_busy_closes(self):
        session = self.connect()
        session.take()
        session.send(b"USER alice@example.org\r\nPASS wrong\r\n")
        session.send(b"NOOP\r\n" * (4 * pop3.POP3Server.max_backlog // 6 + 1))
        self.assertTrue(session.closed)


class STLSTests(POP3TestCase):
    def setUp(self):
        super().setUp()
        self.factory = self.make_factory(tls=TLS_CREATOR)

    def test_stls_discards_pipelined_input(self):
        session = self.connect(peer=REMOTE)
        session.take()
        reply = session.send(b"STLS\r\nCAPA\r\nUSER alice@example.org\r\n")
        self.assertEqual(reply, b"+OK Begin TLS negotiation\r\n")
        self.assertIs(session.transport.tls_creator, TLS_CREATOR)
        # What arrives now came through TLS: CAPA tells the truth for a secure session.
        capabilities = session.command("CAPA")
        self.assertIn("USER", capabilities)
        self.assertNotIn("STLS", capabilities)
        self.assertIn(b"+OK Logged in", session.send(b"USER alice@example.org\r\nPASS pw\r\n"))

    def test_stls_forgets_the_user_name(self):
        session = self.connect()
        session.take()
        session.send(b"USER alice@example.org\r\nSTLS\r\n")
        self.assertEqual(session.command("PASS pw"), "-ERR USER first\r\n")

    def test_stls_only_once(self):
        session = self.connect()
        session.take()
        session.command("STLS")
        self.assertEqual(session.command("STLS"), "-ERR Already using TLS\r\n")

    def test_stls_after_login_is_refused(self):
        session = self.open_session()
        self.assertTrue(session.command("STLS").startswith("-ERR Already logged in"))
        self.assertIsNone(session.transport.tls_creator)

    def test_stls_without_certificate(self):
        session = self.connect(factory=self.make_factory())
        session.take()
        self.assertEqual(session.command("STLS"), "-ERR STLS is not available\r\n")

    def test_stls_with_argument(self):
        session = self.connect()
        session.take()
        self.assertTrue(session.command("STLS now").startswith("-ERR"))
        self.assertIsNone(session.transport.tls_creator)

    def test_stls_on_implicit_tls(self):
        session = self.connect(factory=self.make_factory(tls=TLS_CREATOR, implicit_tls=True))
        session.take()
        self.assertEqual(session.command("STLS"), "-ERR Already using TLS\r\n")

    def test_stls_run_after_a_delayed_answer_still_discards(self):
        session = self.connect()
        session.take()
        session.send(b"USER alice@example.org\r\nPASS wrong\r\nSTLS\r\nCAPA\r\n")
        self.clock.advance(2)
        self.assertEqual(session.take(), b"-ERR [AUTH] Authentication failed\r\n"
                                         b"+OK Begin TLS negotiation\r\n")
        self.assertIs(session.transport.tls_creator, TLS_CREATOR)
        self.assertEqual(session.transport.producerState, "producing",
                         "reading goes on, or the handshake could never finish")

    def test_stls_discards_a_partial_line_too(self):
        session = self.connect()
        session.take()
        session.send(b"STLS\r\nUSER alice@exa")
        self.assertEqual(session.send(b"mple.org\r\n"), b"-ERR Unknown command\r\n")


class TimeoutTests(POP3TestCase):
    def test_authorization_idle_timeout(self):
        session = self.connect()
        session.take()
        self.clock.advance(59)
        self.assertFalse(session.closed)
        self.clock.advance(1)
        self.assertTrue(session.closed)
        self.assertEqual(session.take(), b"", "RFC 1939 §3: no response on autologout")

    def test_an_update_under_way_is_answered_when_the_session_time_is_up(self):
        """QUIT was answered by the deletions, not yet by the +OK: a timeout then must not
        hide from the client that its messages are gone."""
        self.deliver(b"Subject: a\n\nbody\n")
        run_in_thread, pending = holding_the_update()
        self.factory = self.make_factory(run_in_thread=run_in_thread,
                                         **{"pop3.max_session_time": 100})
        session = self.open_session()
        session.send(b"DELE 1\r\nQUIT\r\n")
        self.clock.advance(100)
        pending.pop()()
        self.assertEqual(session.take(), b"+OK popgate signing off (1 message deleted)\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(self.message_files(), [])

    def test_commands_reset_the_idle_timer(self):
        session = self.connect()
        for _ in range(10):
            self.clock.advance(50)
            session.command("CAPA")
        self.assertFalse(session.closed)

    def test_trickled_bytes_do_not_reset_the_idle_timer(self):
        session = self.connect()
        for _ in range(59):
            session.send(b"x")
            self.clock.advance(1)
        self.clock.advance(1)
        self.assertTrue(session.closed)

    def test_transaction_idle_timeout_deletes_nothing_and_unlocks(self):
        self.deliver(b"Subject: a\n\nbody\n")
        session = self.open_session()
        session.command("DELE 1")
        self.clock.advance(599)
        self.assertFalse(session.closed)
        self.clock.advance(1)
        self.assertTrue(session.closed)
        session.drop()
        self.assertEqual(len(self.message_files()), 1)
        self.open_session()

    def test_idle_timeout_is_configurable(self):
        factory = self.make_factory(**{"pop3.idle_timeout": 900, "pop3.auth_timeout": 5})
        session = self.connect(factory=factory)
        self.clock.advance(4)
        session.send(b"USER alice@example.org\r\nPASS pw\r\n")
        self.clock.advance(899)
        self.assertFalse(session.closed)
        self.clock.advance(1)
        self.assertTrue(session.closed)

    def test_total_session_time(self):
        session = self.open_session()
        for _ in range(14):
            self.clock.advance(500)
            session.command("NOOP")
        self.assertFalse(session.closed)
        self.clock.advance(200)
        self.assertTrue(session.closed)

    def test_slow_reader_is_timed_out_mid_stream(self):
        self.deliver(b"Subject: a\n\n" + b"x" * 5000 + b"\n")
        self.patch(pop3.POP3Server, "block_size", 1000)
        session = self.open_session(socket_buffer=1024)
        session.send(b"RETR 1\r\n")
        self.clock.advance(600)
        self.assertTrue(session.closed)
        session.drop()
        self.open_session()

    def test_timers_are_cancelled_on_close(self):
        session = self.connect()
        session.drop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FactoryTests(POP3TestCase):
    def test_connection_cap_refuses_with_sys_temp(self):
        factory = self.make_factory(**{"limits.max_sessions_per_ip": 2})
        first, second = self.connect(factory=factory), self.connect(factory=factory)
        protocol = factory.buildProtocol(IPv4Address("TCP", LOOPBACK, 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(),
                         b"-ERR [SYS/TEMP] too many sessions from your address\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limiter.total, 2)
        first.drop()
        second.drop()
        self.assertEqual(self.limiter.total, 0)

    def test_every_session_releases_its_slot_once(self):
        sessions = [self.connect() for _ in range(5)]
        self.assertEqual(self.limiter.total, 5)
        for session in sessions:
            session.drop()
        self.assertEqual(self.limiter.total, 0)


class SessionLogTests(POP3TestCase):
    def test_one_line_at_connect_and_one_at_close(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.deliver(b"Subject: a\n\nbody\n")
        self.deliver(b"Subject: b\n\nbody\n")
        octets = [info.octets for info in self.maildir().scan()]
        session = self.open_session()
        session.send(b"RETR 1\r\nRETR 1\r\nDELE 2\r\nQUIT\r\n")
        session.drop()
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "popgate.session"]
        session_id = self.recorder.events[0].session.id
        head = f"POP3 [{session_id}] 127.0.0.1:40000"
        self.assertEqual(lines, [
            f"{head} connected",
            f"{head} login ok: user=alice@example.org mechanism=USER",
            f"{head} closed (quit): user=alice@example.org retr=1/{octets[0]} "
            f"del=1/{octets[1]} plaintext 0.0 s"])


class FuzzTests(POP3TestCase):
    WORDS = [b"USER", b"PASS", b"APOP", b"AUTH", b"PLAIN", b"CAPA", b"STAT", b"LIST",
             b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"STLS", b"0", b"1",
             b"2", b"-1", b"99999999999", b"*", b"=", b"alice@example.org", b"pw",
             b"\x00", b"\xff\xfe", b"..", b"\r", b"\n", b"\r\n", b" ", b"\t"]

    def setUp(self):
        super().setUp()
        # Unknown users are checked against a slow dummy hash; keep the fuzz fast.
        self.checker._dummy = hash_password("not a password", "PLAIN")
        for n in range(3):
            self.deliver(b"Subject: %d\n\n.dot\n" % n)
        self.factory = self.make_factory(tls=TLS_CREATOR, **{"pop3.apop": True})

    def garbage(self, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return rng.randbytes(rng.randint(1, 600))
        words = [rng.choice(self.WORDS) for _ in range(rng.randint(1, 6))]
        return b" ".join(words) + rng.choice([b"\r\n", b"\n", b""])

    def test_random_input_never_raises(self):
        rng = random.Random(1939)
        for round_number in range(150):
            logged_in = round_number % 2 == 0
            session = self.open_session() if logged_in else self.connect()
            for _ in range(40):
                if session.closed:
                    break
                session.send(self.garbage(rng))
                self.clock.advance(rng.choice([0, 0, 1, 5]))
                session.drain()
            output = session.take()
            self.assertNotIn(b"Traceback", output)
            self.assertNotIn(b"internal error", output)
            session.drop()
            self.clock.advance(20)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.limiter.total, 0)


class SessionEventTests(POP3TestCase):
    """What a POP3 session publishes, and that no secret is ever in it."""

    SECRET = "s3cret-Zq"

    def setUp(self):
        super().setUp()
        UserFile(self.users_path).add("carol@example.org", hash_password(self.SECRET, "PLAIN"))
        self.log_events = []
        globalLogPublisher.addObserver(self.log_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events.append)

    def assertNoSecret(self, *secrets_seen: bytes) -> None:
        published = repr([(e.kind, e.session, dict(e.data)) for e in self.recorder.events])
        logged = "\n".join(formatEvent(e) + repr(e) for e in self.log_events)
        for secret in (self.SECRET.encode(), *secrets_seen):
            for text in (published, logged):
                self.assertNotIn(secret.decode(), text)
                self.assertNotIn(base64.b64encode(secret).decode(), text)

    def commands(self) -> list[str]:
        return [e.data["line"] for e in self.recorder.of("command")]

    def test_user_pass_right_and_wrong(self):
        session = self.connect()
        session.send(f"USER carol@example.org\r\nPASS {self.SECRET}x\r\n".encode())
        self.clock.advance(2)
        session.send(f"USER carol@example.org\r\nPASS {self.SECRET}\r\n".encode())
        self.clock.advance(4)
        self.assertIn(b"+OK Logged in", session.take())
        self.assertEqual(self.commands(), ["USER carol@example.org", "PASS ********"] * 2)
        results = [e.data["result"] for e in self.recorder.of("login")]
        self.assertEqual(results, ["failed", "ok"])
        self.assertNoSecret()

    def test_auth_plain_initial_response_and_continuation(self):
        response = plain("", "carol@example.org", self.SECRET)
        session = self.connect()
        session.send(b"AUTH PLAIN " + response + b"\r\n")
        session.send(b"QUIT\r\n")
        session = self.connect()
        session.send(b"AUTH PLAIN\r\n" + response + b"\r\n")
        self.assertEqual(self.commands(), ["AUTH PLAIN ********", "QUIT", "AUTH PLAIN",
                                           "********"])
        self.assertNoSecret(response)

    def test_apop_digest(self):
        factory = self.make_factory(**{"pop3.apop": True})
        session = self.connect(factory=factory)
        timestamp = session.take().split(b" ")[-1].strip()
        digest = hashlib.md5(timestamp + self.SECRET.encode()).hexdigest()
        self.assertIn(b"+OK Logged in", session.send(f"APOP carol@example.org {digest}\r\n"
                                                     .encode()))
        self.assertEqual(self.commands(), ["APOP carol@example.org ********"])
        self.assertNoSecret(digest.encode())

    def test_a_login_on_a_closed_connection(self):
        session = self.connect()
        session.send(f"USER carol@example.org\r\nPASS {self.SECRET}-wrong\r\n".encode())
        session.drop()
        self.clock.advance(30)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoSecret(f"{self.SECRET}-wrong".encode())

    def test_states_and_messages(self):
        self.deliver(b"Subject: a\n\nbody\n")
        self.deliver(b"Subject: b\n\nbody\n")
        session = self.open_session()
        session.send(b"RETR 1\r\nTOP 2 0\r\nDELE 2\r\nRSET\r\nDELE 1\r\nQUIT\r\n")
        session.drop()
        states = [e.data["state"] for e in self.recorder.of("state")]
        self.assertEqual(states, ["AUTHORIZATION", "TRANSACTION", "UPDATE"])
        actions = [(e.data["action"], e.data.get("number")) for e in self.recorder.of("message")]
        self.assertEqual(actions, [("retrieved", 1), ("topped", 2), ("deleted", 2),
                                   ("undeleted", None), ("deleted", 1), ("removed", None)])
        [closed] = self.recorder.of("closed")
        self.assertEqual((closed.data["retrieved"], closed.data["deleted"]), (1, 1))
        summaries = [e.data.get("summary") for e in self.recorder.of("reply")]
        self.assertIn("retrieved message 1: 20 octets as listed; Subject: a", summaries)


class UpdateOnADroppedConnectionTests(POP3TestCase):
    def test_the_session_end_counts_what_the_update_removed(self):
        """A client that hangs up right after QUIT: the UPDATE goes on, and the session's
        closing line, logged at once, says what it is removing (not del=0)."""
        self.deliver(b"Subject: a\n\nbody\n")
        run_in_thread, pending = holding_the_update()
        self.factory = self.make_factory(run_in_thread=run_in_thread)
        session = self.open_session()
        session.send(b"DELE 1\r\nQUIT\r\n")
        session.drop()
        [closed] = self.recorder.of("closed")
        self.assertEqual((closed.data["deleted"], closed.data["reason"]),
                         (1, "client closed the connection"))
        pending.pop()()
        self.assertEqual(self.message_files(), [])
        self.open_session()  # the lock was released


class ShutdownDrainTests(POP3TestCase):
    """SIGTERM: idle sessions get -ERR [SYS/TEMP]; an UPDATE in flight is answered first."""

    def test_idle_sessions_are_told_and_nothing_is_deleted(self):
        self.deliver(b"Subject: a\n\nbody\n")
        logged_in = self.open_session()
        logged_in.send(b"DELE 1\r\n")
        greeted = self.connect()
        greeted.take()
        self.factory.sessions.drain(5)
        for session in (logged_in, greeted):
            self.assertEqual(session.take(),
                             b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n")
            self.assertTrue(session.closed)
        logged_in.drop()
        self.assertEqual(len(self.message_files()), 1, "no UPDATE without QUIT")

    def test_an_update_in_flight_is_answered(self):
        self.deliver(b"Subject: a\n\nbody\n")
        run_in_thread, pending = holding_the_update()
        self.factory = self.make_factory(run_in_thread=run_in_thread)
        session = self.open_session()
        session.send(b"DELE 1\r\nQUIT\r\n")
        d = self.factory.sessions.drain(5)
        self.assertEqual(session.take(), b"")
        pending.pop()()
        self.assertEqual(session.take(), b"+OK popgate signing off (1 message deleted)\r\n")
        session.drop()
        self.successResultOf(d)
        self.assertEqual(self.message_files(), [])

    def test_a_message_being_sent_is_finished_first(self):
        self.deliver(b"Subject: big\n\n" + b"x" * 200_000 + b"\n")
        session = self.open_session(socket_buffer=1000)
        session.send(b"RETR 1\r\n")
        self.factory.sessions.drain(5)
        sent = session.drain()
        self.assertTrue(sent.endswith(b"\r\n.\r\n-ERR [SYS/TEMP] Server shutting down, "
                                      b"try again later\r\n"), sent[-80:])

    def hold_password_checks(self) -> list:
        checks = []

        def run_later(f, *args):
            d = defer.Deferred()
            checks.append(lambda: d.callback(f(*args)))
            return d

        self.checker = PasswordChecker(self.users, run_later)
        self.factory = self.make_factory()
        return checks

    def test_a_login_in_progress_gets_the_goodbye_only(self):
        """The goodbye answers the PASS; the login's own answer, due later, is not sent
        after it (one command, one reply), and its mailbox lock is not kept."""
        for password in ("wrong", "pw"):
            checks = self.hold_password_checks()
            session = self.connect()
            session.take()
            session.send(f"USER alice@example.org\r\nPASS {password}\r\n".encode())
            d = self.factory.sessions.drain(5)
            self.assertEqual(session.take(),
                             b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n")
            checks.pop()()
            self.clock.advance(60)
            self.assertEqual(session.take(), b"", password)
            session.drop()
            self.successResultOf(d)
        self.checker = PasswordChecker(self.users, synchronous)
        self.factory = self.make_factory()
        self.open_session()  # the mailbox is not locked
