"""End to end: popgate under attack keeps serving honest users (issue 6).

A real ``twistd -n popgate`` process; hostile and honest clients are plain blocking
sockets run in threads, so the test's reactor keeps reading the server's log.  The honest
client connects from 127.0.0.2, a different address from the attacker's 127.0.0.1 (Linux
routes all of 127.0.0.0/8 to the loopback interface).
"""

from __future__ import annotations

import itertools
import poplib
import smtplib
import socket
import threading
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.harness import start_twistd

HONEST = ("127.0.0.2", 0)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def honest_login(port: int, user: str, password: str) -> float:
    """Seconds from connect to the +OK of PASS, from the honest address."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=HONEST) as s:
        stream = s.makefile("rb")
        assert stream.readline().startswith(b"+OK")
        s.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        assert stream.readline().startswith(b"+OK")
        reply = stream.readline()
        elapsed = time.monotonic() - started
        assert reply.startswith(b"+OK"), reply
        s.sendall(b"QUIT\r\n")
        return elapsed


class PasswordGuessingTests(TestCase):
    timeout = 120
    ATTACKERS = 20
    DURATION = 8.0

    @defer.inlineCallbacks
    def test_guessing_is_slowed_while_others_log_in(self):
        server = yield start_twistd(self)
        # The default scheme: every verification costs real CPU, as in production.
        server.add_user("alice@example.org", "right", scheme="ARGON2ID")
        server.add_user("bob@example.org", "bobs-password", scheme="ARGON2ID")
        port = server.port("POP3")
        answered, honest = yield threads.deferToThread(self.attack_and_login, port)
        rate = len(answered) / self.DURATION
        print(f"\n  {len(answered)} wrong passwords answered in {self.DURATION:.0f} s "
              f"({rate:.1f}/s) from {self.ATTACKERS} parallel connections; "
              f"honest login from another address took {honest * 1000:.0f} ms")
        self.assertTrue(answered, "the attacker got no answer at all")
        self.assertTrue(all(line.startswith(b"-ERR [AUTH]") for line in answered))
        self.assertLessEqual(rate, 5.0)
        self.assertLess(honest, 1.0)

    @defer.inlineCallbacks
    def test_hit_and_run_guessing_does_not_starve_logins(self):
        """Guessers that hang up without waiting for the answer must not keep the
        password-hashing threads busy: a penalised address's attempts wait first."""
        server = yield start_twistd(self)
        server.add_user("alice@example.org", "right", scheme="ARGON2ID")
        server.add_user("bob@example.org", "bobs-password", scheme="ARGON2ID")
        port = server.port("POP3")
        _, honest = yield threads.deferToThread(self.attack_and_login, port, self.hit_and_run)
        print(f"\n  honest login beside hit-and-run guessers took {honest * 1000:.0f} ms")
        self.assertLess(honest, 1.0)

    def attack_and_login(self, port: int, attacker=None) -> tuple[list[bytes], float]:
        stop = threading.Event()
        answered: list[bytes] = []
        guesses = itertools.count()  # at most 1,000 wrong passwords in all
        attacker = attacker or self.guess
        workers = [threading.Thread(target=attacker, args=(port, stop, answered, guesses))
                   for _ in range(self.ATTACKERS)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(self.DURATION / 2)
            honest = honest_login(port, "bob@example.org", "bobs-password")
            time.sleep(self.DURATION / 2)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        return answered, honest

    @staticmethod
    def guess(port: int, stop: threading.Event, answered: list, guesses) -> None:
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                lines = LineReader(s, stop)
                lines.read()  # greeting
                while not stop.is_set():
                    n = next(guesses)
                    if n >= 1000:
                        return
                    s.sendall(b"USER alice@example.org\r\nPASS guess-%d\r\n" % n)
                    lines.read()  # +OK for USER
                    reply = lines.read()  # held back by the penalty
                    if not reply:
                        break  # closed after too many failures (or stopping): reconnect
                    answered.append(reply)


    @staticmethod
    def hit_and_run(port: int, stop: threading.Event, answered: list, guesses) -> None:
        while not stop.is_set() and next(guesses) < 1000:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.recv(512)
                s.sendall(b"USER alice@example.org\r\nPASS hit-and-run\r\n")
                s.recv(512)
            time.sleep(0.05)


class LineReader:
    """Lines from a socket with a short timeout, giving up (b"") once ``stop`` is set."""

    def __init__(self, s: socket.socket, stop: threading.Event):
        self._socket, self._stop, self._buffer = s, stop, b""

    def read(self) -> bytes:
        while b"\n" not in self._buffer:
            if self._stop.is_set():
                return b""
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return b""
            if not data:
                return b""
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"


class SlowClientTests(TestCase):
    timeout = 120
    TRICKLERS = 200

    @defer.inlineCallbacks
    def test_tricklers_are_cut_off_and_honest_clients_served(self):
        server = yield start_twistd(self, users=[("alice@example.org", "pw")], settings={
            "smtp": {"command_timeout": 3.0}, "pop3": {"auth_timeout": 3.0}})
        smtp_port, pop3_port = server.port("SMTP"), server.port("POP3")
        result = yield threads.deferToThread(self.trickle_and_deliver, smtp_port, pop3_port)
        elapsed, message, closed_after = result
        print(f"\n  delivery + RETR took {elapsed * 1000:.0f} ms beside {self.TRICKLERS} "
              f"trickling connections; all of those were closed after {closed_after:.1f} s")
        self.assertLess(elapsed, 2.0)
        self.assertIn(b"Subject: honest", message)
        self.assertLess(closed_after, 8.0)

    def trickle_and_deliver(self, smtp_port: int, pop3_port: int):
        sockets = []
        for i in range(self.TRICKLERS):
            port = smtp_port if i % 2 else pop3_port
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            sockets.append(s)
        started = time.monotonic()
        try:
            self.trickle(sockets, until=started + 1.0)
            t0 = time.monotonic()
            message = self.deliver_and_fetch(smtp_port, pop3_port)
            elapsed = time.monotonic() - t0
            open_sockets = list(sockets)
            while open_sockets and time.monotonic() - started < 10:
                open_sockets = self.trickle(open_sockets, until=time.monotonic() + 0.5)
            self.assertEqual(open_sockets, [], "trickling connections were never closed")
            return elapsed, message, time.monotonic() - started
        finally:
            for s in sockets:
                s.close()

    @staticmethod
    def trickle(sockets: list[socket.socket], until: float) -> list[socket.socket]:
        """Send one byte (never a line end) on each socket; return those still open."""
        still_open = sockets
        while time.monotonic() < until:
            still_open = [s for s in still_open if SlowClientTests.poke(s)]
            time.sleep(0.2)
        return still_open

    @staticmethod
    def poke(s: socket.socket) -> bool:
        try:
            while s.recv(4096):
                pass  # greetings and the final timeout reply
            return False  # EOF: the server closed it
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            s.send(b"N")
        except OSError:
            return False
        return True

    @staticmethod
    def deliver_and_fetch(smtp_port: int, pop3_port: int) -> bytes:
        with smtplib.SMTP("127.0.0.1", smtp_port, source_address=HONEST, timeout=10) as smtp:
            smtp.sendmail("me@remote.example", ["alice@example.org"],
                          b"Subject: honest\r\n\r\nserved while under attack\r\n")
        pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        try:
            pop.user("alice@example.org")
            pop.pass_("pw")
            _, lines, _ = pop.retr(1)
            return b"\r\n".join(lines)
        finally:
            pop.quit()


class IdleMemoryTests(TestCase):
    timeout = 120
    CONNECTIONS = 1000

    @defer.inlineCallbacks
    def test_idle_connections_are_cheap(self):
        server = yield start_twistd(self, settings={"limits": {"max_sessions": 2000}})
        ports = [server.port("SMTP"), server.port("POP3")]
        per_connection = yield threads.deferToThread(self.hold_idle, server.pid, ports)
        print(f"\n  server memory per idle connection: {per_connection:.2f} KiB "
              f"({self.CONNECTIONS} connections, half SMTP, half POP3)")
        self.assertLess(per_connection, 10.0)

    def hold_idle(self, pid: int, ports: list[int]) -> float:
        before = rss_kib(pid)
        sockets = []
        try:
            for i in range(self.CONNECTIONS):
                s = socket.create_connection(("127.0.0.1", ports[i % 2]), timeout=10)
                sockets.append(s)
            for s in sockets:
                assert s.recv(512), "no greeting"
            time.sleep(0.5)
            return (rss_kib(pid) - before) / self.CONNECTIONS
        finally:
            for s in sockets:
                s.close()
