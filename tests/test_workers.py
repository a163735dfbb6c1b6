"""Worker processes (popgate.workers), in this process: a worker's service on a socket
it inherited, the shares of the connection caps, and its log lines in the main log.
The processes themselves are tested end to end in test_e2e_workers."""

import os
import socket

from twisted.internet import defer, reactor, threads
from twisted.logger import LogLevel, capturedLogs, eventAsJSON, formatEvent
from twisted.trial import unittest

from popgate import config as configuration
from popgate.auth.users import UserFile, hash_password
from popgate.limits import parse_networks
from popgate.service import AdoptedListener, ListenerService, _limiter, makeWorkerService
from popgate.workers.pool import WorkerProtocol, shared_listeners, worker_arguments


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
        sockets = {("SMTP", description): os.dup(listening.fileno()),
                   ("LMTP", "unix:/never/configured"): os.dup(listening.fileno())}
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
    def test_only_smtp_family_listeners_without_proxy_headers(self):
        from twisted.internet import protocol

        services = []
        for label, description in [("SMTP", "tcp:0:interface=127.0.0.1"),
                                   ("LMTP", "tcp:0:interface=127.0.0.1"),
                                   ("POP3", "tcp:0:interface=127.0.0.1"),
                                   ("SUBMISSION", "tcp:0:interface=127.0.0.1")]:
            service = ListenerService(reactor, description, protocol.Factory(), label)
            service.startService()
            self.addCleanup(service.stopService)
            services.append(service)
        proxied = ListenerService(reactor, "haproxy:tcp:0:interface=127.0.0.1",
                                  protocol.Factory(), "SMTP")
        proxied.port = services[0].port  # never bound: only its description matters
        shared = shared_listeners([*services, proxied])
        self.assertEqual([s.label for s in shared], ["SMTP", "LMTP"])
        args = worker_arguments(1, 4242, shared)
        self.assertEqual(args[1:], ["-m", "popgate.workers", "--number", "1",
                                    "--parent", "4242",
                                    "--socket", "3:SMTP:tcp:0:interface=127.0.0.1",
                                    "--socket", "4:LMTP:tcp:0:interface=127.0.0.1"])


class LogRelayTests(unittest.TestCase):
    def test_worker_events_reach_the_main_log_as_they_were(self):
        event = {"log_format": "SMTP [{session}] {peer} closed (quit)", "session": "AB12",
                 "peer": "192.0.2.1:4000", "log_namespace": "popgate.session",
                 "log_level": LogLevel.info, "log_time": 1e9}
        line = eventAsJSON(event).encode() + b"\n"
        worker = WorkerProtocol(pool=None, number=1)
        with capturedLogs() as events:
            worker.childDataReceived(1, line[:20])  # in pieces, as a pipe delivers
            worker.childDataReceived(1, line[20:] + b"not json\n")
        self.assertEqual([formatEvent(e) for e in events],
                         ["SMTP [AB12] 192.0.2.1:4000 closed (quit)",
                          "worker 1: not json"])
        self.assertEqual(events[0]["log_namespace"], "popgate.session")
        self.assertEqual(events[0]["log_level"], LogLevel.info)
        self.assertEqual(events[0]["log_time"], 1e9)
