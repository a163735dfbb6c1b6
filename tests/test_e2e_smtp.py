"""End to end: real SMTP/LMTP clients against a real ``twistd -n popgate`` process.

Clients: swaks (plain, ``--pipeline``, ``--attach``, ``--tls``), msmtp, ``curl smtp://``,
Python's smtplib (8-bit UTF-8, a 5 MB attachment, STARTTLS with a verifying context,
implicit TLS) and smtplib.LMTP; plus raw sockets for the hostile cases (STARTTLS command
injection, bare-LF end-of-data smuggling).  A missing client program skips its test,
except under CI (``CI`` set), where it fails (:func:`tests.harness.require_tool`).
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import socket
import ssl
from email.message import EmailMessage

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.certs import make_test_pki
from tests.harness import read_reply, run_client, start_twistd, without_trace_headers

USERS = [("alice@example.org", "pw"), ("bob@example.org", "pw")]
TIMEOUT = 60


def stored_messages(server, user: str) -> list[bytes]:
    contents = []
    for path in server.messages(user):
        with open(path, "rb") as f:
            contents.append(f.read())
    return contents


class SMTPClientsTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield start_twistd(self, users=USERS, settings={
            "smtp": {"lmtp_listen": ["tcp:0:interface=127.0.0.1"]}})
        self.port = self.server.port("SMTP")

    def write_file(self, name: str, content: bytes) -> str:
        path = os.path.join(self.server.directory, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    @defer.inlineCallbacks
    def test_swaks(self):
        out, err, code = yield run_client([
            "swaks", "--server", f"127.0.0.1:{self.port}", "--helo", "client.test",
            "--from", "sender@remote.example", "--to", "alice@example.org",
            "--header", "Subject: from swaks", "--body", "Hello from swaks."])
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"<-  250 2.0.0 Ok: queued as", out)
        [message] = stored_messages(self.server, "alice@example.org")
        self.assertIn(b"Received: from client.test (unknown [127.0.0.1]) by mx.test (popgate)",
                      message)
        self.assertIn(b"Subject: from swaks\n", message)
        self.assertIn(b"\nHello from swaks.\n", message)
        self.assertNotIn(b"\r", message)

    @defer.inlineCallbacks
    def test_swaks_pipelined_with_a_refused_recipient(self):
        out, err, code = yield run_client([
            "swaks", "--pipeline", "--server", f"127.0.0.1:{self.port}",
            "--from", "sender@remote.example",
            "--to", "alice@example.org,nobody@example.org,bob+x@example.org"])
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"550 5.1.1 <nobody@example.org>: no such user here", out)
        self.assertIn(b"250 2.0.0 Ok: queued as", out)
        self.assertEqual(len(stored_messages(self.server, "alice@example.org")), 1)
        [bob] = stored_messages(self.server, "bob@example.org")
        self.assertIn(b"for <bob+x@example.org>;", bob)

    @defer.inlineCallbacks
    def test_swaks_relay_denied(self):
        out, err, code = yield run_client([
            "swaks", "--server", f"127.0.0.1:{self.port}", "--from", "a@remote.example",
            "--to", "someone@remote.example"])
        self.assertNotEqual(code, 0)
        self.assertIn(b"554 5.7.1 <someone@remote.example>: relay access denied", out)

    @defer.inlineCallbacks
    def test_swaks_attachment(self):
        attachment = os.urandom(300_000)
        path = self.write_file("attachment.bin", attachment)
        out, err, code = yield run_client([
            "swaks", "--server", f"127.0.0.1:{self.port}", "--from", "a@remote.example",
            "--to", "alice@example.org", "--attach-type", "application/octet-stream",
            "--attach", f"@{path}", "--suppress-data"])
        self.assertEqual(code, 0, out + err)
        [stored] = stored_messages(self.server, "alice@example.org")
        parsed = email.message_from_bytes(stored, policy=email.policy.default)
        parts = [p for p in parsed.walk() if p.get_content_type() == "application/octet-stream"]
        self.assertEqual(parts[0].get_content(), attachment)

    @defer.inlineCallbacks
    def test_msmtp(self):
        message = b"From: a@remote.example\nTo: alice@example.org\nSubject: msmtp\n\n.dot\nok\n"
        out, err, code = yield run_client([
            "msmtp", "--file=/dev/null", "--host=127.0.0.1", f"--port={self.port}",
            "--auth=off", "--tls=off", "--domain=client.test", "--from=a@remote.example",
            "alice@example.org"], stdin=message)
        self.assertEqual(code, 0, out + err)
        [stored] = stored_messages(self.server, "alice@example.org")
        self.assertTrue(stored.endswith(b"Subject: msmtp\n\n.dot\nok\n"), stored)

    @defer.inlineCallbacks
    def test_curl(self):
        path = self.write_file("message.txt", b"From: a@remote.example\r\nSubject: curl\r\n\r\n"
                                              b"Sent by curl.\r\n.\r\n..\r\n")
        out, err, code = yield run_client([
            "curl", "--silent", "--show-error", f"smtp://127.0.0.1:{self.port}/client.test",
            "--mail-from", "a@remote.example", "--mail-rcpt", "alice@example.org",
            "--mail-rcpt", "bob@example.org", "--upload-file", path])
        self.assertEqual(code, 0, out + err)
        for user in ("alice@example.org", "bob@example.org"):
            [stored] = stored_messages(self.server, user)
            self.assertTrue(stored.endswith(b"Subject: curl\n\nSent by curl.\n.\n..\n"), stored)

    def send_with_smtplib(self, message: bytes, to: list[str], options=()):
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                          timeout=TIMEOUT) as client:
            refused = client.sendmail("sender@remote.example", to, message,
                                      mail_options=list(options))
            return refused

    @defer.inlineCallbacks
    def test_smtplib_5mb_attachment_round_trips_byte_for_byte(self):
        message = EmailMessage()
        message["From"] = "sender@remote.example"
        message["To"] = "alice@example.org"
        message["Subject"] = "big"
        message.set_content("See the attachment.\n.\n")
        message.add_attachment(os.urandom(5 * 1024 * 1024), maintype="application",
                               subtype="octet-stream", filename="big.bin")
        wire = message.as_bytes(policy=email.policy.SMTP)
        yield threads.deferToThread(self.send_with_smtplib, wire, ["alice@example.org"])
        [stored] = stored_messages(self.server, "alice@example.org")
        self.assertEqual(without_trace_headers(stored), wire.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_smtplib_8bit_utf8_round_trips_byte_for_byte(self):
        body = "Grüße aus Köln — ☃ 雪\n.leading dot\n..two dots\nÿ end\n".encode()
        wire = (b"From: s\xc3\xa9nder@remote.example\r\nTo: alice@example.org\r\n"
                b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace(b"\n", b"\r\n"))
        refused = yield threads.deferToThread(
            self.send_with_smtplib, wire, ["alice@example.org"], ["BODY=8BITMIME", "SMTPUTF8"])
        self.assertEqual(refused, {})
        [stored] = stored_messages(self.server, "alice@example.org")
        self.assertEqual(without_trace_headers(stored), wire.replace(b"\r\n", b"\n"))
        self.assertIn(b" with UTF8SMTP id ", stored.replace(b"\n\t", b" "))

    @defer.inlineCallbacks
    def test_smtplib_errors(self):
        def session():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
                client.ehlo("client.test")
                return [client.mail("a@remote.example", ["SIZE=999999999"]),
                        client.mail("a@remote.example"), client.rcpt("nobody@example.org"),
                        client.rcpt("x@remote.example"), client.docmd("VRFY", "alice"),
                        client.docmd("BOGUS")]
        replies = yield threads.deferToThread(session)
        self.assertEqual([code for code, _ in replies], [552, 250, 550, 554, 252, 500])
        self.assertTrue(replies[0][1].startswith(b"5.3.4 "))

    @defer.inlineCallbacks
    def test_lmtp(self):
        lmtp_port = self.server.port("LMTP")

        def session():
            with smtplib.LMTP("127.0.0.1", lmtp_port, local_hostname="client.test",
                              timeout=TIMEOUT) as client:
                refused = client.sendmail("a@remote.example",
                                          ["alice@example.org", "bob@example.org"],
                                          b"Subject: lmtp\r\n\r\nvia LMTP\r\n")
                # smtplib reads only the first of LMTP's per-recipient replies (RFC 2033
                # §4.2); read bob's here.
                return refused, client.getreply()
        refused, second = yield threads.deferToThread(session)
        self.assertEqual(refused, {})
        self.assertEqual(second[0], 250)
        self.assertTrue(second[1].startswith(b"2.0.0 <bob@example.org> Ok: queued as "))
        for user in ("alice@example.org", "bob@example.org"):
            [stored] = stored_messages(self.server, user)
            self.assertIn(b" with LMTP id ", stored.replace(b"\n\t", b" "))
            self.assertTrue(stored.endswith(b"Subject: lmtp\n\nvia LMTP\n"))

    @defer.inlineCallbacks
    def test_bare_lf_end_of_data_is_not_the_end(self):
        def session():
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                replies = sock.makefile("rb")
                read_reply(replies)
                sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@remote.example>\r\n"
                             b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
                answers = b"".join(read_reply(replies) for _ in range(4))
                sock.sendall(b"Subject: one\r\n\r\nbody\n.\nMAIL FROM:<evil@remote.example>\r\n"
                             b"RCPT TO:<bob@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n")
                answers += read_reply(replies)
                sock.sendall(b"QUIT\r\n")
                return answers + read_reply(replies)
        replies = yield threads.deferToThread(session)
        self.assertEqual(replies.count(b"250 2.0.0 Ok: queued as"), 1, replies)
        self.assertTrue(replies.endswith(b"221 2.0.0 Bye\r\n"), replies)
        [stored] = stored_messages(self.server, "alice@example.org")
        self.assertIn(b"\nbody\n.\nMAIL FROM:<evil@remote.example>\n", stored)
        self.assertEqual(stored_messages(self.server, "bob@example.org"), [])


class SMTPTLSTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.pki = make_test_pki(directory, "localhost")
        self.server = yield start_twistd(self, users=USERS, settings={
            "tls": {"certificate": self.pki.fullchain, "key": self.pki.key},
            "smtp": {"tls_listen": ["tcp:0:interface=127.0.0.1"]}})
        self.port = self.server.port("SMTP")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.ca)
        context.check_hostname = True
        return context

    @defer.inlineCallbacks
    def test_smtplib_starttls(self):
        def session():
            with smtplib.SMTP("localhost", self.port, local_hostname="client.test",
                              timeout=TIMEOUT) as client:
                client.ehlo()
                advertised_before = client.has_extn("starttls")
                client.starttls(context=self.context())
                client.ehlo()
                advertised_after = client.has_extn("starttls")
                client.sendmail("a@remote.example", ["alice@example.org"], b"Subject: tls\r\n\r\n")
                return advertised_before, advertised_after
        before, after = yield threads.deferToThread(session)
        self.assertEqual((before, after), (True, False))
        [stored] = stored_messages(self.server, "alice@example.org")
        unfolded = stored.replace(b"\n\t", b" ")
        self.assertRegex(unfolded, rb"with ESMTPS id \w+ \(using TLSv1\.[23] with cipher \S+\)")

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        tls_port = self.server.port("SMTPS")

        def session():
            with smtplib.SMTP_SSL("localhost", tls_port, local_hostname="client.test",
                                  context=self.context(), timeout=TIMEOUT) as client:
                client.ehlo()
                advertised = client.has_extn("starttls")
                client.sendmail("a@remote.example", ["alice@example.org"], b"Subject: tls\r\n\r\n")
                return advertised
        advertised = yield threads.deferToThread(session)
        self.assertFalse(advertised)
        [stored] = stored_messages(self.server, "alice@example.org")
        self.assertIn(b"with ESMTPS id", stored.replace(b"\n\t", b" "))

    @defer.inlineCallbacks
    def test_swaks_tls(self):
        out, err, code = yield run_client([
            "swaks", "--tls", "--server", f"localhost:{self.port}", "--from", "a@remote.example",
            "--to", "alice@example.org"])
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"220 2.0.0 Ready to start TLS", out)
        self.assertEqual(len(stored_messages(self.server, "alice@example.org")), 1)

    @defer.inlineCallbacks
    def test_commands_injected_before_the_handshake_are_discarded(self):
        def session():
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                sock.sendall(b"EHLO client.test\r\n")
                # Read byte by byte so that nothing after the 220 is consumed in plaintext.
                plain = sock.makefile("rb", buffering=0)
                read_reply(plain), read_reply(plain)
                sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.example>\r\n")
                answer = read_reply(plain)
                with self.context().wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(b"NOOP\r\nMAIL FROM:<a@remote.example>\r\n")
                    # Had RSET or MAIL been executed, their replies would come first.
                    replies = tls.makefile("rb")
                    return answer, read_reply(replies) + read_reply(replies)
        answer, after = yield threads.deferToThread(session)
        self.assertEqual(answer, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(after, b"250 2.0.0 Ok\r\n503 5.5.1 Error: send EHLO first\r\n")
