"""Tests for popgate.codec: SMTP DATA / BDAT decoding and POP3 dot-stuffing."""

import random

from twisted.trial import unittest

from popgate.codec import ChunkDecoder, DataDecoder, DotEncoder, header_summary


def decode(*pieces: bytes) -> tuple[bytes, bytes | None, bool]:
    """Feed ``pieces`` to a fresh DataDecoder; return (message, rest, bare_newline)."""
    decoder = DataDecoder()
    message, rest = b"", None
    for index, piece in enumerate(pieces):
        out, rest = decoder.feed(piece)
        self_check_pending(decoder)
        message += out
        if rest is not None:
            # What the client pipelined: the rest of this piece and the pieces after it.
            rest += b"".join(pieces[index + 1:])
            break
    return message, rest, decoder.bare_newline


def self_check_pending(decoder: DataDecoder) -> None:
    assert len(decoder._pending) <= 4, decoder._pending


def encode_pop3(stored: bytes, blocks: list[int] | None = None) -> bytes:
    """The POP3 multi-line body for ``stored``, encoded in blocks of the given sizes."""
    encoder = DotEncoder()
    out, position = b"", 0
    for size in blocks or []:
        out += encoder.encode(stored[position:position + size])
        position += size
    out += encoder.encode(stored[position:])
    return out + encoder.finish()


def pop3_unstuff(wire: bytes) -> bytes:
    """What a POP3 client (RFC 1939 §3) makes of a multi-line body, checking its framing."""
    framed = b"\r\n" + wire
    end = framed.find(b"\r\n.\r\n")
    assert end == len(framed) - 5, f"terminator not (only) at the end: {wire!r}"
    body = framed[:end + 2]
    assert b"\r\n.\r\n" not in body
    return body.replace(b"\r\n.", b"\r\n")[2:]


def smtp_encode(message: bytes) -> bytes:
    """What an SMTP client sends after DATA for ``message`` (RFC 5321 §4.5.2)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")
    return stuffed + b".\r\n"


def crlf(message: bytes) -> bytes:
    """``message`` with every line end (CRLF, bare CR, bare LF) as CRLF."""
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def has_bare_newline(message: bytes) -> bool:
    return message.count(b"\r") != message.count(b"\r\n") or \
        message.count(b"\n") != message.count(b"\r\n")


class DataDecoderTests(unittest.TestCase):
    MESSAGES = [
        b"Subject: hi\r\n\r\nhello\r\n.\r\n",
        b"..leading dot\r\n...two\r\n.\r\n\r\n.\r\n",
        b".\r\n",
        b"a\r\n..\r\n.x\r\nb\r\n.\r\nMAIL FROM:<a@b.c>\r\n",
        b"line\r\n.\r",  # not finished yet
        b"x\r\n\r\n\r\n.\r\nQUIT\r\n",
    ]

    def test_simple(self):
        self.assertEqual(decode(b"Subject: hi\r\n\r\nbody\r\n.\r\n"),
                         (b"Subject: hi\n\nbody\n", b"", False))

    def test_empty_message(self):
        self.assertEqual(decode(b".\r\n"), (b"", b"", False))

    def test_first_line_dot_dot(self):
        self.assertEqual(decode(b"..\r\n.\r\n"), (b".\n", b"", False))
        self.assertEqual(decode(b"..x\r\n.\r\n"), (b".x\n", b"", False))

    def test_first_line_dot_then_text_is_unstuffed(self):
        # RFC 5321 §4.5.2: the first "." of any line is removed, also on the first line.
        self.assertEqual(decode(b".x\r\n.\r\n"), (b"x\n", b"", False))

    def test_dot_lines_unstuffed(self):
        self.assertEqual(decode(b"a\r\n..\r\n...\r\n..b\r\n.\r\n"),
                         (b"a\n.\n..\n.b\n", b"", False))

    def test_rest_returned_exactly(self):
        message, rest, _ = decode(b"hi\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDA")
        self.assertEqual(message, b"hi\n")
        self.assertEqual(rest, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDA")

    def test_rest_may_itself_look_like_data(self):
        message, rest, _ = decode(b"one\r\n.\r\ntwo\r\n.\r\n")
        self.assertEqual((message, rest), (b"one\n", b"two\r\n.\r\n"))

    def test_no_end_yet(self):
        decoder = DataDecoder()
        # Only the bytes that could still start CRLF.CRLF are held back.
        self.assertEqual(decoder.feed(b"abc\r\ndef\r\n."), (b"abc\ndef", None))
        self.assertEqual(decoder.feed(b"\r"), (b"", None))
        self.assertEqual(decoder.feed(b"\n"), (b"\n", b""))

    def test_only_crlf_dot_crlf_ends(self):
        for smuggle in [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n",
                        b"\n.\r"]:
            wire = b"a" + smuggle + b"MAIL FROM:<x@y.z>\r\nb\r\n.\r\nQUIT\r\n"
            message, rest, bare = decode(wire)
            self.assertEqual(rest, b"QUIT\r\n", smuggle)
            self.assertIn(b"MAIL FROM:<x@y.z>\nb\n", message, smuggle)
            self.assertTrue(bare, smuggle)

    def test_smuggling_split_everywhere(self):
        wire = b"a\r\n.\nb\n.\r\nc\r.\rd\r\n.\re\r\n.\r\nRSET\r\n"
        whole = decode(wire)
        self.assertEqual(whole[1], b"RSET\r\n")
        self.assertTrue(whole[2])
        for i in range(len(wire) + 1):
            self.assertEqual(decode(wire[:i], wire[i:]), whole, i)

    def test_bare_newlines_normalised(self):
        self.assertEqual(decode(b"a\nb\rc\r\n.\r\n"), (b"a\nb\nc\n", b"", True))

    def test_no_bare_newline_flag_for_clean_message(self):
        self.assertFalse(decode(b"a\r\nb\r\n\r\n.\r\n")[2])

    def test_every_split_point(self):
        for wire in self.MESSAGES:
            whole = decode(wire)
            for i in range(len(wire) + 1):
                self.assertEqual(decode(wire[:i], wire[i:]), whole, (wire, i))

    def test_every_pair_of_split_points(self):
        for wire in self.MESSAGES[:4]:
            whole = decode(wire)
            for i in range(len(wire) + 1):
                for j in range(i, len(wire) + 1):
                    self.assertEqual(decode(wire[:i], wire[i:j], wire[j:]), whole,
                                     (wire, i, j))

    def test_byte_at_a_time(self):
        for wire in self.MESSAGES:
            pieces = [wire[i:i + 1] for i in range(len(wire))]
            self.assertEqual(decode(*pieces), decode(wire), wire)

    def test_expected_results(self):
        self.assertEqual(decode(self.MESSAGES[1]), (b".leading dot\n..two\n", b"\r\n.\r\n", False))
        self.assertEqual(decode(self.MESSAGES[3]),
                         (b"a\n.\nx\nb\n", b"MAIL FROM:<a@b.c>\r\n", False))
        self.assertEqual(decode(self.MESSAGES[4]), (b"line", None, False))  # CRLF.CR held back

    def test_long_line_bounded_state(self):
        decoder = DataDecoder()
        total = 0
        chunk = b"a" * 8191 + b"\r"  # every chunk ends in a CR that might start CRLF.CRLF
        for _ in range(128):  # 1 MiB, one line
            out, rest = decoder.feed(chunk)
            self.assertIsNone(rest)
            self.assertLessEqual(len(decoder._pending), 4)
            total += len(out)
        out, rest = decoder.feed(b"\n.\r\n")
        self.assertEqual(rest, b"")
        total += len(out)
        # Each held-back CR turned out to be a bare CR, except the last one.
        self.assertEqual(total, 128 * 8192)
        self.assertTrue(decoder.bare_newline)

    def test_long_clean_line_bounded_state(self):
        decoder = DataDecoder()
        produced = []
        for _ in range(256):
            out, _ = decoder.feed(b"b" * 4096)
            produced.append(out)
            self.assertLessEqual(len(decoder._pending), 4)
        out, rest = decoder.feed(b"\r\n.\r\n")
        produced.append(out)
        self.assertEqual(b"".join(produced), b"b" * (1 << 20) + b"\n")
        self.assertFalse(decoder.bare_newline)


class ChunkDecoderTests(unittest.TestCase):
    def test_message_without_final_line_end_gets_one(self):
        """Issue 12: ``BDAT 5 LAST`` + ``hello`` is stored as a line, so that the size
        promised by LIST and ``+OK n octets`` is what RETR sends."""
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"hello", last=True), b"hello\n")
        self.assertFalse(decoder.bare_newline)
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r\nhello") + decoder.feed(b"", last=True),
                         b"a\nhello\n")
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r\n") + decoder.feed(b"", last=True), b"a\n")
        self.assertEqual(ChunkDecoder().feed(b"", last=True), b"")

    def test_crlf(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r\nb\r\n", last=True), b"a\nb\n")
        self.assertFalse(decoder.bare_newline)

    def test_no_dot_unstuffing(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"..\r\n.\r\n", last=True), b"..\n.\n")

    def test_cr_split_across_chunks(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r"), b"a")
        self.assertEqual(decoder.feed(b"\nb\r"), b"\nb")
        self.assertEqual(decoder.feed(b"\n", last=True), b"\n")
        self.assertFalse(decoder.bare_newline)

    def test_bare_cr_at_chunk_end(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r") + decoder.feed(b"b", last=True), b"a\nb\n")
        self.assertTrue(decoder.bare_newline)

    def test_cr_at_end_of_last_chunk(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r", last=True), b"a\n")
        self.assertTrue(decoder.bare_newline)

    def test_held_cr_then_empty_last_chunk(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\r") + decoder.feed(b"", last=True), b"a\n")
        self.assertTrue(decoder.bare_newline)

    def test_bare_lf(self):
        decoder = ChunkDecoder()
        self.assertEqual(decoder.feed(b"a\nb\r\n", last=True), b"a\nb\n")
        self.assertTrue(decoder.bare_newline)

    def test_every_split_point(self):
        data = b"a\r\n\r\nb\rc\n\r\r\nd\r"
        whole_decoder = ChunkDecoder()
        whole = whole_decoder.feed(data, last=True)
        for i in range(len(data) + 1):
            decoder = ChunkDecoder()
            out = decoder.feed(data[:i]) + decoder.feed(data[i:], last=True)
            self.assertEqual(out, whole, i)
            self.assertEqual(decoder.bare_newline, whole_decoder.bare_newline)


class DotEncoderTests(unittest.TestCase):
    def test_simple(self):
        self.assertEqual(encode_pop3(b"a\nb\n"), b"a\r\nb\r\n.\r\n")

    def test_empty_body(self):
        self.assertEqual(encode_pop3(b""), b".\r\n")

    def test_first_line_dot(self):
        self.assertEqual(encode_pop3(b".\n"), b"..\r\n.\r\n")
        self.assertEqual(encode_pop3(b".x\n"), b"..x\r\n.\r\n")
        self.assertEqual(encode_pop3(b"..\n"), b"...\r\n.\r\n")

    def test_dot_lines(self):
        self.assertEqual(encode_pop3(b"a\n.\n..\nb.\n"), b"a\r\n..\r\n...\r\nb.\r\n.\r\n")

    def test_no_final_newline(self):
        self.assertEqual(encode_pop3(b"a\nb"), b"a\r\nb\r\n.\r\n")
        self.assertEqual(encode_pop3(b"."), b"..\r\n.\r\n")

    def test_existing_crlf_not_doubled(self):
        self.assertEqual(encode_pop3(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n")
        self.assertEqual(encode_pop3(b"a\r\n.\r\nb\n"), b"a\r\n..\r\nb\r\n.\r\n")

    def test_lone_cr_kept(self):
        # A bare CR is not a line end: sent as is, and a dot after it is not at a line start.
        self.assertEqual(encode_pop3(b"a\r.b\n"), b"a\r.b\r\n.\r\n")
        self.assertEqual(encode_pop3(b"a\r"), b"a\r\r\n.\r\n")

    def test_dot_at_every_block_boundary(self):
        stored = b".a\n.\n..b\nc\n.\n.d\r\n.\r\n\r\n.e"
        expected = encode_pop3(stored)
        self.assertEqual(pop3_unstuff(expected), crlf(stored) + b"\r\n")
        for i in range(len(stored) + 1):
            self.assertEqual(encode_pop3(stored, [i]), expected, i)
            for j in range(len(stored) - i + 1):
                self.assertEqual(encode_pop3(stored, [i, j]), expected, (i, j))

    def test_byte_at_a_time(self):
        stored = b".\r\n.\n\r\r\n..\r"
        self.assertEqual(encode_pop3(stored, [1] * len(stored)), encode_pop3(stored))

    def test_empty_blocks(self):
        self.assertEqual(encode_pop3(b".x\n", [0, 0, 1, 0, 2]), b"..x\r\n.\r\n")


class RoundTripTests(unittest.TestCase):
    """SMTP client -> DataDecoder -> Maildir bytes -> DotEncoder -> POP3 client."""

    ALPHABET = [b".", b"a", b"\r\n", b"\n", b"\r"]

    def random_splits(self, rng: random.Random, data: bytes) -> list[bytes]:
        pieces, position = [], 0
        while position < len(data):
            size = rng.choice([1, 1, 2, 3, 5, 8, 64])
            pieces.append(data[position:position + size])
            position += size
        return pieces

    def test_round_trip(self):
        rng = random.Random(20261010)
        clean = 0
        for _ in range(1500):
            message = b"".join(rng.choice(self.ALPHABET) for _ in range(rng.randrange(0, 25)))
            wire = smtp_encode(message) + b"QUIT\r\n"
            stored, rest, bare = decode(*self.random_splits(rng, wire))
            self.assertEqual(rest, b"QUIT\r\n", message)
            self.assertNotIn(b"\r", stored, message)
            self.assertEqual(bare, has_bare_newline(message), message)

            blocks = [rng.randrange(0, 6) for _ in range(rng.randrange(0, 6))]
            received = pop3_unstuff(encode_pop3(stored, blocks))
            sent = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
            self.assertEqual(received, crlf(sent), message)
            if not bare:
                clean += 1
                self.assertEqual(received, sent, message)
        self.assertGreater(clean, 100)  # the property was checked on clean messages too


class HeaderSummaryTests(unittest.TestCase):
    def test_from_to_subject_in_that_order_until_the_blank_line(self):
        head = (b"Return-Path: <x@y>\r\nSubject: Hello\r\n\tworld\r\nTO: bob@example.org\r\n"
                b"From: Alice <alice@example.org>\r\n\r\nSubject: not a header\r\n")
        self.assertEqual(header_summary(head), "From: Alice <alice@example.org>, "
                                                     "To: bob@example.org, Subject: Hello")

    def test_long_and_undecodable_values_and_no_headers(self):
        summary = header_summary(b"Subject: " + b"\xff" + b"x" * 100 + b"\n\nbody")
        self.assertTrue(summary.startswith("Subject: \ufffdxxx"))
        self.assertEqual(len(summary), len("Subject: ") + 60)
        self.assertEqual(header_summary(b"\nSubject: after the blank line\n"), "")
        self.assertEqual(header_summary(b"x" * 10_000), "")
