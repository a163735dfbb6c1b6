"""Worker processes (popgate.workers), in this process: a worker's service on a socket
it inherited, the shares of the connection caps, and its log lines in the main log.
The processes themselves are tested end to end in test_e2e_workers."""

import dataclasses
import io
import os
import socket
import subprocess
import sys

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, eventAsJSON, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from popgate import config as configuration
from popgate.auth.users import UserFile, hash_password
from popgate.limits import parse_networks
from popgate.service import ListenerService, _limiter, makeWorkerService
from popgate.workers.logpipe import MAX_LINE, LinePublisher, json_lines_observer
from popgate.workers.pool import FIRST_FD, shared_listeners, worker_arguments
from popgate.workers.sockets import AdoptedListener, accept_one_at_a_time
from tests.harness import child_env, short_directory


def smtp_exchange(port: int) -> list[bytes]:
    """Greeting, EHLO, QUIT: the first line of each reply (blocking: in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        reader = s.makefile("rb")
        lines = [reader.readline()]
        s.sendall(b"EHLO client.test\r\n")
        line = reader.readline()
        lines.append(line)
        while line[3:4] == b"-":
            line = reader.readline()
        s.sendall(b"QUIT\r\n")
        lines.append(reader.readline())
        return lines


class WorkerServiceTests(unittest.TestCase):
    def config(self, **overrides):
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        UserFile(os.path.join(data_dir, "users")).add("alice@example.org",
                                                    hash_password("pw", "PLAIN"))
        return configuration.load(None, {"server.data_dir": data_dir,
                                         "server.hostname": "mx.test", **overrides})

    @defer.inlineCallbacks
    def test_serves_smtp_on_an_inherited_socket(self):
        """The main process keeps its socket; the worker accepts on a copy of it."""
        listening = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        description = "tcp:0:interface=127.0.0.1"
        config = self.config(**{"server.workers": 2, "smtp.listen": [description]})
        # A socket for a listener the configuration does not have is not served.
        unconfigured = os.dup(listening.fileno())
        self.addCleanup(os.close, unconfigured)  # the worker's main closes those
        sockets = {("SMTP", description): os.dup(listening.fileno()),
                   ("LMTP", "unix:/never/configured"): unconfigured}
        service = makeWorkerService(config, reactor, sockets, 1)
        with capturedLogs() as events:
            service.startService()
            lines = yield threads.deferToThread(smtp_exchange, port)
            yield service.stopService()
        self.assertEqual(lines, [b"220 mx.test ESMTP popgate\r\n",
                                 b"250-mx.test\r\n", b"221 2.0.0 Bye\r\n"])
        self.assertEqual([s.label for s in service if isinstance(s, AdoptedListener)],
                         ["SMTP"], "only the sockets of configured listeners are served")
        texts = [formatEvent(e) for e in events]
        self.assertIn("popgate worker 1 ready", texts)
        self.assertTrue(any(" closed (quit)" in t for t in texts), texts)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # still listening: the socket was the main process's all along

    def test_each_process_gets_its_share_of_the_caps(self):
        config = configuration.load(None, {"limits.max_sessions": 1001,
                                           "limits.max_sessions_per_ip": 20})
        trusted = parse_networks(())
        for share, (total, per_ip) in {1: (1001, 20), 2: (501, 10), 3: (334, 7)}.items():
            limiter = _limiter(config, trusted, share)
            self.assertEqual((limiter.max_total, limiter.max_per_ip), (total, per_ip), share)


class SharedSocketTests(unittest.TestCase):
    def test_only_smtp_and_lmtp_listeners(self):
        services = []
        for label, description in [("SMTP", "tcp:0:interface=127.0.0.1"),
                                   ("LMTP", "tcp:0:interface=127.0.0.1"),
                                   ("POP3", "tcp:0:interface=127.0.0.1"),
                                   ("SUBMISSION", "tcp:0:interface=127.0.0.1")]:
            service = ListenerService(reactor, description, protocol.Factory(), label)
            service.startService()
            self.addCleanup(service.stopService)
            services.append(service)
        shared = shared_listeners(services)
        self.assertEqual([s.label for s in shared], ["SMTP", "LMTP"])
        args = worker_arguments(1, 4242, dict(enumerate(shared, FIRST_FD)))
        self.assertEqual(args[1:], ["-m", "popgate.workers", "--number", "1",
                                    "--parent", "4242",
                                    "--socket", "3:SMTP:tcp:0:interface=127.0.0.1",
                                    "--socket", "4:LMTP:tcp:0:interface=127.0.0.1"])


class Held(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class Hello(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\r\n")
        self.transport.loseConnection()


def unix_greeting(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(path)
        return client.makefile("rb").readline()


class SharedUNIXSocketTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_worker_leaves_the_socket_its_file_and_mode_alone(self):
        """The main process owns them: a worker must not reset the file's mode to
        Twisted's default 0666, and stopping must neither shut the socket down (every
        process would stop accepting) nor remove the file (LMTP clients: ENOENT)."""
        path = os.path.join(short_directory(self), "lmtp")  # AF_UNIX paths are short
        main = ListenerService(reactor, f"unix:{path}:mode=660",
                               protocol.Factory.forProtocol(Hello), "LMTP")
        main.startService()
        self.addCleanup(main.stopService)
        worker = AdoptedListener(reactor, os.dup(main.port.fileno()),
                                 protocol.Factory.forProtocol(Hello), "LMTP")
        worker.startService()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        yield threads.deferToThread(unix_greeting, path)  # accepted by one of the two
        yield worker.stopService()
        self.assertTrue(os.path.exists(path), "the worker removed the main's socket file")
        accepted = threads.deferToThread(unix_greeting, path)
        self.assertEqual((yield accepted), b"hello\r\n", "the main process still accepts")


class AcceptTests(unittest.TestCase):
    def test_a_shared_port_accepts_one_connection_per_wake_up(self):
        """So that the other processes woken for the same connections get some."""
        held: list[Held] = []

        class Counting(protocol.Factory):
            def buildProtocol(self, addr):
                held.append(Held())
                return held[-1]

        service = ListenerService(reactor, "tcp:0:interface=127.0.0.1", Counting(), "SMTP")
        service.startService()
        port = service.port
        port.stopReading()  # the test, not the reactor, says when to accept
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port))
                   for _ in range(3)]
        accept_one_at_a_time(port)
        port.doRead()
        self.assertEqual(len(held), 1)
        port.doRead()
        port.doRead()
        self.assertEqual(len(held), 3)
        for client in clients:
            client.close()
        for server in held:
            server.transport.abortConnection()
        return defer.gatherResults([h.lost for h in held] + [service.stopService()])


class LogRelayTests(unittest.TestCase):
    def lines(self, *chunks: bytes) -> list[str]:
        publisher = LinePublisher(1)
        with capturedLogs() as events:
            for chunk in chunks:
                publisher.feed(chunk)
        self.events = events
        return [formatEvent(e) for e in events]

    def test_worker_events_reach_the_main_log_as_they_were(self):
        event = {"log_format": "SMTP [{session}] {peer} closed (quit)", "session": "AB12",
                 "peer": "192.0.2.1:4000", "log_namespace": "popgate.session",
                 "log_level": LogLevel.info, "log_time": 1e9}
        line = eventAsJSON(event).encode() + b"\n"
        # In pieces, as a pipe delivers them; lines that are not events are kept as text.
        self.assertEqual(self.lines(line[:20], line[20:] + b"not json\n1\nnull\n\xff{\0\n"),
                         ["SMTP [AB12] 192.0.2.1:4000 closed (quit)",
                          "popgate worker 1: not json", "popgate worker 1: 1",
                          "popgate worker 1: null", "popgate worker 1: \ufffd{\0"])
        self.assertEqual(self.events[0]["log_namespace"], "popgate.session")
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)
        self.assertEqual(self.events[0]["log_time"], 1e9)

    def test_a_line_too_long_is_dropped_whole(self):
        ok = eventAsJSON({"log_format": "after", "log_level": LogLevel.info,
                          "log_time": 1e9}).encode()
        huge = b"x" * (MAX_LINE + 1)
        self.assertEqual(self.lines(huge, b"y" * 10, b"rest of it\n" + ok + b"\n"),
                         [f"popgate worker 1: a log line over {MAX_LINE} octets was dropped",
                          "after"])

    def test_a_failure_arrives_with_its_traceback(self):
        written = io.StringIO()
        observe = json_lines_observer(written)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            observe({"log_format": "commit of {id} failed", "id": "Q1", "log_time": 1e9,
                     "log_level": LogLevel.critical, "log_failure": Failure()})
        text = self.lines(written.getvalue().encode())[0]
        self.assertTrue(text.startswith("commit of Q1 failed\nTraceback"), text)
        self.assertIn("ZeroDivisionError: division by zero", text)


class FakeProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.written = b""
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class SpawningClock(Clock):
    """A clock whose spawnProcess records the child and connects its protocol."""

    def __init__(self):
        super().__init__()
        self.spawned: list[tuple[object, FakeProcess, list[str], dict]] = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        process = FakeProcess(1000 + len(self.spawned))
        proto.makeConnection(process)
        self.spawned.append((proto, process, args, childFDs))
        return process


class FakeListener:
    def __init__(self, label: str, description: str, fd: int):
        self.label, self.description = label, description
        self.port = FakePort(fd)


class FakePort:
    def __init__(self, fd: int):
        self._fd = fd
        self.numberAccepts = 100

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        pass


def ended(signal_number=None, status=0):
    from twisted.internet import error
    from twisted.python.failure import Failure

    if signal_number or status:
        return Failure(error.ProcessTerminated(status or None, signal_number))
    return Failure(error.ProcessDone(0))


class WorkerPoolTests(unittest.TestCase):
    def pool(self, workers=3, drain_timeout=5.0):
        from popgate.workers.pool import WorkerPool

        clock = SpawningClock()
        config = configuration.load(None, {"server.workers": workers,
                                           "server.drain_timeout": drain_timeout,
                                           "web.token": "s3cret-token"})
        listeners = [FakeListener("SMTP", "tcp:25", 7), FakeListener("POP3", "tcp:110", 8)]
        pool = WorkerPool(clock, config, listeners)
        with capturedLogs() as events:
            pool.startService()
        return clock, pool, config, events

    def test_starts_the_workers_with_the_sockets_and_the_configuration(self):
        clock, pool, config, events = self.pool(workers=3)
        self.assertEqual(len(clock.spawned), 2)
        for number, (_, process, args, fds) in enumerate(clock.spawned, 1):
            self.assertEqual(args[1:7], ["-m", "popgate.workers", "--number", str(number),
                                         "--parent", str(os.getpid())])
            self.assertEqual(args[7:], ["--socket", "3:SMTP:tcp:25"], "POP3 stays here")
            self.assertEqual(fds, {0: "w", 1: "r", 2: 2, 3: 7})
            self.assertEqual(configuration.loads(process.written.decode(), "w"),
                             dataclasses.replace(config, source="w",
                                                 web=configuration.WebConfig()))
            self.assertNotIn(b"s3cret-token", process.written, "workers serve no dashboard")
            self.assertTrue(process.stdin_closed)
        self.assertEqual([formatEvent(e) for e in events],
                         ["popgate worker 1 started (pid 1000)",
                          "popgate worker 2 started (pid 1001)"])

    def test_a_worker_that_ends_is_started_again_later_and_later(self):
        clock, pool, _, _ = self.pool(workers=2)
        lines = []
        with capturedLogs() as events:
            for _ in range(3):  # each fails at once: 1 s, 2 s, 4 s
                proto = clock.spawned[-1][0]
                proto.processEnded(ended(status=1))
                delay = clock.getDelayedCalls()[0].getTime() - clock.seconds()
                clock.advance(delay)
                lines.append(delay)
            clock.advance(60)  # this one ran for a minute: back to 1 s
            clock.spawned[-1][0].processEnded(ended(signal_number=9))
            lines.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        self.assertEqual(lines, [1.0, 2.0, 4.0, 1.0])
        texts = [formatEvent(e) for e in events]
        self.assertIn("popgate worker 1 ended (exit status 1); another starts in 2 s", texts)
        self.assertIn("popgate worker 1 ended (signal 9); another starts in 1 s", texts)

    def test_reload_and_stop_signal_every_worker(self):
        clock, pool, _, _ = self.pool(workers=3, drain_timeout=2.0)
        processes = [process for _, process, _, _ in clock.spawned]
        pool.reload()
        done = pool.stopService()
        self.assertEqual([p.signals for p in processes], [["HUP", "TERM"]] * 2)
        clock.spawned[0][0].processEnded(ended(status=0))
        self.assertNoResult(done)
        clock.advance(7)  # the drain timeout and 5 s: the last one is killed
        self.assertEqual(processes[1].signals, ["HUP", "TERM", "KILL"])
        clock.spawned[1][0].processEnded(ended(signal_number=9))
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [], "no restart while stopping")
        self.assertEqual(len(clock.spawned), 2)


class WorkerStartTests(unittest.TestCase):
    def test_a_worker_that_cannot_start_says_why_in_the_log_and_exits_1(self):
        done = subprocess.run(
            [sys.executable, "-m", "popgate.workers", "--number", "3",
             "--parent", str(os.getpid())],
            input=b"[server", capture_output=True, timeout=60, env=child_env())
        self.assertEqual(done.returncode, 1, done.stderr)
        publisher = LinePublisher(3)
        with capturedLogs() as events:
            publisher.feed(done.stdout)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertTrue(text.startswith("popgate worker 3 cannot start\nTraceback"), text)
        self.assertIn("worker 3: TOML syntax error", text)
