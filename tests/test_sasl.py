"""Tests for popgate.auth.sasl: the PLAIN and LOGIN exchanges both protocols share."""

import base64

from twisted.trial.unittest import TestCase

from popgate.auth import sasl


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class PlainTests(TestCase):
    def test_initial_response(self):
        exchange = sasl.exchange("plain")
        result = exchange.first(b64(b"\0alice@example.org\0pw with spaces"))
        self.assertEqual((result.authzid, result.authcid, result.password),
                         (b"", b"alice@example.org", b"pw with spaces"))

    def test_empty_challenge_then_response(self):
        exchange = sasl.exchange("PLAIN")
        self.assertEqual(exchange.first(None), b"")
        result = exchange.step(b64(b"alice\0alice\0pw"))
        self.assertEqual(result.authzid, b"alice")

    def test_malformed_responses(self):
        for response, text in [(b"=", "Malformed PLAIN response"),
                               (b64(b"alice\0pw"), "Malformed PLAIN response"),
                               (b64(b"\0\0pw"), "Malformed PLAIN response"),
                               (b"not base64!", "Invalid base64 in the PLAIN response"),
                               (b"*", "Authentication cancelled")]:
            error = self.assertRaises(sasl.SASLError, sasl.exchange("PLAIN").first, response)
            self.assertEqual(str(error), text, response)

    def test_the_password_is_not_in_the_repr(self):
        result = sasl.exchange("PLAIN").first(b64(b"\0alice\0s3cret"))
        self.assertNotIn("s3cret", repr(result))


class LoginTests(TestCase):
    def test_two_challenges(self):
        exchange = sasl.exchange("LOGIN")
        self.assertEqual(exchange.first(None), b"Username:")
        self.assertEqual(exchange.step(b64(b"alice@example.org")), b"Password:")
        result = exchange.step(b64(b"pw"))
        self.assertEqual((result.authcid, result.password), (b"alice@example.org", b"pw"))

    def test_initial_response_is_the_user_name(self):
        exchange = sasl.exchange("LOGIN")
        self.assertEqual(exchange.first(b64(b"alice")), b"Password:")
        self.assertEqual(exchange.step(b64(b"")).password, b"")

    def test_cancel_and_garbage(self):
        exchange = sasl.exchange("LOGIN")
        exchange.first(None)
        self.assertRaises(sasl.SASLCancelled, exchange.step, b"*")
        error = self.assertRaises(sasl.SASLError, sasl.exchange("LOGIN").first, b"%%%")
        self.assertEqual(str(error), "Invalid base64 in the user name")

    def test_unknown_mechanism(self):
        error = self.assertRaises(sasl.SASLError, sasl.exchange, "CRAM-MD5")
        self.assertEqual(str(error), "Unsupported authentication mechanism")
