"""End to end: ``[server] workers = 2`` under ``twistd -n popgate`` (popgate.workers).

Two processes accept SMTP on one port and both deliver; their lines are in the one log;
a worker that dies is replaced; SIGHUP reaches it; SIGTERM stops both; a ``kill -9`` of
the main process takes the worker with it, so the port is free for the restart.  (The
crash test with workers is in test_e2e_reliability.)
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.harness import short_directory, start_twistd, until

USER = ("alice@example.org", "pw")
SETTINGS = {"server": {"workers": 2}}
_STARTED = re.compile(rb"popgate worker 1 started \(pid (\d+)\)")


def send_many(port: int, count: int) -> None:
    """``count`` messages, one connection each (blocking: in a thread)."""
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("load@remote.example", [USER[0]],
                            f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())


def send_lmtp(path: str) -> None:
    with smtplib.LMTP(path, timeout=20) as client:
        client.sendmail("load@remote.example", [USER[0]], b"Subject: lmtp\r\n\r\nhi\r\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:  # a zombie is not alive
        return f.read().split(b") ", 1)[1][:1] != b"Z"


class WorkerTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self):
        server = yield start_twistd(self, settings=SETTINGS, users=[USER])
        yield self.worker_ready(server, 1)
        return server

    @defer.inlineCallbacks
    def worker_ready(self, server, times: int):
        yield until(lambda: server.log.count(b"popgate worker 1 ready") >= times,
                       "the worker")
        return self.worker_pid(server)

    def worker_pid(self, server) -> int:
        return int(_STARTED.findall(server.log)[-1])

    def delivered_by(self, server) -> set[str]:
        return {re.search(r"P(\d+)Q", os.path.basename(path)).group(1)
                for path in server.messages(USER[0])}

    @defer.inlineCallbacks
    def test_both_processes_accept_and_deliver_into_one_log(self):
        server = yield self.start()
        worker = self.worker_pid(server)
        yield threads.deferToThread(send_many, server.port("SMTP"), 60)
        self.assertEqual(len(server.messages(USER[0])), 60)
        self.assertEqual(self.delivered_by(server), {str(server.pid), str(worker)},
                         "both processes took connections")
        yield until(lambda: server.log.count(b" closed (quit)") >= 60, "the log lines")
        self.assertEqual(server.log.count(b" delivered "), 60, server.log.decode())
        self.assertNotIn(b"Traceback", server.log)

    @defer.inlineCallbacks
    def test_a_worker_that_dies_is_replaced(self):
        server = yield self.start()
        os.kill(self.worker_pid(server), signal.SIGKILL)
        replacement = yield self.worker_ready(server, 2)
        self.assertIn(b"popgate worker 1 ended (signal 9); another starts in 1 s",
                      server.log)
        self.assertTrue(alive(replacement))
        yield threads.deferToThread(send_many, server.port("SMTP"), 20)
        self.assertEqual(len(server.messages(USER[0])), 20)

    @defer.inlineCallbacks
    def test_a_worker_stopping_leaves_the_lmtp_socket_to_the_main_process(self):
        path = os.path.join(short_directory(self), "lmtp")
        server = yield start_twistd(self, users=[USER], settings={
            "server": {"workers": 2}, "smtp": {"lmtp_listen": [f"unix:{path}"]}})
        yield self.worker_ready(server, 1)
        os.kill(self.worker_pid(server), signal.SIGTERM)
        yield self.worker_ready(server, 2)
        self.assertIn(b"popgate worker 1 ended (exit status 0)", server.log)
        yield threads.deferToThread(send_lmtp, path)
        self.assertEqual(len(server.messages(USER[0])), 1)

    @defer.inlineCallbacks
    def test_sighup_reaches_the_worker(self):
        server = yield self.start()
        os.kill(server.pid, signal.SIGHUP)
        yield until(lambda: server.log.count(b"SIGHUP: 1 users read from") == 2,
                       "both processes' reload lines")

    @defer.inlineCallbacks
    def test_sigterm_stops_the_worker_too(self):
        server = yield self.start()
        worker = self.worker_pid(server)
        os.kill(server.pid, signal.SIGTERM)
        yield server.process.ended
        self.assertIn(b"Server Shut Down.", server.log)
        self.assertFalse(alive(worker))
        self.assertNotIn(b"ended (", server.log, "a stopping worker is not restarted")

    @defer.inlineCallbacks
    def test_kill_9_of_the_main_process_frees_the_port(self):
        server = yield self.start()
        worker = self.worker_pid(server)
        port = server.port("SMTP")
        os.kill(server.pid, signal.SIGKILL)
        yield server.process.ended
        yield until(lambda: not alive(worker), "the worker to die with its parent", 5)
        with socket.create_server(("127.0.0.1", port)):
            pass  # nobody holds the port: a restart can listen on it
