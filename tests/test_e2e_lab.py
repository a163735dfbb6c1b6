"""End to end, the teaching lab's views of a real ``twistd -n popgate``: the protocol
trace and the JSON log, the metrics, the dashboard's JSON; and, above all, that no
secret reaches any of them, whatever path a login takes.

The server runs with ``[log] trace = true`` and ``format = "json"``, ``[metrics]`` and
``[web]`` on port 0 of 127.0.0.1 and APOP on.  The clients are Python's smtplib, poplib
and raw sockets, run in threads (the reactor keeps reading the server's log).
"""

from __future__ import annotations

import base64
import json
import poplib
import re
import smtplib
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.harness import deferred_sleep, read, start_twistd

USER, SECRET = "alice@example.org", "Sup3r-Secret-Pa55"
WRONG = "Wr0ng-Secret-Guess"
CLOSED = "Dropped-Conn-Secret"
TIMEOUT = 30
LOCAL = "tcp:0:interface=127.0.0.1"
SETTINGS = {"log": {"trace": True, "format": "json"}, "metrics": {"listen": [LOCAL]},
            "web": {"listen": [LOCAL]}, "pop3": {"apop": True},
            "limits": {"auth_delay": 0.1, "auth_delay_max": 0.2}}


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def secrets_forms() -> list[str]:
    """Every form a secret took on the wire in these tests."""
    forms = []
    for secret in (SECRET, WRONG, CLOSED):
        forms += [secret, plain(USER, secret), base64.b64encode(secret.encode()).decode()]
    return forms


MESSAGE = b"From: teacher@example.net\r\nTo: alice@example.org\r\nSubject: lab\r\n\r\nHello.\r\n"


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as r:
        return r.read().decode("utf-8")


class LabEndToEndTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield start_twistd(self, SETTINGS, users=[(USER, SECRET)])
        self.pop3 = self.server.port("POP3")
        self.smtp = self.server.port("SMTP")

    def pop3_client(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.pop3, timeout=TIMEOUT)

    def every_login_path(self) -> dict:
        """SMTP delivery, then POP3 logins by USER/PASS (right and wrong), AUTH PLAIN
        with an initial response and with a continuation, APOP, and USER/PASS sent on a
        connection that closes before the answer.  Blocking: run in a thread."""
        seen = {}
        with smtplib.SMTP("127.0.0.1", self.smtp, timeout=TIMEOUT) as smtp:
            smtp.sendmail("teacher@example.net", [USER], MESSAGE)
            # popgate has no SMTP AUTH: the command is refused, its argument masked.
            seen["smtp auth"] = smtp.docmd("AUTH", "PLAIN " + plain(USER, SECRET))
        client = self.pop3_client()
        client.user(USER)
        try:
            client.pass_(WRONG)
        except poplib.error_proto as e:
            seen["wrong"] = e.args[0]
        client.quit()
        client = self.pop3_client()
        client.user(USER)
        client.pass_(SECRET)
        seen["stat"] = client.stat()
        client.retr(1)
        client.dele(1)
        client.rset()
        client.quit()
        client = self.pop3_client()
        seen["plain initial"] = client._shortcmd("AUTH PLAIN " + plain(USER, SECRET))
        client.quit()
        client = self.pop3_client()
        seen["challenge"] = client._shortcmd("AUTH PLAIN")
        seen["plain continued"] = client._shortcmd(plain(USER, SECRET))
        client.quit()
        client = self.pop3_client()
        seen["apop"] = client.apop(USER, SECRET)
        client.quit()
        with socket.create_connection(("127.0.0.1", self.pop3), timeout=TIMEOUT) as sock:
            sock.recv(512)
            sock.sendall(f"USER {USER}\r\nPASS {CLOSED}\r\n".encode())
        return seen

    @defer.inlineCallbacks
    def views(self) -> defer.Deferred:
        """The log so far, /api/sessions, /api/mailboxes and /metrics."""
        yield deferred_sleep(0.5)  # the closed login, the QUITs
        web, metrics = self.server.port("web"), self.server.port("metrics")
        pages = yield threads.deferToThread(lambda: {
            "sessions": http_get(web, "/api/sessions"),
            "mailboxes": http_get(web, "/api/mailboxes"),
            "metrics": http_get(metrics, "/metrics"),
            "web metrics": http_get(web, "/metrics")})
        pages["log"] = self.server.log.decode("utf-8", "replace")
        return pages

    @defer.inlineCallbacks
    def test_no_secret_reaches_trace_logs_dashboard_or_metrics(self):
        seen = yield threads.deferToThread(self.every_login_path)
        self.assertTrue(seen["wrong"].startswith(b"-ERR [AUTH]"), seen)
        self.assertEqual(seen["stat"][0], 1)
        self.assertTrue(seen["plain initial"].startswith(b"+OK"), seen)
        self.assertTrue(seen["challenge"].startswith(b"+"), seen)
        self.assertTrue(seen["plain continued"].startswith(b"+OK"), seen)
        self.assertTrue(seen["apop"].startswith(b"+OK"), seen)
        pages = yield self.views()
        apop_digests = re.findall(r"APOP \S+ ([0-9a-f]{32})", pages["log"])
        self.assertEqual(apop_digests, [])
        for name, text in pages.items():
            for form in secrets_forms():
                self.assertNotIn(form, text, f"a secret in {name}")
        # The trace did see those commands, masked.
        trace = [json.loads(line)["text"] for line in pages["log"].splitlines()
                 if '"direction"' in line]
        self.assertIn("C: PASS ********", "\n".join(trace))
        self.assertIn("C: AUTH PLAIN ********", "\n".join(trace))
        self.assertRegex("\n".join(trace), r"C: APOP alice@example.org \*{8}")

    @defer.inlineCallbacks
    def test_metrics_after_scripted_sessions(self):
        yield threads.deferToThread(self.every_login_path)
        pages = yield self.views()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(pages["metrics"])
                   for s in family.samples}

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))))

        self.assertEqual(value("popgate_sessions_total", protocol="SMTP"), 1)
        self.assertEqual(value("popgate_sessions_total", protocol="POP3"), 6)
        self.assertEqual(value("popgate_sessions_open", protocol="POP3"), 0)
        self.assertEqual(value("popgate_messages_delivered_total", protocol="SMTP"), 1)
        self.assertEqual(value("popgate_logins_total", protocol="POP3", result="ok"), 4)
        self.assertGreaterEqual(value("popgate_logins_total", protocol="POP3",
                                      result="failed"), 1)
        self.assertEqual(value("popgate_pop3_commands_total", command="RETR"), 1)
        self.assertEqual(value("popgate_pop3_commands_total", command="DELE"), 1)
        self.assertEqual(value("popgate_refusals_total", protocol="SMTP", reason="500 5.5.2"),
                         1)  # AUTH: popgate has none
        self.assertEqual(value("popgate_mailbox_messages", user=USER), 1)
        self.assertEqual(value("popgate_auth_queue_length"), 0)

    @defer.inlineCallbacks
    def test_json_log_lines(self):
        yield threads.deferToThread(self.every_login_path)
        pages = yield self.views()
        events = [json.loads(line) for line in pages["log"].splitlines() if line.strip()]
        texts = [event["text"] for event in events]
        self.assertTrue(any("popgate ready" in text for text in texts))
        (delivered,) = [e for e in events if e.get("action") == "delivered"]
        self.assertEqual(delivered["users"], [USER])
        (stored,) = [read(path) for path in self.server.messages(USER)]
        listed = len(stored) + stored.count(b"\n")  # what LIST reports: CRLF line ends
        self.assertEqual((delivered["octets"], delivered["list_octets"]),
                         (len(stored), listed))
        self.assertIn(f"({len(stored)} octets stored, {listed} as LIST reports them)",
                      delivered["text"])
        self.assertRegex(delivered["client"], r"^127\.0\.0\.1:\d+$")
        (ended,) = [e for e in events if e.get("kind") == "closed" and e.get("retrieved")]
        self.assertRegex(ended["text"], rf"user={USER} retr=1/{delivered['list_octets']} "
                                        r"del=0/0 plaintext \d+\.\d s$")
        trace = [e for e in events if e.get("direction") == "C" and e["line"] == "STAT"]
        self.assertEqual(len(trace), 1)
        self.assertEqual(trace[0]["protocol"], "POP3")
        self.assertRegex(trace[0]["client"], r"^127\.0\.0\.1:\d+$")
        self.assertRegex(trace[0]["session"], r"^\w+$")
