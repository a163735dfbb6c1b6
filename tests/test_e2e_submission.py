"""End to end: submission with real clients, relay to a real Postfix, refusals, a crash.

A real ``twistd -n popgate`` with a test CA's certificate for ``localhost``, a STARTTLS
submission listener, an implicit-TLS one and (for the off-loopback policy) a
``haproxy:`` one whose PROXY header names 203.0.113.9; all traffic stays on loopback.

- swaks ``--auth PLAIN`` and ``--auth LOGIN`` over STARTTLS and implicit TLS, msmtp with
  AUTH over verified STARTTLS, smtplib ``login()`` over verified implicit TLS;
- a message to a remote address reaches a real Postfix (benchmarks/servers.py's private
  instance) as the smarthost, byte for byte;
- refusals: no AUTH before TLS off loopback, relay without AUTH, a forged sender, the rate
  limit, wrong passwords slowed by the penalty POP3 logins share;
- ``kill -9`` while the queue relays under load: after a restart every accepted message
  reaches the smarthost (the scripted sink) at least once and no queue file is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.certs import make_test_pki
from tests.harness import (
    child_env,
    deferred_sleep,
    read_reply,
    run_client,
    spawn_twistd,
    start_twistd,
    until,
)
from tests.smtpsink import Sink

ALICE, BOB, PASSWORD = "alice@example.org", "bob@example.org", "pw"
USERS = [(ALICE, PASSWORD), (BOB, PASSWORD)]
TIMEOUT = 60


def stored(server, user) -> list[bytes]:
    messages = []
    for path in server.messages(user):
        with open(path, "rb") as f:
            messages.append(f.read())
    return messages


def sleep(seconds: float) -> defer.Deferred:
    return deferred_sleep(seconds)


class SubmissionServerCase(TestCase):
    timeout = 120
    extra: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.pki = make_test_pki(os.path.abspath(self.mktemp()), "localhost")
        settings = {
            "tls": {"certificate": self.pki.fullchain, "key": self.pki.key},
            "submission": {"listen": ["tcp:0:interface=127.0.0.1"],
                           "tls_listen": ["tcp:0:interface=127.0.0.1"]},
        }
        for section, table in self.extra.items():
            settings.setdefault(section, {}).update(table)
        self.server = yield start_twistd(self, settings=settings, users=USERS)
        self.port = self.server.port("SUBMISSION")
        self.tls_port = self.server.port("SUBMISSIONS")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.pki.ca)


class RealClientTests(SubmissionServerCase):
    def swaks(self, *args):
        return run_client(["swaks", "--server", "localhost", "--helo", "client.test",
                           "--from", ALICE, "--to", BOB, "--auth-user", ALICE,
                           "--auth-password", PASSWORD, "--header", "Subject: swaks",
                           *args])

    @defer.inlineCallbacks
    def check_swaks(self, mechanism, *tls):
        out, err, code = yield self.swaks("--auth", mechanism, *tls)
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"235 2.7.0 Authentication successful", out)
        [message] = stored(self.server, BOB)
        self.assertIn(b"with ESMTPSA", message)
        self.assertIn(b"Subject: swaks\n", message)
        self.assertNotIn(PASSWORD.encode() + b"\n", self.server.log)

    def test_swaks_plain_over_starttls(self):
        return self.check_swaks("PLAIN", "--port", str(self.port), "-tls")

    def test_swaks_login_over_starttls(self):
        return self.check_swaks("LOGIN", "--port", str(self.port), "-tls")

    def test_swaks_plain_over_implicit_tls(self):
        return self.check_swaks("PLAIN", "--port", str(self.tls_port), "-tlsc")

    def test_swaks_login_over_implicit_tls(self):
        return self.check_swaks("LOGIN", "--port", str(self.tls_port), "-tlsc")

    @defer.inlineCallbacks
    def test_msmtp_with_auth_over_verified_starttls(self):
        message = b"From: alice@example.org\nTo: bob@example.org\nSubject: msmtp\n\n.dot\nok\n"
        out, err, code = yield run_client([
            "msmtp", "--file=/dev/null", "--host=localhost", f"--port={self.port}",
            "--tls=on", "--tls-starttls=on", f"--tls-trust-file={self.pki.ca}",
            "--auth=plain", f"--user={ALICE}", f"--passwordeval=echo {PASSWORD}",
            "--domain=client.test", f"--from={ALICE}", BOB], stdin=message)
        self.assertEqual(code, 0, out + err)
        [message] = stored(self.server, BOB)
        self.assertTrue(message.endswith(b"Subject: msmtp\n\n.dot\nok\n"), message)
        self.assertIn(b"with ESMTPSA", message)

    @defer.inlineCallbacks
    def test_smtplib_login_over_verified_implicit_tls(self):
        def send():
            with smtplib.SMTP_SSL("localhost", self.tls_port, context=self.context(),
                                  timeout=TIMEOUT) as client:
                client.login(ALICE, PASSWORD)
                return client.sendmail(ALICE, [BOB], b"Subject: smtplib\r\n\r\nHi.\r\n")
        refused = yield threads.deferToThread(send)
        self.assertEqual(refused, {})
        [message] = stored(self.server, BOB)
        self.assertTrue(message.endswith(b"Subject: smtplib\n\nHi.\n"))


class RefusalTests(SubmissionServerCase):
    extra = {"submission": {"max_messages_per_hour": 3}}

    def session(self, steps, port=None):
        """smtplib-free: [(command, ...)] -> the replies, for exact refusals."""
        def run():
            with socket.create_connection(("127.0.0.1", port or self.port), TIMEOUT) as s:
                stream = s.makefile("rb")
                replies = [read_reply(stream)]
                for line in steps:
                    s.sendall(line.encode() + b"\r\n")
                    replies.append(read_reply(stream))
                return replies
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_relay_without_auth_and_a_forged_sender(self):
        replies = yield self.session(["EHLO c", "MAIL FROM:<alice@example.org>"])
        self.assertTrue(replies[2].startswith(b"530 5.7.0"), replies)
        out, err, code = yield run_client([
            "swaks", "--server", "127.0.0.1", "--port", str(self.port), "--from", BOB,
            "--to", "someone@remote.example", "--auth", "PLAIN", "--auth-user", ALICE,
            "--auth-password", PASSWORD])
        self.assertNotEqual(code, 0)
        self.assertIn(b"553 5.7.1", out)
        out, err, code = yield run_client([
            "swaks", "--server", "127.0.0.1", "--port", str(self.port), "--from", ALICE,
            "--to", "someone@remote.example", "--auth", "PLAIN", "--auth-user", ALICE,
            "--auth-password", PASSWORD])
        self.assertIn(b"554 5.7.1", out, "relay.mode is none: no relay at all")
        port25 = self.server.port("SMTP")
        replies = yield self.session(["EHLO c", "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHB3"],
                                     port=port25)
        self.assertNotIn(b"AUTH", replies[1])
        self.assertTrue(replies[2].startswith(b"500 5.5.2"), replies)

    @defer.inlineCallbacks
    def test_the_rate_limit(self):
        def send():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
                client.login(ALICE, PASSWORD)
                client.sendmail(ALICE, [BOB, ALICE], b"Subject: 1\r\n\r\n.\r\n")
                client.sendmail(ALICE, [BOB], b"Subject: 2\r\n\r\n.\r\n")
                try:
                    client.sendmail(ALICE, [BOB], b"Subject: 3\r\n\r\n.\r\n")
                except smtplib.SMTPRecipientsRefused as e:
                    return e.recipients
                return None
        refused = yield threads.deferToThread(send)
        self.assertEqual(refused[BOB][0], 450)
        self.assertIn(b"4.7.1", refused[BOB][1])
        self.assertEqual(len(stored(self.server, BOB)), 2)

    @defer.inlineCallbacks
    def test_wrong_passwords_are_slowed_with_the_penalty_pop3_logins_share(self):
        def pop3_failure():
            import poplib
            client = poplib.POP3("127.0.0.1", self.server.port("POP3"), timeout=TIMEOUT)
            client.user(ALICE)
            with contextlib.suppress(poplib.error_proto):
                client.pass_("wrong")
            client.quit()

        def smtp_failure():
            started = time.monotonic()
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
                try:
                    client.login(ALICE, "wrong-too")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, time.monotonic() - started
            return None

        yield threads.deferToThread(pop3_failure)  # 2 s; the address now waits 4 s
        code, took = yield threads.deferToThread(smtp_failure)
        self.assertEqual(code, 535)
        self.assertGreaterEqual(took, 3.9, "the second failure from this address: 4 s")


class OffLoopbackTests(SubmissionServerCase):
    extra = {"submission": {"listen": ["haproxy:tcp:0:interface=127.0.0.1"]},
             "limits": {"trusted_proxies": ["127.0.0.1/32"]}}

    @defer.inlineCallbacks
    def test_no_auth_before_tls(self):
        def run():
            with socket.create_connection(("127.0.0.1", self.port), TIMEOUT) as raw:
                raw.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n")
                plain = raw.makefile("rb")
                read_reply(plain)
                answers = []
                for line in (b"EHLO c", b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHB3",
                             b"MAIL FROM:<alice@example.org>", b"STARTTLS"):
                    raw.sendall(line + b"\r\n")
                    answers.append(read_reply(plain))
                with self.context().wrap_socket(raw, server_hostname="localhost") as tls:
                    stream = tls.makefile("rb")
                    for line in (b"EHLO c", b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHB3"):
                        tls.sendall(line + b"\r\n")
                        answers.append(read_reply(stream))
                return answers
        ehlo, auth, mail, starttls, ehlo_tls, auth_tls = yield threads.deferToThread(run)
        self.assertNotIn(b"AUTH", ehlo)
        self.assertIn(b"STARTTLS", ehlo)
        self.assertTrue(auth.startswith(b"538 5.7.11"), auth)
        self.assertTrue(mail.startswith(b"530 5.7.0"), mail)
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo_tls)
        self.assertTrue(auth_tls.startswith(b"235 2.7.0"), auth_tls)


def postfix_or_skip(root: Path):
    from benchmarks.servers import Options, Postfix

    postfix = Postfix(root, Options())
    missing = postfix.missing()
    if missing:
        if os.environ.get("CI"):
            raise AssertionError(missing)
        raise SkipTest(missing)
    return postfix


class PostfixSmarthostTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_a_remote_message_reaches_postfix_byte_for_byte(self):
        # Postfix's unprivileged processes must traverse the directory (trial's are 0700).
        root = Path(tempfile.mkdtemp(prefix="popgate-postfix-"))
        self.addCleanup(shutil.rmtree, root, True)
        os.chmod(root, 0o755)
        postfix = postfix_or_skip(root)
        postfix.configure(["carol"])
        postfix.prepare_mailbox("carol")
        yield threads.deferToThread(postfix.start)
        self.addCleanup(threads.deferToThread, postfix.stop)
        server = yield start_twistd(self, users=USERS, settings={"relay": {
            "mode": "smarthost", "smarthost": f"127.0.0.1:{postfix.ports['smtp']}",
            "smarthost_tls": "none"}})
        recipient = postfix.address("carol")
        body = (f"From: Alice <alice@example.org>\r\nTo: <{recipient}>\r\nSubject: outbound\r\n"
                "Date: Mon, 07 Dec 2026 01:00:00 +0000\r\nMessage-ID: <e2e.1@example.org>\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n"
                ".a line with a leading dot\r\n..two\r\nGrüße, trailing spaces  \r\n"
                "\tand a tab\r\n").encode()

        def send():
            with smtplib.SMTP("127.0.0.1", server.port("SUBMISSION"), timeout=TIMEOUT) as c:
                c.login(ALICE, PASSWORD)
                c.sendmail(ALICE, [recipient, BOB], body)
        yield threads.deferToThread(send)
        new = postfix.maildir("carol") / "new"
        for _ in range(300):
            if new.is_dir() and list(new.iterdir()):
                break
            yield deferred_sleep(0.1)
        queue = os.path.join(server.data_dir, "queue")
        self.assertTrue(new.is_dir(), "not delivered by Postfix: " + repr(os.listdir(queue))
                        + (root / "postfix.log").read_text(errors="replace")[-3000:])
        [path] = list(new.iterdir())
        delivered = path.read_bytes()
        lf_body = body.replace(b"\r\n", b"\n")
        self.assertTrue(delivered.endswith(lf_body), delivered)
        headers = delivered[:-len(lf_body)].decode().replace("\n\t", " ")
        self.assertRegex(headers, r"Received: from mx\.test .*by bench\.test \(Postfix\)")
        self.assertRegex(headers, r"Received: from \S+ \(unknown \[127\.0\.0\.1\]\) by mx\.test "
                         r"\(popgate\) with ESMTPA id \w+")
        self.assertIn("Return-Path: <alice@example.org>", headers)
        [local] = stored(server, BOB)
        self.assertTrue(local.endswith(lf_body))
        for _ in range(100):
            if not [n for n in os.listdir(queue) if n.endswith((".env", ".msg"))]:
                break
            yield deferred_sleep(0.1)
        self.assertEqual([n for n in os.listdir(queue) if n.endswith((".env", ".msg"))], [])


class RelayServerMixin:
    """Helpers for tests against a server that relays to a scripted sink."""

    timeout = 120

    def submit(self, subject):
        return threads.deferToThread(self._send_and_id, subject)

    def _send_and_id(self, subject):
        with smtplib.SMTP("127.0.0.1", self.server.port("SUBMISSION"), timeout=TIMEOUT) as c:
            c.login(ALICE, PASSWORD)
            c.mail(ALICE)
            c.rcpt("far@remote.example")
            code, reply = c.data(f"Subject: {subject}\r\n\r\nx\r\n".encode())
            assert code == 250, reply
            return reply.decode().rsplit(" ", 1)[1]

    def envelopes(self) -> bytes:
        queue = os.path.join(self.server.data_dir, "queue")
        data = b""
        for name in sorted(os.listdir(queue)) if os.path.isdir(queue) else ():
            if name.endswith(".env"):
                with contextlib.suppress(FileNotFoundError), open(
                        os.path.join(queue, name), "rb") as f:
                    data += f.read()
        return data

    def until(self, condition, seconds=30.0):
        return until(condition, lambda: "a condition: " + self.server.log.decode()[-3000:],
                     seconds, every=0.1)

    def cli(self, *args):
        return run_client([sys.executable, "-m", "popgate.cli", "--config",
                           self.server.config_path, "queue", *args], env=child_env())


class QueueCommandTests(RelayServerMixin, TestCase):
    """``popgate queue list|flush|remove`` while the server runs, on the same files."""

    @defer.inlineCallbacks
    def test_list_flush_and_remove_while_the_server_runs(self):
        sink = Sink(data_replies=["451 4.3.0 not now"])
        sink_port = yield sink.listen()
        self.addCleanup(sink.stop)
        self.server = server = yield start_twistd(self, users=USERS, settings={
            "relay": {"mode": "smarthost", "smarthost": f"127.0.0.1:{sink_port}",
                      "smarthost_tls": "none"}})
        first = yield self.submit("first")
        yield self.until(lambda: b"451 4.3.0 not now" in self.envelopes())
        out, err, code = yield self.cli("list")
        self.assertEqual(code, 0, err)
        [line] = out.decode().splitlines()[1:]
        fields = line.split("\t")
        self.assertEqual([fields[0], *fields[2:]],
                         [first, ALICE, "far@remote.example(queued)", "1", "451 4.3.0 not now"])
        out, err, code = yield self.cli("flush")
        self.assertEqual(code, 0, err)
        yield self.until(lambda: not self.envelopes())
        self.assertEqual(len(sink.messages), 1, "sent at the flush, not an hour later")
        sink.data_replies.append("451 4.3.0 not now")
        second = yield self.submit("second")
        yield self.until(lambda: b"451" in self.envelopes())
        out, err, code = yield self.cli("remove", second)
        self.assertEqual((code, out), (0, f"removed {second}\n".encode()))
        self.assertEqual(self.envelopes(), b"")
        queue = os.path.join(server.data_dir, "queue")
        self.assertFalse([n for n in os.listdir(queue) if n.endswith((".msg", ".env"))])


class BounceTests(RelayServerMixin, TestCase):
    """The wiring: a 550 from the smarthost becomes a DSN in the sender's own Maildir."""

    @defer.inlineCallbacks
    def test_a_550_for_one_recipient_bounces_into_the_senders_maildir(self):
        sink = Sink(rcpt={"gone@remote.example": "550 5.1.1 <gone@remote.example>: unknown"})
        sink_port = yield sink.listen()
        self.addCleanup(sink.stop)
        self.server = yield start_twistd(self, users=USERS, settings={
            "relay": {"mode": "smarthost", "smarthost": f"127.0.0.1:{sink_port}",
                      "smarthost_tls": "none"}})

        def send():
            with smtplib.SMTP("127.0.0.1", self.server.port("SUBMISSION"), timeout=TIMEOUT) as c:
                c.login(ALICE, PASSWORD)
                c.sendmail("alice+lists@example.org",
                           ["far@remote.example", "gone@remote.example"],
                           b"Subject: to two\r\nMessage-ID: <two@example.org>\r\n\r\nx\r\n")
        yield threads.deferToThread(send)
        yield self.until(lambda: stored(self.server, ALICE))
        [bounce] = stored(self.server, ALICE)
        self.assertIn(b"Return-Path: <>", bounce)
        self.assertIn(b"Content-Type: multipart/report; report-type=delivery-status;", bounce)
        self.assertIn(b"To: <alice+lists@example.org>", bounce)
        self.assertIn(b"Final-Recipient: rfc822; gone@remote.example\nAction: failed\n"
                      b"Status: 5.1.1\n", bounce)
        self.assertIn(b"Message-ID: <two@example.org>", bounce, "the original header")
        self.assertEqual([m.recipients for m in sink.messages], [["far@remote.example"]])
        yield self.until(lambda: not self.envelopes())


class CrashTests(TestCase):
    """kill -9 while relaying under load; restart; every accepted message arrives."""

    timeout = 300
    MESSAGES = 300
    CLIENTS = 4

    @defer.inlineCallbacks
    def test_kill_9_while_relaying(self):
        sink = Sink()
        sink_port = yield sink.listen()
        self.addCleanup(sink.stop)
        server = yield start_twistd(self, users=USERS, settings={
            "relay": {"mode": "smarthost", "smarthost": f"127.0.0.1:{sink_port}",
                      "smarthost_tls": "none"},
            "submission": {"max_messages_per_hour": 100000}})
        accepted: list[str] = []
        port = server.port("SUBMISSION")

        def client(number):
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as c:
                    c.login(ALICE, PASSWORD)
                    for n in range(number, self.MESSAGES, self.CLIENTS):
                        subject = f"crash-{n}"
                        c.sendmail(ALICE, [f"r{n}@remote.example"],
                                   f"Subject: {subject}\r\n\r\nbody {n}\r\n".encode())
                        accepted.append(subject)  # only after the 250
            except (OSError, smtplib.SMTPException):
                pass  # the server was killed: what was not answered 250 is not ours

        clients = [threads.deferToThread(client, n) for n in range(self.CLIENTS)]
        yield until(lambda: len(accepted) >= self.MESSAGES // 2, "half of the messages "
                    "accepted", timeout=self.timeout, every=0.05)
        self.assertGreater(len(sink.messages), 0, "the queue is relaying")
        os.kill(server.pid, signal.SIGKILL)
        yield server.process.ended
        yield defer.DeferredList(clients)
        before_restart = len(sink.messages)
        yield spawn_twistd(self, server)
        queue = os.path.join(server.data_dir, "queue")
        for _ in range(600):
            left = [n for n in os.listdir(queue) if n.endswith((".env", ".msg"))]
            if not left:
                break
            yield deferred_sleep(0.1)
        self.assertEqual(left, [], "no queue file left behind")
        self.assertEqual(os.listdir(os.path.join(queue, "tmp")), [])
        received = [re.search(rb"Subject: (crash-\d+)", m.data).group(1).decode()
                    for m in sink.messages]
        missing = set(accepted) - set(received)
        self.assertEqual(missing, set(), "every accepted message reached the smarthost")
        duplicates = len(received) - len(set(received))
        print(f"\ncrash test: {len(accepted)} accepted before kill -9, {before_restart} "
              f"relayed before it, {len(received)} relayed in all, {duplicates} duplicates")
