"""Fuzzing with hypothesis: hostile input never escapes as an exception.

Both protocol parsers get random and mutated command streams, split at random points into
``dataReceived`` calls, in every state a client can bring a session to (greeted, after
EHLO, inside a transaction, inside DATA and BDAT, after STLS; POP3 before and after
login, inside a SASL exchange).  What must hold, whatever the bytes:

* no exception escapes and nothing is logged as an internal error;
* every reply is well formed (SMTP: ``ddd`` then space or hyphen; POP3: ``+OK``, ``-ERR``
  or a ``+ `` SASL challenge, multi-line bodies ended by ``.``);
* the session stays consistent: if it is still open, a final ``NOOP`` is answered.

The address parser, the passwd-file parser and the config loader get malformed input and
answer with their own clear error, never another exception.
"""

from __future__ import annotations

import os
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from popgate import config
from popgate.addresses import AddressError, parse_path
from popgate.auth.users import UserError, parse_line
from popgate.smtp.server import Mode
from tests.test_pop3 import ALICE, POP3TestCase, plain
from tests.test_smtp import EHLO, MAIL, RCPT_ALICE, SMTPFixture

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

SMTP_WORDS = [b"EHLO x", b"HELO y", b"LHLO z", b"MAIL FROM:", b"RCPT TO:",
              b"<alice@example.org>", b"<>", b"<postmaster>", b"DATA", b"BDAT ", b"LAST",
              b"RSET", b"NOOP", b"QUIT", b"STARTTLS", b"VRFY", b"EXPN", b"HELP", b" SIZE=",
              b" BODY=8BITMIME", b" SMTPUTF8", b"9" * 25, b"3", b"0", b"\r\n", b"\n", b"\r",
              b".", b"\r\n.\r\n", b"..", b"\x00", b"\xff", "ü".encode(), b" ", b"x" * 600]
POP3_WORDS = [b"USER ", b"PASS ", b"APOP ", b"AUTH ", b"PLAIN", b"LOGIN", b"STLS", b"CAPA",
              b"QUIT", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP",
              b"UIDL", b" 1", b" 0", b" 2", b" -1", b" 99999999999", ALICE.encode(), b"pw",
              b"*", b"=", plain("", ALICE, "pw"), b"\r\n", b"\n", b"\r", b".", b"\x00",
              b"\xff", b" ", b"x" * 300]

_SMTP_REPLY = re.compile(rb"\A[2-5]\d\d[ -]")


def streams(words: list[bytes]):
    """Byte streams made of protocol words and random bytes, and where to split them."""
    token = st.one_of(st.sampled_from(words), st.binary(min_size=1, max_size=4))
    stream = st.lists(token, min_size=1, max_size=60).map(b"".join)
    return st.tuples(stream, st.lists(st.integers(1, 64), min_size=1, max_size=20))


def feed(protocol, data: bytes, sizes: list[int]) -> None:
    position, index = 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        protocol.dataReceived(data[position:position + size])
        position += size
        index += 1


class SMTPFuzzTests(SMTPFixture, TestCase):
    PREFIXES = {
        "greeted": b"",
        "after EHLO": EHLO,
        "in a transaction": EHLO + MAIL + RCPT_ALICE,
        "in DATA": EHLO + MAIL + RCPT_ALICE + b"DATA\r\n",
        "in a BDAT chunk": EHLO + MAIL + RCPT_ALICE + b"BDAT 40\r\nSubject: x\r\n",
        "after STARTTLS": EHLO + b"STARTTLS\r\n",
    }

    def setUp(self):
        super().setUp()
        self.make_factory(tls=object(), smtp__max_errors=1000, smtp__max_message_size=5000)

    def check_stream(self, prefix: bytes, data: bytes, sizes: list[int]) -> None:
        client = self.connect()
        feed(client.protocol, prefix + data, sizes)
        if not client.closed:
            # End a line, a DATA body, a command, in a packet of their own (bytes behind
            # a STARTTLS in one packet are discarded, as they must be).
            client.protocol.dataReceived(b"\r\n.\r\nRSET\r\n")
        lines = client.output.split(b"\r\n")
        self.assertEqual(lines[-1], b"", "a reply ends with CRLF")
        for line in lines[:-1]:
            self.assertRegex(line, _SMTP_REPLY)
            self.assertFalse(line.startswith(b"451 4.3.0 Error: internal"), line)
        if not client.closed and client.protocol._mode is Mode.COMMAND:
            # Not inside a BDAT chunk the stream declared huge: commands still work.
            client.replies()
            self.assertEqual(client.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        client.disconnect()
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(streams(SMTP_WORDS), st.sampled_from(sorted(PREFIXES)))
    def test_random_streams_in_every_state(self, stream, state):
        data, sizes = stream
        self.check_stream(self.PREFIXES[state], data, sizes)

    @FUZZ
    @given(st.sampled_from(sorted(PREFIXES)), st.data())
    def test_mutated_valid_sessions(self, state, draw):
        valid = (self.PREFIXES[state] + b"Subject: hi\r\n\r\nbody\r\n.\r\nRSET\r\n"
                 + MAIL + RCPT_ALICE + b"BDAT 5 LAST\r\nhello")
        mutated = bytearray(valid)
        for _ in range(draw.draw(st.integers(1, 8))):
            position = draw.draw(st.integers(0, len(mutated) - 1))
            mutated[position] = draw.draw(st.integers(0, 255))
        sizes = draw.draw(st.lists(st.integers(1, 64), min_size=1, max_size=10))
        self.check_stream(b"", bytes(mutated), sizes)


class POP3FuzzTests(POP3TestCase):
    PREFIXES = {
        "greeted": b"",
        "after USER": b"USER alice@example.org\r\n",
        "in a SASL exchange": b"AUTH PLAIN\r\n",
        "logged in": b"USER alice@example.org\r\nPASS pw\r\n",
        "after STLS": b"STLS\r\n",
    }

    def setUp(self):
        super().setUp()
        self.deliver(b"Subject: a\n\n.line\nbody\n")
        self.deliver(b"Subject: b\n\nbody\n")

    def check_stream(self, prefix: bytes, data: bytes, sizes: list[int]) -> None:
        self.factory = self.make_factory(tls=object())  # no penalty left by the last one
        session = self.connect()
        feed(session.protocol, prefix + data, sizes)
        self.clock.advance(60)  # any login delay runs out
        if not session.closed:
            session.protocol.dataReceived(b"\r\n")
            session.protocol.dataReceived(b"*\r\nNOOP\r\n")
        output = session.output
        session.drop()
        self.assertNotIn(b"internal error", output)
        self.assertTrue(output.endswith(b"\r\n"), output[-40:])
        self.assertTrue(output.startswith(b"+OK popgate ready"), output[:40])
        if not session.closed:
            last = output[:-2].rsplit(b"\r\n", 1)[-1]
            self.assertRegex(last, rb"\A(\+OK|-ERR)", output[-200:])
        self.assertEqual(self.flushLoggedErrors(), [])
        # Whatever happened, the session left the mailbox unlocked.
        self.open_session().drop()

    @FUZZ
    @given(streams(POP3_WORDS), st.sampled_from(sorted(PREFIXES)))
    def test_random_streams_in_every_state(self, stream, state):
        data, sizes = stream
        self.check_stream(self.PREFIXES[state], data, sizes)


class ParserFuzzTests(TestCase):
    @FUZZ
    @given(st.text(max_size=300), st.booleans())
    def test_address_parser_answers_or_refuses(self, text, utf8):
        try:
            parse_path(text, utf8=utf8)
        except AddressError as e:
            self.assertTrue(str(e))

    @FUZZ
    @given(st.text(max_size=300))
    def test_passwd_line_parser_answers_or_refuses(self, line):
        try:
            parse_line(line)
        except (AddressError, UserError) as e:
            self.assertTrue(str(e))

    @FUZZ
    @given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode)
           | st.sampled_from([b"[server]\nhostname = 3\n", b"[smtp]\nlisten = 'x'\n",
                              b"[limits]\nmax_sessions = -1\n", b"[aliases]\n'@' = []\n",
                              b"[pop3]\nidle_timeout = 1e999\n", b"[tls]\ncertificate = 1\n"]))
    def test_config_loader_answers_with_one_line(self, content):
        fd, path = tempfile.mkstemp(suffix=".toml")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            try:
                config.load(path)
            except config.ConfigError as e:
                self.assertNotIn("\n", str(e))
                self.assertTrue(str(e).startswith(path))
        finally:
            os.unlink(path)
