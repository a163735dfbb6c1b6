"""makeService's own services: the periodic sweep of stale tmp/ files (issue 12)."""

import threading
import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from popgate.service import AuthThreadPool, TmpSweepService
from tests.fakes import Deferring


class FakeStore:
    def __init__(self):
        self.outcomes = [3, 0, OSError(5, "Input/output error"), 1]

    def clean_tmp(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class TmpSweepServiceTests(unittest.TestCase):
    def test_sweeps_every_interval_in_a_thread_one_at_a_time(self):
        clock, threads, store = Clock(), Deferring(), FakeStore()
        service = TmpSweepService(clock, store, threads, interval=300)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(threads.calls, [], "the start-up sweep is StorageService's")
        with capturedLogs() as events:
            clock.advance(300)
            clock.advance(300)  # still running: no second sweep at once
            self.assertEqual(len(threads.calls), 1)
            threads.run_next()
            for _ in range(3):
                clock.advance(300)
                threads.run_next()
        lines = [formatEvent(e) for e in events]
        self.assertEqual(lines, ["removed 3 stale tmp/ files",
                                 "cannot sweep stale tmp/ files: [Errno 5] Input/output error",
                                 "removed 1 stale tmp/ files"])
        self.assertFalse(any(e.get("log_failure") for e in events))

    def test_stops(self):
        clock, threads = Clock(), Deferring()
        service = TmpSweepService(clock, FakeStore(), threads, interval=300)
        service.startService()
        service.stopService()
        clock.advance(600)
        self.assertEqual(threads.calls, [])


class AuthThreadPoolTests(unittest.TestCase):
    def test_stopping_does_not_block_the_reactor(self):
        """ThreadPool.stop joins its threads, which first run every check still queued:
        on SIGTERM the reactor must go on answering the drain's sessions meanwhile."""
        from twisted.internet import reactor

        pool = AuthThreadPool(reactor, size=1)
        pool.startService()
        release = threading.Event()
        started = threading.Event()

        def hashing():
            started.set()
            release.wait(5)

        checks = [pool.run(hashing), pool.run(hashing)]  # one running, one queued
        self.assertTrue(started.wait(5))
        began = time.monotonic()
        stopped = pool.stopService()
        self.assertLess(time.monotonic() - began, 1.0, "stopService waited for the pool")
        release.set()
        return defer.gatherResults([*checks, defer.maybeDeferred(lambda: stopped)])


class OwnListenerTests(unittest.TestCase):
    """``relay.mode = "mx"`` never relays to this server: its name, or an address and
    port of its SMTP listener (a wildcard one through every loopback address)."""

    def listener(self, parent, description, label="SMTP"):
        from twisted.application.service import MultiService
        from twisted.internet import protocol, reactor

        from popgate.service import ListenerService

        top = parent or MultiService()
        service = ListenerService(reactor, description, protocol.Factory(), label)
        service.setServiceParent(top)
        service.startService()
        self.addCleanup(service.stopService)
        return top, service.port.getHost().port

    def wildcard(self, top, port: int) -> int:
        from twisted.internet import address, protocol, reactor

        from popgate.service import ListenerService

        class Bound:
            def getHost(self):
                return address.IPv4Address("TCP", "0.0.0.0", port)

        service = ListenerService(reactor, f"tcp:{port}", protocol.Factory(), "SMTP")
        service.port = Bound()
        service.setServiceParent(top)
        return port

    def test_own_name_address_and_wildcard(self):
        from popgate.service import _is_own_listener

        top, port = self.listener(None, "tcp:0:interface=127.0.0.1")
        _, pop3 = self.listener(top, "tcp:0:interface=127.0.0.1", label="POP3")
        wildcard = self.wildcard(top, 2525)  # not bound: tests never listen beyond loopback
        own = [("mx.example", "127.0.0.1", port), ("other.example", "127.0.0.2", wildcard),
               ("MX.TEST.", "192.0.2.1", 25)]
        others = [("mx.example", "127.0.0.2", port), ("mx.example", "127.0.0.1", pop3),
                  ("mx.example", "192.0.2.1", wildcard)]
        for host, ip, p in own:
            self.assertTrue(_is_own_listener(top, "mx.test", host, ip, p), (host, ip, p))
        for host, ip, p in others:
            self.assertFalse(_is_own_listener(top, "mx.test", host, ip, p), (host, ip, p))
