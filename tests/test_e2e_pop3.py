"""End to end: real POP3 clients against a real ``twistd -n popgate`` process.

Clients: Python's poplib (plain, STLS with a verifying context, implicit TLS), ``curl
pop3://`` (LIST, RETR, ``-X UIDL``, ``-X 'TOP 1 0'``), fetchmail (with and without
``keep``), getmail6 into a Maildir and mpop with a UIDL file; plus a raw socket for the
STLS command-injection case.  The messages are written into the Maildir through
popgate's own store (one test delivers through SMTP instead) and must come back byte
for byte: a line starting with ``.``, an 8-bit UTF-8 body, a 998-character line and a
5 MB attachment.  A missing client program skips its test, except under CI (``CI`` set),
where it fails (:func:`tests.harness.require_tool`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import pwd
import random
import shutil
import smtplib
import socket
import ssl
import tempfile

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.certs import make_test_pki
from tests.harness import (
    deferred_sleep,
    read,
    require_tool,
    run_client,
    start_twistd,
    write_private,
)

USER, PASSWORD = "alice@example.org", "pw"
TIMEOUT = 60


def big_attachment_message() -> bytes:
    payload = base64.encodebytes(random.Random(5).randbytes(3_800_000))  # ~5 MB encoded
    return (b"From: sender@example.net\nTo: alice@example.org\nSubject: attachment\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=BOUNDARY\n\n"
            b"--BOUNDARY\nContent-Type: text/plain\n\nSee the attachment.\n"
            b"--BOUNDARY\nContent-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: base64\n"
            b"Content-Disposition: attachment; filename=data.bin\n\n"
            + payload + b"--BOUNDARY--\n")


MESSAGES = [
    b"From: sender@example.net\nTo: alice@example.org\nSubject: dots\n\n"
    b".a body line that starts with a dot\n..two dots\n.\n. space\nlast line\n",
    ("From: sender@example.net\nTo: alice@example.org\nSubject: 8-bit\nMIME-Version: 1.0\n"
     "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
     "Grüße aus Köln, ☃, 日本語のテキスト.\n").encode(),
    b"From: sender@example.net\nTo: alice@example.org\nSubject: long line\n\n"
    + b"x" * 998 + b"\n",
    big_attachment_message(),
]


def crlf(message: bytes) -> bytes:
    return message.replace(b"\n", b"\r\n")




def fingerprints(messages: list[bytes]) -> list[tuple[int, str]]:
    """Sizes and digests, sorted: comparable without diffing megabytes on a failure."""
    return sorted((len(m), hashlib.sha256(m).hexdigest()) for m in messages)


def maildir_files(path: str) -> list[bytes]:
    """The contents of every message in a Maildir (clients name files their way)."""
    return [read(os.path.join(path, sub, name))
            for sub in ("new", "cur") for name in os.listdir(os.path.join(path, sub))]


def make_maildir(path: str) -> str:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub))
    return path + "/"


class POP3EndToEndTestCase(TestCase):
    timeout = 180
    settings: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield start_twistd(self, users=[(USER, PASSWORD)],
                                         settings=self.make_settings())
        self.port = self.server.port("POP3")
        self.deliver_all()

    def make_settings(self) -> dict:
        return {}

    def deliver_all(self) -> None:
        maildir = self.server.store(USER, MESSAGES)
        self.uidls = [info.uidl for info in maildir.scan()]
        self.assertEqual(fingerprints([read(info.path) for info in maildir.scan()]),
                         fingerprints(MESSAGES))

    def path(self, name: str) -> str:
        return os.path.join(self.server.directory, name)


class PoplibTests(POP3EndToEndTestCase):
    def poplib_session(self):
        client = poplib.POP3("127.0.0.1", self.port, timeout=TIMEOUT)
        client.user(USER)
        client.pass_(PASSWORD)
        return client

    @defer.inlineCallbacks
    def test_retrieve_everything_byte_identical_then_delete(self):
        def session():
            client = self.poplib_session()
            stat = client.stat()
            listing = client.list()[1]
            uidls = client.uidl()[1]
            bodies = [client.retr(n)[1] for n in range(1, len(MESSAGES) + 1)]
            top = client.top(1, 0)[1]
            for n in range(1, len(MESSAGES) + 1):
                client.dele(n)
            quit_reply = client.quit()
            return stat, listing, uidls, bodies, top, quit_reply

        stat, listing, uidls, bodies, top, quit_reply = yield threads.deferToThread(session)
        sizes = [len(crlf(m)) for m in MESSAGES]
        self.assertEqual(stat, (len(MESSAGES), sum(sizes)))
        self.assertEqual(listing, [b"%d %d" % (n, s) for n, s in enumerate(sizes, 1)])
        self.assertEqual(uidls, [b"%d %s" % (n, u.encode()) for n, u in
                                 enumerate(self.uidls, 1)])
        for message, lines in zip(MESSAGES, bodies, strict=True):
            self.assertEqual(b"\r\n".join(lines) + b"\r\n", crlf(message))
        self.assertEqual(top, [b"From: sender@example.net", b"To: alice@example.org",
                               b"Subject: dots", b""])
        self.assertTrue(quit_reply.startswith(b"+OK"))
        self.assertEqual(self.server.messages(USER), [])

    @defer.inlineCallbacks
    def test_dropped_connection_deletes_nothing_and_unlocks(self):
        def drop_after_dele():
            client = self.poplib_session()
            client.dele(1)
            client.sock.close()  # no QUIT

        yield threads.deferToThread(drop_after_dele)
        yield self.wait_until_unlocked()
        self.assertEqual(len(self.server.messages(USER)), len(MESSAGES))

    @defer.inlineCallbacks
    def wait_until_unlocked(self):
        """The server notices the drop asynchronously; log in until the lock is free."""
        def attempt():
            client = self.poplib_session()
            client.quit()

        for _ in range(50):
            try:
                yield threads.deferToThread(attempt)
                return
            except poplib.error_proto as e:
                self.assertIn(b"[IN-USE]", e.args[0])
                yield deferred_sleep(0.1)
        self.fail("the mailbox stayed locked")

    @defer.inlineCallbacks
    def test_second_session_is_refused_in_use(self):
        def two_sessions():
            first = self.poplib_session()
            try:
                self.poplib_session()
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                first.quit()
            return b"no error"

        error = yield threads.deferToThread(two_sessions)
        self.assertTrue(error.startswith(b"-ERR [IN-USE]"), error)

    @defer.inlineCallbacks
    def test_wrong_password_is_refused_with_auth_code(self):
        def wrong():
            client = poplib.POP3("127.0.0.1", self.port, timeout=TIMEOUT)
            client.user(USER)
            try:
                client.pass_("wrong")
            except poplib.error_proto as e:
                return e.args[0]
            return b"accepted"

        self.assertEqual((yield threads.deferToThread(wrong)),
                         b"-ERR [AUTH] Authentication failed")

    @defer.inlineCallbacks
    def test_capabilities(self):
        def capa():
            client = poplib.POP3("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                return client.capa()
            finally:
                client.quit()

        capabilities = yield threads.deferToThread(capa)
        for name in ("TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
            self.assertIn(name, capabilities)
        self.assertEqual(capabilities["SASL"], ["PLAIN"])
        self.assertEqual(capabilities["IMPLEMENTATION"][0], "popgate")
        self.assertNotIn("STLS", capabilities, "no certificate configured")


class CurlTests(POP3EndToEndTestCase):
    def curl(self, *args: str) -> defer.Deferred:
        return run_client(["curl", "--silent", "--show-error", "--max-time", str(TIMEOUT),
                           "--user", f"{USER}:{PASSWORD}", *args])

    @defer.inlineCallbacks
    def test_list(self):
        out, err, code = yield self.curl(f"pop3://127.0.0.1:{self.port}/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"".join(b"%d %d\r\n" % (n, len(crlf(m)))
                                       for n, m in enumerate(MESSAGES, 1)))

    @defer.inlineCallbacks
    def test_retr_every_message(self):
        for number, message in enumerate(MESSAGES, 1):
            target = self.path(f"retr{number}")
            out, err, code = yield self.curl("-o", target,
                                             f"pop3://127.0.0.1:{self.port}/{number}")
            self.assertEqual(code, 0, err)
            self.assertEqual(read(target), crlf(message), number)

    @defer.inlineCallbacks
    def test_uidl(self):
        out, err, code = yield self.curl("-X", "UIDL", f"pop3://127.0.0.1:{self.port}/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"".join(b"%d %s\r\n" % (n, u.encode())
                                       for n, u in enumerate(self.uidls, 1)))

    @defer.inlineCallbacks
    def test_top(self):
        out, err, code = yield self.curl("-X", "TOP 1 0", f"pop3://127.0.0.1:{self.port}/")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, crlf(MESSAGES[0].split(b"\n\n")[0] + b"\n\n"))


class FetchmailTests(POP3EndToEndTestCase):
    def fetchmail(self, keep: bool) -> defer.Deferred:
        rc = write_private(self.path("fetchmailrc"), (
            f'poll 127.0.0.1 protocol POP3 port {self.port} uidl\n'
            f'  user "{USER}" there with password "{PASSWORD}" is "someone" here\n'
            f'  options {"keep" if keep else "nokeep"} sslproto ""\n'
            f'  bsmtp "{self.path("fetched.bsmtp")}"\n'))
        home = self.path("fetchmail-home")
        os.makedirs(home, exist_ok=True)
        env = dict(os.environ, HOME=home, FETCHMAILHOME=home)
        return run_client(["fetchmail", "--nodetach", "--nosyslog", "-f", rc,
                           "--pidfile", os.path.join(home, "pid"),
                           "--idfile", os.path.join(home, "ids")], env=env)

    def fetched(self) -> int:
        path = self.path("fetched.bsmtp")
        return read(path).count(b"\r\nDATA\r\n") if os.path.exists(path) else 0

    @defer.inlineCallbacks
    def test_without_keep_the_mailbox_ends_empty(self):
        out, err, code = yield self.fetchmail(keep=False)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.fetched(), len(MESSAGES), out + err)
        self.assertEqual(self.server.messages(USER), [])

    @defer.inlineCallbacks
    def test_with_keep_a_second_run_fetches_nothing_new(self):
        out, err, code = yield self.fetchmail(keep=True)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.fetched(), len(MESSAGES))
        out, err, code = yield self.fetchmail(keep=True)
        self.assertEqual(code, 1, out + err)  # fetchmail's "no new mail"
        self.assertEqual(self.fetched(), len(MESSAGES))
        self.assertEqual(len(self.server.messages(USER)), len(MESSAGES))


class GetmailTests(POP3EndToEndTestCase):
    def target_maildir(self) -> tuple[str, str]:
        """A Maildir for getmail and the destination's ``user`` setting.

        getmail refuses to deliver as root, so under root (CI containers) it delivers as
        nobody, into a directory of nobody's own under /tmp (the test tree is not
        readable by nobody).
        """
        if os.geteuid() != 0:
            return make_maildir(self.path("getmail-Maildir")), ""
        base = tempfile.mkdtemp(prefix="popgate-getmail-")
        self.addCleanup(shutil.rmtree, base)
        target = make_maildir(os.path.join(base, "Maildir"))
        nobody = pwd.getpwnam("nobody")
        for sub in ("..", "", "tmp", "new", "cur"):
            os.chown(os.path.join(target, sub), nobody.pw_uid, nobody.pw_gid)
        return target, "user = nobody\n"

    @defer.inlineCallbacks
    def test_into_a_maildir_byte_identical(self):
        target, delivery_user = self.target_maildir()
        directory = self.path("getmail")
        os.makedirs(directory)
        write_private(os.path.join(directory, "getmailrc"), (
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {self.port}\nusername = {USER}\npassword = {PASSWORD}\n"
            f"[destination]\ntype = Maildir\npath = {target}\n"
            + delivery_user +
            "[options]\nread_all = false\ndelete = false\n"
            "delivered_to = false\nreceived = false\n"))
        getmail = ["getmail", "--getmaildir", directory, "--rcfile", "getmailrc"]
        out, err, code = yield run_client(getmail)
        self.assertEqual(code, 0, out + err)
        # getmail always writes its own Return-Path header first; the rest is ours.
        received = [m.split(b"\n", 1)[1] for m in maildir_files(target)
                    if m.startswith(b"Return-Path: ")]
        self.assertEqual(fingerprints(received), fingerprints(MESSAGES))
        out, err, code = yield run_client(getmail)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(len(maildir_files(target)), len(MESSAGES), "nothing new the 2nd time")


class MpopTests(POP3EndToEndTestCase):
    def configure(self, target: str) -> str:
        return write_private(self.path("mpoprc"), (
            "defaults\ntls off\nauth user\n"
            f"account default\nhost 127.0.0.1\nport {self.port}\n"
            f"user {USER}\npassword {PASSWORD}\nkeep on\nreceived_header off\n"
            f"uidls_file {self.path('mpop-uidls')}\ndelivery maildir {target}\n"))

    @defer.inlineCallbacks
    def test_uidl_file_and_pipelining(self):
        target = make_maildir(self.path("mpop-Maildir"))
        rc = self.configure(target)
        out, err, code = yield run_client(["mpop", "-C", rc, "--serverinfo"])
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"PIPELINING:", out)
        out, err, code = yield run_client(["mpop", "-C", rc, "-q"])
        self.assertEqual(code, 0, out + err)
        self.assertEqual(fingerprints(maildir_files(target)), fingerprints(MESSAGES))
        uidls = read(self.path("mpop-uidls"))
        for uidl in self.uidls:
            self.assertIn(uidl.encode(), uidls)
        out, err, code = yield run_client(["mpop", "-C", rc, "-q"])
        self.assertEqual(code, 0, out + err)
        self.assertEqual(len(maildir_files(target)), len(MESSAGES), "nothing new the 2nd time")


class TLSServerTestCase(POP3EndToEndTestCase):
    """A server with a test CA's certificate, STLS and an implicit-TLS listener."""

    def make_settings(self) -> dict:
        directory = os.path.abspath(self.mktemp())
        self.pki = make_test_pki(directory, "localhost")
        return {"tls": {"certificate": self.pki.fullchain, "key": self.pki.key},
                "pop3": {"tls_listen": ["tcp:0:interface=127.0.0.1"]}}

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.pki.ca)


class TLSTests(TLSServerTestCase):
    @defer.inlineCallbacks
    def test_stls_with_a_verifying_context(self):
        def session():
            client = poplib.POP3("localhost", self.port, timeout=TIMEOUT)
            before = client.capa()
            client.stls(self.context())
            after = client.capa()
            client.user(USER)
            client.pass_(PASSWORD)
            body = client.retr(2)[1]
            client.quit()
            return before, after, body

        before, after, body = yield threads.deferToThread(session)
        self.assertIn("STLS", before)
        self.assertNotIn("STLS", after)
        self.assertEqual(b"\r\n".join(body) + b"\r\n", crlf(MESSAGES[1]))

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        def session():
            client = poplib.POP3_SSL("localhost", self.server.port("POP3S"),
                                     context=self.context(), timeout=TIMEOUT)
            capabilities = client.capa()
            client.user(USER)
            client.pass_(PASSWORD)
            stat = client.stat()
            client.quit()
            return capabilities, stat

        capabilities, stat = yield threads.deferToThread(session)
        self.assertNotIn("STLS", capabilities)
        self.assertEqual(stat[0], len(MESSAGES))

    @defer.inlineCallbacks
    def test_wrong_hostname_fails_verification(self):
        def session():
            client = poplib.POP3("127.0.0.1", self.port, timeout=TIMEOUT)
            context = self.context()
            try:
                client.stls(context)  # the certificate names localhost, not 127.0.0.1
            except ssl.SSLCertVerificationError:
                return "refused"
            return "accepted"

        self.assertEqual((yield threads.deferToThread(session)), "refused")

    @defer.inlineCallbacks
    def test_commands_pipelined_behind_stls_are_discarded(self):
        def inject():
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw:
                stream = raw.makefile("rb")
                stream.readline()  # greeting
                raw.sendall(b"STLS\r\nCAPA\r\n")
                answer = stream.readline()
                with self.context().wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.settimeout(1.0)
                    try:
                        early = tls.recv(1024)  # an answer to the injected CAPA?
                    except TimeoutError:
                        early = b""
                    tls.settimeout(TIMEOUT)
                    tls.sendall(b"CAPA\r\n")
                    capa = tls.recv(4096)
                    return answer, early, capa

        answer, early, capa = yield threads.deferToThread(inject)
        self.assertEqual(answer, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(early, b"")
        self.assertTrue(capa.startswith(b"+OK Capability list follows\r\n"))
        self.assertNotIn(b"STLS", capa)

    @defer.inlineCallbacks
    def test_curl_stls_and_pop3s(self):
        require_tool("curl")
        common = ["curl", "--silent", "--show-error", "--max-time", str(TIMEOUT),
                  "--cacert", self.pki.ca, "--user", f"{USER}:{PASSWORD}"]
        out, err, code = yield run_client(
            [*common, "--ssl-reqd", f"pop3://localhost:{self.port}/3"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, crlf(MESSAGES[2]))
        out, err, code = yield run_client(
            [*common, f"pop3s://localhost:{self.server.port('POP3S')}/"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count(b"\r\n"), len(MESSAGES))


class TLSCloseTests(TLSServerTestCase):
    """With room for one session only, a session the server failed to close would lock
    everyone out: the next connection proves the previous one is really gone."""

    def make_settings(self) -> dict:
        settings = super().make_settings()
        settings["limits"] = {"max_sessions": 1}
        return settings

    def greeting(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw:
            return raw.makefile("rb").readline()

    @defer.inlineCallbacks
    def test_server_closes_a_tls_session_after_quit(self):
        # QUIT after RETR waits for the Maildir update (reading paused meanwhile); the
        # TLS close that follows must still be able to read the client's close_notify.
        def session():
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw:
                stream = raw.makefile("rb")
                stream.readline()
                raw.sendall(b"STLS\r\n")
                stream.readline()
                tls = self.context().wrap_socket(raw, server_hostname="localhost")
                tls.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nRETR 3\r\nQUIT\r\n".encode())
                received = b""
                while chunk := tls.recv(65536):  # until the server's close_notify
                    received += chunk
                tls.unwrap()  # our close_notify, as a well-behaved client sends it
                return received

        received = yield threads.deferToThread(session)
        self.assertTrue(received.endswith(b"+OK popgate signing off (0 messages deleted)\r\n"))
        self.assertIn(crlf(MESSAGES[2]), received)
        for _ in range(50):
            greeting = yield threads.deferToThread(self.greeting)
            if greeting.startswith(b"+OK"):
                return
            self.assertEqual(greeting, b"-ERR [SYS/TEMP] too many sessions\r\n")
            yield deferred_sleep(0.1)
        self.fail("the TLS session was never closed by the server")


class ThroughSMTPTests(POP3EndToEndTestCase):
    def deliver_all(self) -> None:
        self.uidls = []

    @defer.inlineCallbacks
    def test_what_smtp_accepted_comes_back_byte_identical(self):
        def send():
            with smtplib.SMTP("127.0.0.1", self.server.port("SMTP"), timeout=TIMEOUT) as smtp:
                for message in MESSAGES:
                    smtp.sendmail("sender@example.net", [USER], crlf(message))

        yield threads.deferToThread(send)
        stored = [read(path) for path in self.server.messages(USER)]
        self.assertEqual(len(stored), len(MESSAGES))

        def retrieve():
            client = poplib.POP3("127.0.0.1", self.port, timeout=TIMEOUT)
            client.user(USER)
            client.pass_(PASSWORD)
            bodies = [b"\r\n".join(client.retr(n)[1]) + b"\r\n"
                      for n in range(1, len(MESSAGES) + 1)]
            client.quit()
            return bodies

        bodies = yield threads.deferToThread(retrieve)
        self.assertEqual(fingerprints(bodies), fingerprints([crlf(s) for s in stored]))
        for message in MESSAGES:  # the client's bytes, after popgate's trace headers
            self.assertTrue(any(body.endswith(crlf(message)) for body in bodies))
