"""Tests for the abuse brakes: connection caps (popgate.limits), failed-login delays
(popgate.auth.penalty) and log rate limiting (popgate.loglimit)."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from popgate.auth.penalty import FREE_FAILURES, FREE_NAMES, AuthPenalty, ChecksPerAddress
from popgate.limits import ConnectionLimiter, in_networks, is_loopback, parse_networks
from popgate.loglimit import LogLimiter


class ConnectionLimiterTests(unittest.TestCase):
    def test_per_ip_cap(self):
        limiter = ConnectionLimiter(max_total=100, max_per_ip=2)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("192.0.2.1"), "too many sessions from your address")
        # Another address is not affected.
        self.assertIsNone(limiter.acquire("192.0.2.2"))
        self.assertEqual(limiter.total, 3)

    def test_total_cap(self):
        limiter = ConnectionLimiter(max_total=3, max_per_ip=10)
        for n in range(3):
            self.assertIsNone(limiter.acquire(f"192.0.2.{n}"))
        self.assertEqual(limiter.acquire("192.0.2.99"), "too many sessions")
        self.assertEqual(limiter.total, 3)

    def test_total_cap_applies_to_trusted(self):
        limiter = ConnectionLimiter(max_total=2, max_per_ip=1,
                                    trusted=parse_networks(["10.0.0.0/8"]))
        self.assertIsNone(limiter.acquire("10.1.1.1"))
        self.assertIsNone(limiter.acquire("10.1.1.1"))
        self.assertEqual(limiter.acquire("10.1.1.1"), "too many sessions")

    def test_refusal_not_counted(self):
        limiter = ConnectionLimiter(max_total=10, max_per_ip=1)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        for _ in range(5):
            self.assertIsNotNone(limiter.acquire("192.0.2.1"))
        limiter.release("192.0.2.1")
        self.assertEqual(limiter.total, 0)
        self.assertIsNone(limiter.acquire("192.0.2.1"))

    def test_release_frees(self):
        limiter = ConnectionLimiter(max_total=2, max_per_ip=1)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertIsNone(limiter.acquire("192.0.2.2"))
        self.assertEqual(limiter.acquire("192.0.2.3"), "too many sessions")
        limiter.release("192.0.2.1")
        self.assertEqual(limiter.total, 1)
        self.assertIsNone(limiter.acquire("192.0.2.3"))
        self.assertEqual(limiter.acquire("192.0.2.2"), "too many sessions")
        limiter.release("192.0.2.2")
        self.assertEqual(limiter.acquire("192.0.2.2"), None)

    def test_release_forgets_idle_addresses(self):
        limiter = ConnectionLimiter(max_total=10, max_per_ip=2)
        for n in range(5):
            limiter.acquire(f"192.0.2.{n}")
            limiter.release(f"192.0.2.{n}")
        self.assertEqual(limiter.total, 0)
        self.assertEqual(len(limiter._per_ip), 0)  # no memory kept per past client

    def test_trusted_network_exempt_from_per_ip(self):
        limiter = ConnectionLimiter(max_total=100, max_per_ip=1,
                                    trusted=parse_networks(["203.0.113.0/24", "2001:db8::/32"]))
        for _ in range(5):
            self.assertIsNone(limiter.acquire("203.0.113.7"))
            self.assertIsNone(limiter.acquire("2001:db8::25"))
        self.assertIsNone(limiter.acquire("198.51.100.1"))
        self.assertIsNotNone(limiter.acquire("198.51.100.1"))
        self.assertIsNone(limiter.acquire("2001:db9::1"))
        self.assertIsNotNone(limiter.acquire("2001:db9::1"))

    def test_trusted_ipv4_mapped_ipv6(self):
        """A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d."""
        limiter = ConnectionLimiter(max_total=100, max_per_ip=1,
                                    trusted=parse_networks(["203.0.113.0/24"]))
        for _ in range(3):
            self.assertIsNone(limiter.acquire("::ffff:203.0.113.7"))
        self.assertIsNone(limiter.acquire("::ffff:198.51.100.1"))
        self.assertIsNotNone(limiter.acquire("::ffff:198.51.100.1"))

    def test_unix_socket_peer_not_trusted_network(self):
        limiter = ConnectionLimiter(max_total=100, max_per_ip=1,
                                    trusted=parse_networks(["0.0.0.0/0"]))
        self.assertIsNone(limiter.acquire("/run/popgate.sock"))
        self.assertIsNotNone(limiter.acquire("/run/popgate.sock"))


class NetworkTests(unittest.TestCase):
    def test_parse_networks_not_strict(self):
        networks = parse_networks(["10.1.2.3/8", "::1"])
        self.assertEqual([str(n) for n in networks], ["10.0.0.0/8", "::1/128"])

    def test_parse_networks_invalid(self):
        self.assertRaises(ValueError, parse_networks, ["not-a-network"])

    def test_in_networks(self):
        networks = parse_networks(["10.0.0.0/8", "fd00::/8"])
        self.assertTrue(in_networks("10.200.0.1", networks))
        self.assertTrue(in_networks("::ffff:10.0.0.1", networks))
        self.assertTrue(in_networks("fd12::1", networks))
        self.assertFalse(in_networks("11.0.0.1", networks))
        self.assertFalse(in_networks("fe80::1", networks))
        self.assertFalse(in_networks("example.org", networks))
        self.assertFalse(in_networks("10.0.0.1", ()))

    def test_is_loopback(self):
        for host in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"]:
            self.assertTrue(is_loopback(host), host)
        for host in ["10.0.0.1", "192.0.2.1", "::ffff:10.0.0.1", "2001:db8::1", "0.0.0.0",
                     "::"]:
            self.assertFalse(is_loopback(host), host)

    def test_unix_socket_is_local(self):
        self.assertTrue(is_loopback("/run/popgate/pop3.sock"))
        self.assertTrue(is_loopback(""))


ALICE = b"alice@example.org"


class AuthPenaltyTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # a realistic, non-zero time
        self.penalty = AuthPenalty(self.clock, base=2.0, maximum=15.0, window=600.0)

    def failure(self, password=b"guess", host="192.0.2.1", username=ALICE):
        self.penalty.failed(host, username, password)

    def delay(self, username=ALICE, host="192.0.2.1"):
        return self.penalty.delay(host, username)

    def test_growing_delays_capped(self):
        delays = [self.delay()]
        for n in range(6):
            self.failure(b"guess%d" % n)
            delays.append(self.delay())
        self.assertEqual(delays, [0, 2, 4, 8, 15, 15, 15])

    def test_same_wrong_password_counts_once(self):
        for _ in range(10):
            self.failure(b"stale-password")
        self.assertEqual(self.delay(), 2)
        self.failure(b"another")
        self.assertEqual(self.delay(), 4)

    def test_user_name_compared_as_stored(self):
        self.failure(b"1", username=b" Alice@Example.ORG")
        self.assertEqual(self.delay("alice@example.org"), 2)

    def test_username_password_boundary(self):
        # ("ab", "c") and ("a", "bc") are different attempts (and names).
        self.failure(b"c", username=b"ab")
        self.failure(b"bc", username=b"a")
        self.assertEqual((self.delay(b"ab"), self.delay(b"a")), (2, 2))

    def test_per_ip(self):
        self.failure(b"1")
        self.failure(b"2")
        self.assertEqual(self.delay(), 4)
        self.assertEqual(self.delay(host="192.0.2.2"), 0)

    def test_a_stuck_client_does_not_slow_its_colleagues(self):
        """Issue 12: behind one NAT, a phone with an old password (and even a user who
        keeps mistyping) leave the others' logins prompt."""
        for _ in range(50):
            self.failure(b"old-password")
        for n in range(10):
            self.failure(b"typo%d" % n, username=b"bob@example.org")
        self.assertEqual(self.delay(), 2)
        self.assertEqual(self.delay(b"bob@example.org"), 15)
        self.assertEqual(self.delay(b"carol@example.org"), 0)

    def test_a_guesser_rotating_names_slows_the_whole_address(self):
        delays = []
        for n in range(FREE_NAMES + 5):
            self.failure(b"123456", username=b"user%d@example.org" % n)
            delays.append(self.delay(b"someone-new@example.org"))
        self.assertEqual(delays, [0] * FREE_NAMES + [2, 4, 8, 15, 15])
        self.assertEqual(self.delay(host="192.0.2.2"), 0)

    def test_many_guesses_on_few_names_slow_the_whole_address(self):
        for n in range(FREE_FAILURES):
            self.failure(b"guess%d" % n, username=b"user%d@example.org" % (n % 2))
        self.assertEqual(self.delay(b"carol@example.org"), 0)
        self.failure(b"one more")
        self.assertEqual(self.delay(b"carol@example.org"), 2)

    def test_success_resets_only_that_user(self):
        self.failure(b"1")
        self.failure(b"2")
        self.failure(b"1", username=b"bob@example.org")
        self.penalty.succeeded("192.0.2.1", "bob@example.org")
        self.assertEqual(self.delay(), 4)
        self.penalty.succeeded("192.0.2.1", "alice@example.org")
        self.assertEqual(self.delay(), 0)
        self.failure(b"1")  # counted again after a reset
        self.assertEqual(self.delay(), 2)

    def test_a_guesser_cannot_clear_the_address_with_an_account_of_its_own(self):
        for n in range(FREE_NAMES + 2):
            self.failure(b"123456", username=b"user%d@example.org" % n)
        self.penalty.succeeded("192.0.2.1", "mallory@example.org")
        self.assertEqual(self.delay(b"mallory@example.org"), 4)

    def test_success_elsewhere_does_not_reset(self):
        self.failure(b"1")
        self.penalty.succeeded("192.0.2.2", "alice@example.org")
        self.assertEqual(self.delay(), 2)

    def test_window_expiry(self):
        self.failure(b"1")
        self.failure(b"2")
        self.clock.advance(600)
        self.assertEqual(self.delay(), 4)  # still inside the window
        self.clock.advance(1)
        self.assertEqual(self.delay(), 0)
        self.failure(b"1")  # the old attempts are forgotten too
        self.assertEqual(self.delay(), 2)

    def test_window_counts_from_last_failure(self):
        self.failure(b"1")
        self.clock.advance(500)
        self.failure(b"2")
        self.clock.advance(500)
        self.assertEqual(self.delay(), 4)

    def test_repeat_keeps_window_open(self):
        self.failure(b"same")
        self.clock.advance(500)
        self.failure(b"same")
        self.clock.advance(500)
        self.assertEqual(self.delay(), 2)

    def test_memory_bounded_under_spray(self):
        for n in range(10_050):
            self.penalty.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", b"u", b"p")
        self.clock.advance(601)
        self.penalty.failed("192.0.2.1", b"u", b"p")
        self.assertLessEqual(len(self.penalty._failures), 1)
        self.assertLessEqual(len(self.penalty._addresses), 1)


class LogLimiterTests(unittest.TestCase):
    def test_once_per_interval(self):
        clock = Clock()
        limiter = LogLimiter(clock, interval=60)
        self.assertTrue(limiter.allow(("refused", "192.0.2.1")))
        self.assertFalse(limiter.allow(("refused", "192.0.2.1")))
        self.assertTrue(limiter.allow(("refused", "192.0.2.2")))
        clock.advance(59)
        self.assertFalse(limiter.allow(("refused", "192.0.2.1")))
        clock.advance(1)
        self.assertTrue(limiter.allow(("refused", "192.0.2.1")))
        self.assertFalse(limiter.allow(("refused", "192.0.2.1")))

    def test_default_interval(self):
        clock = Clock()
        limiter = LogLimiter(clock)
        self.assertTrue(limiter.allow("k"))
        clock.advance(59.9)
        self.assertFalse(limiter.allow("k"))
        clock.advance(0.1)
        self.assertTrue(limiter.allow("k"))

    def test_memory_bounded(self):
        limiter = LogLimiter(Clock())
        for n in range(20_000):
            limiter.allow(n)
        self.assertLessEqual(len(limiter._last), 10_001)



class ChecksPerAddressTests(unittest.TestCase):
    def test_bounded_per_address_and_forgotten_when_idle(self):
        checks = ChecksPerAddress(limit=1)
        first, second = defer.Deferred(), defer.Deferred()
        started = []

        def check(d, name):
            started.append(name)
            return d

        done1 = checks.run("192.0.2.1", check, first, "first")
        checks.run("192.0.2.1", check, second, "second")
        checks.run("198.51.100.7", check, defer.succeed(None), "other")
        self.assertEqual(started, ["first", "other"])  # another address is not held up
        first.callback("ok")
        self.assertEqual(self.successResultOf(done1), "ok")
        self.assertEqual(started, ["first", "other", "second"])
        self.assertEqual(len(checks), 1)
        second.callback("ok")
        self.assertEqual(len(checks), 0)


class PenaltyKeyTests(unittest.TestCase):
    def test_ipv6_addresses_of_one_64_share_a_penalty(self):
        clock = Clock()
        penalty = AuthPenalty(clock, base=2, maximum=15, window=300)
        penalty.failed("2001:db8:1:2::1", b"u", b"a")
        self.assertEqual(penalty.delay("2001:db8:1:2:ffff::9", b"u"), 2)
        self.assertEqual(penalty.delay("2001:db8:1:3::1", b"u"), 0)
        penalty.failed("::ffff:192.0.2.7", b"u", b"a")
        self.assertEqual(penalty.delay("192.0.2.7", b"u"), 2)

    def test_memory_is_bounded_but_counting_goes_on(self):
        clock = Clock()
        penalty = AuthPenalty(clock, base=2, maximum=15, window=300)
        for n in range(1000):
            penalty.failed("192.0.2.1", b"u%d" % (n % 100), b"guess-%d" % n)
        failures = penalty._failures["192.0.2.1", "u1"]
        self.assertEqual(failures.count, 10)
        self.assertLessEqual(len(failures.secrets), 32)
        at_address = penalty._addresses["192.0.2.1"]
        self.assertEqual(at_address.count, 1000)
        self.assertLessEqual(len(at_address.names), 64)
        self.assertEqual(penalty.delay("192.0.2.1", b"anyone"), 15)
