"""makeService's own services: the periodic sweep of stale tmp/ files (issue 12)."""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from popgate.service import TmpSweepService
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
