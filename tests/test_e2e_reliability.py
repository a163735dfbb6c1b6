"""End to end, as a hostile tester (issue 12): ``kill -9`` under load, a full disk, a users
file that breaks while the server runs.  Each runs real ``twistd -n popgate`` processes
on one data directory, with Python's smtplib and poplib as clients.

* Crash: 8 SMTP connections deliver while the server is killed at random moments, over
  several rounds; a ledger records every message acknowledged with ``250``.  After each
  restart on the same data: every acknowledged message is there exactly once and whole,
  nothing partial is in ``new/``/``cur/``, and the stale ``tmp/`` files are gone.
* POP3 UPDATE: QUIT, then ``kill -9`` 0 to 100 ms later: nothing kept is lost, nothing is
  both deleted and listed.
* Disk full (root only: a 4 MiB tmpfs is mounted as the data directory): temporary
  replies only, nothing half-stored, POP3 still serves and frees space, delivery resumes.
* Users file: emptied, garbage or replaced by a directory while the server runs, the
  last users are kept; one that never loaded gives ``451 4.3.0`` and ``-ERR [SYS/TEMP]``.
  One line in the log, never a traceback.
* Shared address: a client failing with an old password does not slow a colleague's
  login from the same address.
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import deferred_sleep, start_twistd, until, without_trace_headers

USERS = [("alice@example.org", "pw"), ("bob@example.org", "pw")]
TIMEOUT = 20
FILLER = b"y" * 99 + b"\n"
CONNECTIONS = 8
ROUNDS = 5


def make_message(token: str, rng: random.Random) -> bytes:
    """A message as stored (LF line ends), identified by its ``X-Token`` header."""
    size = rng.choice((200, 2_000, 30_000, 150_000))
    lines = [b"%x" % rng.getrandbits(8 * 30) for _ in range(size // 60 + 1)]
    return (b"Subject: crash test\nX-Token: " + token.encode() + b"\n\n"
            + b"\n".join(lines) + b"\n")


def crlf(body: bytes) -> bytes:
    """smtplib sends bytes as they are: give it the wire's line ends."""
    return body.replace(b"\n", b"\r\n")


def token_of(body: bytes) -> str | None:
    headers = email.parser.BytesHeaderParser().parsebytes(body)
    return headers["X-Token"]


def tmp_files(data_dir: str) -> list[str]:
    found = []
    for directory, _, names in os.walk(os.path.join(data_dir, "mail")):
        if os.path.basename(directory) == "tmp":
            found += [os.path.join(directory, name) for name in names]
    return found


def in_background(pid: int = 0) -> None:
    """Run a process (0: this thread) at nice 10: these load tests must not starve the
    timing tests that trial -j2 runs beside them (test_e2e_abuse's 1 s login bound)."""
    os.setpriority(os.PRIO_PROCESS, pid or threading.get_native_id(), 10)


def log_text(server) -> str:
    return server.log.decode("utf-8", "replace")


def truncate(path: str) -> None:
    """Leave the file at ``path`` empty (a users file an editor has just emptied)."""
    with open(path, "wb"):
        pass


class Ledger:
    """Messages sent (token -> body hash and recipients) and those acknowledged with 250."""

    def __init__(self):
        self.sent: dict[str, tuple[bytes, tuple[str, ...]]] = {}
        self.acknowledged: set[str] = set()
        self.lock = threading.Lock()


def smtp_load(port: int, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    """One connection's worth of load (in a thread), until ``stop`` or the server dies."""
    in_background()
    rng = random.Random(seed)
    sequence = 0
    while not stop.is_set():
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
        except OSError:
            return  # the server is gone
        try:
            while not stop.is_set():
                sequence += 1
                token = f"{seed}-{sequence}"
                body = make_message(token, rng)
                rcpts = rng.choice((("alice@example.org",), ("bob@example.org",),
                                    ("alice@example.org", "bob@example.org")))
                with ledger.lock:
                    ledger.sent[token] = (hashlib.sha256(body).digest(), rcpts)
                client.sendmail("load@remote.example", list(rcpts), crlf(body))
                with ledger.lock:
                    ledger.acknowledged.add(token)
                # Enough load to be killed mid-commit, not so much that timing tests
                # running beside this one in the suite (trial -j2) starve.
                time.sleep(rng.uniform(0, 0.05))
        except (OSError, smtplib.SMTPException):
            pass  # killed mid-transaction: not acknowledged
        finally:
            with contextlib.suppress(OSError):
                client.close()


class CrashHarness:
    """``kill -9`` tests what a crashed process leaves behind; the page cache outlives
    it.  So the data directory is on a tmpfs (``/dev/shm``) when there is one: fsync
    costs nothing there, and the load does not slow the disk the suite's timing tests
    share (trial -j2)."""

    timeout = 120
    workers = 1

    def setUp(self):
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.data_dir = os.path.join(tempfile.mkdtemp(prefix="popgate-crash-", dir=shm),
                                     "data")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.data_dir), True)

    @defer.inlineCallbacks
    def start(self, users=USERS):
        settings = {"server": {"data_dir": self.data_dir, "workers": self.workers}}
        server = yield start_twistd(self, settings=settings, users=users)
        # "popgate ready", then "popgate worker N ready" from each worker
        yield until(lambda: server.log.count(b" ready") >= self.workers, "the workers")
        for pid in [server.pid, *map(int, re.findall(rb"started \(pid (\d+)\)",
                                                     server.log))]:
            in_background(pid)
        return server

    @defer.inlineCallbacks
    def kill(self, server):
        os.kill(server.pid, signal.SIGKILL)
        yield server.process.ended

    def stored(self, server) -> dict[str, list[bytes]]:
        """token -> stored bodies, over both users' new/ and cur/."""
        found: dict[str, list[bytes]] = {}
        for user, _ in USERS:
            for path in server.messages(user):
                with open(path, "rb") as f:
                    body = without_trace_headers(f.read())
                found.setdefault(token_of(body) or "?", []).append((user, body))
        return found

    def check_ledger(self, server, ledger: Ledger) -> int:
        stored = self.stored(server)
        for token, copies in stored.items():
            self.assertIn(token, ledger.sent, "a message nobody sent (damaged headers?)")
            digest, rcpts = ledger.sent[token]
            users = sorted(user for user, _ in copies)
            if token in ledger.acknowledged:
                self.assertEqual(users, sorted(rcpts), f"{token}: a copy missing or duplicated")
            else:
                # Killed between two copies' renames, before its 250: each copy is whole,
                # the client sends it again (at least once), and no copy is doubled.
                self.assertLessEqual(set(users), set(rcpts), f"{token}: a copy for nobody")
                self.assertEqual(len(users), len(set(users)), f"{token}: a copy doubled")
            for user, copy in copies:
                self.assertEqual(hashlib.sha256(copy).digest(), digest,
                                 f"{token} for {user} is damaged or partial")
        missing = ledger.acknowledged - set(stored)
        self.assertEqual(missing, set(), "acknowledged with 250, then lost")
        return len(stored)

    @defer.inlineCallbacks
    def kill_9_under_smtp_load(self):
        rng = random.Random()
        ledger = Ledger()
        server = yield self.start()
        data_dir = server.data_dir
        left_behind = []
        for round_ in range(ROUNDS):
            stop = threading.Event()
            loads = [threads.deferToThread(smtp_load, server.port("SMTP"), ledger, stop,
                                           round_ * 100 + n) for n in range(CONNECTIONS)]
            yield deferred_sleep(rng.uniform(0.4, 1.5))
            yield self.kill(server)
            stop.set()
            yield defer.DeferredList(loads)
            left_behind.append(len(tmp_files(data_dir)))
            server = yield self.start(users=())
            self.assertEqual(tmp_files(data_dir), [], "stale tmp/ files after the restart")
            self.assertEqual(len(os.listdir(os.path.join(data_dir, "mail",
                                                         ".popgate-owners"))), self.workers)
            self.check_ledger(server, ledger)
        self.assertGreater(len(ledger.acknowledged), ROUNDS * CONNECTIONS)
        self.assertTrue(any(left_behind), "no kill left a tmp/ file: the test tests nothing")
        self.assertNotIn("Traceback", log_text(server))
        return server



class CrashTests(CrashHarness, TestCase):
    def test_kill_9_under_smtp_load(self):
        return self.kill_9_under_smtp_load()

    @defer.inlineCallbacks
    def test_kill_9_during_pop3_update(self):
        rng = random.Random()
        server = yield self.start()
        bodies = [b"Subject: %d\n\nmessage %d\n" % (n, n) + b"x" * 70 + b"\n" * rng.randrange(80)
                  for n in range(300)]
        server.store("alice@example.org", bodies)
        for _ in range(5):
            port = server.port("POP3")
            deleted, retrieved = yield threads.deferToThread(
                self.delete_then_quit, port, rng)
            yield deferred_sleep(rng.uniform(0, 0.1))
            yield self.kill(server)
            server = yield self.start(users=())
            listed = yield threads.deferToThread(self.listing, server.port("POP3"))
            self.check_update(listed, deleted, retrieved)

    def delete_then_quit(self, port: int, rng: random.Random):
        """Log in, RETR some, DELE a third, send QUIT without waiting for its answer."""
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        client.user("alice@example.org")
        client.pass_("pw")
        uidls = {int(n): u for n, u in (line.split() for line in client.uidl()[1])}
        contents = {}
        for number in rng.sample(sorted(uidls), min(10, len(uidls))):
            contents[uidls[number]] = b"\n".join(client.retr(number)[1]) + b"\n"
        doomed = set(rng.sample(sorted(uidls), len(uidls) // 3))
        for number in doomed:
            client.dele(number)
        client.sock.sendall(b"QUIT\r\n")
        kept = {uidls[n] for n in uidls if n not in doomed}
        return {uidls[n] for n in doomed}, (kept, contents)

    def listing(self, port: int) -> dict[bytes, bytes]:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        client.user("alice@example.org")
        client.pass_("pw")
        listed = {}
        for line in client.uidl()[1]:
            number, uidl = line.split()
            self.assertNotIn(uidl, listed, "listed twice")
            listed[uidl] = b"\n".join(client.retr(int(number))[1]) + b"\n"
        client.quit()
        return listed

    def check_update(self, listed, deleted, retrieved) -> None:
        kept, contents = retrieved
        self.assertEqual(kept - set(listed), set(), "a message that was not deleted is lost")
        for uidl, content in contents.items():
            if uidl in listed:
                self.assertEqual(listed[uidl], content)
        # A deleted message is either gone or still whole (the UPDATE did not finish):
        # never listed but unreadable (RETR above read every listed message).
        self.assertLessEqual(set(listed), kept | deleted)


class WorkerCrashTests(CrashHarness, TestCase):
    """The same with ``[server] workers = 2``: the main process and its worker both take
    connections; ``kill -9`` of the main process takes the worker with it
    (``PR_SET_PDEATHSIG``), and what either acknowledged survives."""

    workers = 2

    @defer.inlineCallbacks
    def test_kill_9_under_smtp_load(self):
        server = yield self.kill_9_under_smtp_load()
        writers = {re.search(r"P(\d+)Q", os.path.basename(path)).group(1)
                   for user, _ in USERS for path in server.messages(user)}
        # ROUNDS + 1 starts of the main process: more writers than that means workers
        # delivered too.
        self.assertGreater(len(writers), ROUNDS + 1, "only the main processes delivered")


class DiskFullTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        if os.geteuid() != 0:
            raise SkipTest("mounting a size-limited tmpfs needs root")
        mount = shutil.which("mount")
        if mount is None:
            raise AssertionError("mount(8) is missing")
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m,mode=0700", "popgate-test",
                        self.data_dir], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.data_dir], check=True)
        self.server = yield start_twistd(self, settings={"server": {"data_dir": self.data_dir}},
                                         users=USERS)
        in_background(self.server.pid)
        # Registered after the unmount: runs before it (clean-ups run last first).

    def send(self, count: int, size: int) -> list[tuple[int, bytes]]:
        """Send ``count`` messages (one connection); the reply of each."""
        in_background()
        replies = []
        client = smtplib.SMTP("127.0.0.1", self.server.port("SMTP"), timeout=TIMEOUT)
        try:
            for n in range(count):
                body = b"Subject: %d\n\n" % n + FILLER * (size // len(FILLER))
                try:
                    client.sendmail("s@remote.example", ["alice@example.org"], crlf(body))
                    replies.append((250, b"ok"))
                except smtplib.SMTPDataError as e:
                    replies.append((e.smtp_code, e.smtp_error))
                except smtplib.SMTPRecipientsRefused as e:
                    [(code, text)] = e.recipients.values()
                    replies.append((code, text))
        finally:
            client.quit()
        return replies

    def pop3_empty_mailbox(self) -> tuple[int, bytes]:
        client = poplib.POP3("127.0.0.1", self.server.port("POP3"), timeout=TIMEOUT)
        client.user("alice@example.org")
        client.pass_("pw")
        count, _ = client.stat()
        client.retr(1)
        for number in range(1, count + 1):
            client.dele(number)
        return count, client.quit()

    @defer.inlineCallbacks
    def test_full_disk(self):
        replies = yield threads.deferToThread(self.send, 40, 300_000)
        codes = [code for code, _ in replies]
        self.assertIn(250, codes)
        refused = [(code, text) for code, text in replies if code != 250]
        self.assertTrue(refused, "the 4 MiB disk never filled up")
        for code, text in refused:
            self.assertEqual(code, 452, text)
            self.assertTrue(text.startswith(b"4.3.1 "), text)
        # Nothing half-stored: whole messages in new/, only empty spares in tmp/.
        stored = self.server.messages("alice@example.org")
        self.assertEqual(len(stored), codes.count(250))
        for path in stored:
            with open(path, "rb") as f:
                self.assertTrue(f.read().endswith(FILLER * (300_000 // len(FILLER))), path)
        for path in tmp_files(self.data_dir):
            self.assertEqual(os.path.getsize(path), 0, path)
        # POP3 still serves, and frees the space.
        count, quit_reply = yield threads.deferToThread(self.pop3_empty_mailbox)
        self.assertEqual(count, len(stored))
        self.assertTrue(quit_reply.startswith(b"+OK"), quit_reply)
        self.assertEqual(self.server.messages("alice@example.org"), [])
        # Delivery resumes.
        replies = yield threads.deferToThread(self.send, 3, 300_000)
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        log = log_text(self.server)
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("No space left on device"), 1, log)


class UsersFileFaultTests(TestCase):
    timeout = 60

    def rcpt(self, server, address: str = "alice@example.org") -> tuple[int, bytes]:
        client = smtplib.SMTP("127.0.0.1", server.port("SMTP"), timeout=TIMEOUT)
        try:
            client.ehlo("client.test")
            client.mail("s@remote.example")
            return client.rcpt(address)
        finally:
            client.quit()

    def login(self, server) -> bytes:
        client = poplib.POP3("127.0.0.1", server.port("POP3"), timeout=TIMEOUT)
        try:
            client.user("alice@example.org")
            return client.pass_("pw")
        except poplib.error_proto as e:
            return e.args[0]
        finally:
            client.quit()

    @defer.inlineCallbacks
    def check_kept(self, spoil, problem: str):
        server = yield start_twistd(self, users=USERS)
        users_file = os.path.join(server.data_dir, "users")
        spoil(users_file)  # before any lookup: the users loaded at start are kept
        for _ in range(3):
            yield deferred_sleep(1.05)  # past the 1 s stat throttle
            code, _ = yield threads.deferToThread(self.rcpt, server)
            self.assertEqual(code, 250)
        self.assertTrue((yield threads.deferToThread(self.login, server)).startswith(b"+OK"))
        log = log_text(server)
        self.assertEqual(log.count(f"users file {users_file} {problem}"), 1, log)
        self.assertIn("keeping the 2 users loaded before", log)
        self.assertNotIn("Traceback", log)

    def test_emptied_while_running(self):
        return self.check_kept(truncate, "is empty")

    def test_garbage_while_running(self):
        def garbage(path):
            with open(path, "wb") as f:
                f.write(os.urandom(4096) + b"\0")
        return self.check_kept(garbage, "is not a text file")

    def test_replaced_by_a_directory_while_running(self):
        def directory(path):
            os.unlink(path)
            os.mkdir(path)
        return self.check_kept(directory, "cannot be read: Is a directory")

    @defer.inlineCallbacks
    def check_never_loaded(self, spoil, problem: str):
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        spoil(os.path.join(data_dir, "users"))
        server = yield start_twistd(self, settings={"server": {"data_dir": data_dir}})
        for _ in range(3):
            code, text = yield threads.deferToThread(self.rcpt, server)
            self.assertEqual((code, text[:6]), (451, b"4.3.0 "), text)
        reply = yield threads.deferToThread(self.login, server)
        self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP]"), reply)
        log = log_text(server)
        self.assertIn(f"users file {data_dir}/users {problem}; no users are loaded", log)
        self.assertNotIn("Traceback", log)

    def test_empty_at_start(self):
        return self.check_never_loaded(truncate, "is empty")

    def test_directory_at_start(self):
        return self.check_never_loaded(os.mkdir, "cannot be read: Is a directory")


class SharedAddressTests(TestCase):
    """Issue 12, item 8: behind one NAT, a client stuck on a wrong password does not
    slow a colleague's login, while its own answers stay slow."""

    timeout = 60

    def attempt(self, port: int, user: str, password: str) -> tuple[bytes, float]:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        try:
            client.user(user)
            started = time.monotonic()
            try:
                reply = client.pass_(password)
            except poplib.error_proto as e:
                reply = e.args[0]
            return reply, time.monotonic() - started
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_a_stuck_phone_does_not_slow_its_colleagues(self):
        server = yield start_twistd(self, users=USERS)
        port = server.port("POP3")
        for _ in range(2):
            reply, took = yield threads.deferToThread(
                self.attempt, port, "alice@example.org", "old-password")
            self.assertTrue(reply.startswith(b"-ERR [AUTH]"), reply)
            self.assertGreaterEqual(took, 1.9, "a wrong password is answered slowly")
        reply, took = yield threads.deferToThread(self.attempt, port, "bob@example.org", "pw")
        self.assertTrue(reply.startswith(b"+OK"), reply)
        self.assertLess(took, 1.0, "the colleague waits for nobody's penalty")
