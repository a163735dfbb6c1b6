"""Running popgate as an office would: as a service user, under systemd, reloaded by SIGHUP.

- ``twistd --uid nobody`` over a data directory or users file owned by root stops with one
  line naming what to ``chown`` (exit status 1, no traceback), and starts once it is done.
- Without ``server.postmaster``, ``postmaster@`` of every local domain reaches the first
  user in the users file, whom the start-up log names (RFC 5321 §4.5.1).
- SIGHUP re-reads the users file even when an edit kept its inode, size and mtime.
- The shipped systemd units, as ``popgate init --systemd`` writes them for this
  installation, pass ``systemd-analyze verify``; the configuration it writes takes its
  five listeners from named sockets handed over the way systemd does (``LISTEN_FDS``,
  ``LISTEN_FDNAMES``), and the self-signed certificate verifies for ``localhost``.
"""

from __future__ import annotations

import io
import os
import poplib
import pwd
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from popgate import cli, config, firstrun
from tests.harness import (
    child_env,
    read,
    read_reply,
    require_tool,
    start_twistd,
    twistd_path,
)
from tests.test_e2e_tls import deferred_sleep

TIMEOUT = 60


def _needs_root() -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root: twistd --uid switches to another user")


class ServiceUserTests(TestCase):
    """``twistd --uid nobody`` as a systemd unit with ``User=`` would run it."""

    timeout = 120

    def setUp(self):
        _needs_root()
        self.nobody = pwd.getpwnam("nobody")
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        for directory in (os.path.dirname(base), base):
            os.chmod(directory, 0o755)  # trial makes its temp parents 0700
        self.data = os.path.join(base, "data")
        os.makedirs(os.path.join(self.data, "mail"), mode=0o700)

    def twistd(self) -> tuple[int | None, str]:
        """Run as nobody: (exit status, output) if it stops, (None, output) once it
        serves (it is then stopped)."""
        args = [twistd_path(), "-n", "--pidfile=", "--logfile=-", "--uid", "nobody",
                "--gid", str(self.nobody.pw_gid), "popgate", "--data-dir", self.data,
                "--smtp", "tcp:0:interface=127.0.0.1", "--pop3", "tcp:0:interface=127.0.0.1",
                "--submission", "tcp:0:interface=127.0.0.1"]
        process = subprocess.Popen(args, env=child_env(), cwd=os.path.dirname(self.data),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(process.wait, 30)
        output = ""
        for line in process.stdout:
            output += line
            if "popgate ready" in line:
                process.send_signal(signal.SIGTERM)
                output += process.communicate(timeout=30)[0]
                self.assertNotIn("Traceback", output)
                return None, output
        return process.wait(timeout=30), output

    def assertStopsWith(self, result, line: str) -> None:
        """Exit status 1 and ``line``, once, with nothing else from popgate (twistd puts
        what goes to stderr into its log, here standard output)."""
        code, output = result
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual([text.partition("] ")[2] if "] " in text else text
                          for text in output.splitlines() if "popgate:" in text], [line])

    def chown(self, path: str, recursive: bool = False) -> None:
        paths = [path]
        if recursive:
            for root, dirs, files in os.walk(path):
                paths += [os.path.join(root, n) for n in dirs + files]
        for p in paths:
            os.chown(p, self.nobody.pw_uid, self.nobody.pw_gid)

    def test_root_owned_data_directory(self):
        os.chmod(self.data, 0o700)
        self.assertStopsWith(self.twistd(), f"popgate: user nobody cannot write {self.data} "
                                            f"(owner root:root, mode 0700); fix with: "
                                            f"chown -R nobody: {self.data}")

    def test_root_owned_maildir_below_a_good_data_directory(self):
        new = os.path.join(self.data, "mail", "example.org", "alice", "Maildir", "new")
        os.makedirs(new, mode=0o700)
        self.chown(self.data, recursive=True)
        os.chown(new, 0, 0)  # say, made by a delivery while popgate ran as root
        self.assertStopsWith(self.twistd(), f"popgate: user nobody cannot write {new} (owner "
                             f"root:root, mode 0700); fix with: chown -R nobody: {self.data}")

    def test_root_owned_users_file_then_fixed(self):
        users = os.path.join(self.data, "users")
        with open(os.open(users, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("alice@example.org:{PLAIN}pw\n")
        self.chown(self.data)
        self.chown(os.path.join(self.data, "mail"))
        self.assertStopsWith(self.twistd(), f"popgate: user nobody cannot read {users} "
                                            "(owner root:root, mode 0600); fix with: "
                                            f"chown -R nobody: {self.data}")
        self.chown(self.data, recursive=True)
        code, out = self.twistd()
        self.assertIsNone(code, out)
        self.assertIn("postmaster@<every local domain> goes to alice@example.org, the first "
                      "user in", out)


class PostmasterTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_postmaster_reaches_the_first_user_by_default(self):
        # RFC 5321 §4.5.1, with no server.postmaster configured.
        server = yield start_twistd(self, users=[("boss@example.org", "pw"),
                                                 ("bob@example.net", "pw")],
                                    settings={"server": {"domains": ["example.com"]}})
        self.assertIn(b"postmaster@<every local domain> goes to boss@example.org, the first "
                      b"user in ", server.log)

        def send():
            with smtplib.SMTP("127.0.0.1", server.port("SMTP"), timeout=TIMEOUT) as client:
                return client.sendmail("someone@remote.example",
                                       ["postmaster@example.net", "PostMaster@example.com"],
                                       b"Subject: hello postmaster\r\n\r\nHi.\r\n")
        self.assertEqual((yield threads.deferToThread(send)), {})
        self.assertEqual(len(server.messages("boss@example.org")), 1)
        delivered = read(server.messages("boss@example.org")[0])
        self.assertIn(b"Delivered-To: boss@example.org\n", delivered)
        self.assertIn(b"for <postmaster@example.net>", delivered)  # one copy, both RCPTs
        self.assertEqual(server.messages("bob@example.net"), [])


class SighupTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sighup_rereads_the_users_file(self):
        """An edit in place that keeps inode, size and mtime is still seen by itself
        (its ctime changed); SIGHUP re-reads the file at once all the same."""
        server = yield start_twistd(self, users=[("alice@example.org", "old1")])
        path = os.path.join(server.data_dir, "users")

        def login(password: str) -> bytes:
            client = poplib.POP3("127.0.0.1", server.port("POP3"), timeout=TIMEOUT)
            try:
                client.user("alice@example.org")
                return client.pass_(password)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.close()

        self.assertTrue((yield threads.deferToThread(login, "old1")).startswith(b"+OK"))
        before = os.stat(path)
        with open(path, "r+b") as f:  # same inode, same size, then the same mtime
            f.write(read(path).replace(b"{PLAIN}old1", b"{PLAIN}new2"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b"SIGHUP: 1 users read from" not in server.log and time.monotonic() < deadline:
            yield deferred_sleep(0.05)
        self.assertIn(b"SIGHUP: no TLS certificate to reload", server.log)
        self.assertTrue((yield threads.deferToThread(login, "new2")).startswith(b"+OK"))
        self.assertFalse(server.process.ended.called)


_SOCKET_WRAPPER = """\
import fcntl, os, sys
# Put the sockets at 3, 4, ... and name them, as systemd does before it runs ExecStart.
# (Out of the way first, so that no dup2 overwrites a socket still to be moved.)
fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1].split(",")]
for index, fd in enumerate(fds):
    os.dup2(fd, 3 + index)  # inheritable
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


class SystemdTests(TestCase):
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config_path = os.path.join(self.dir, "popgate.toml")
        self.units = os.path.join(self.dir, "units")
        owner = pwd.getpwuid(os.geteuid()).pw_name
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stdin", io.StringIO("pw\n"))
        code = cli.main(["--config", self.config_path, "--data-dir",
                         os.path.join(self.dir, "data"), "init", "--user",
                         "alice@example.org", "--password-stdin",
                         "--systemd", self.units, "--owner", owner])
        self.assertEqual(code, 0)
        self.init_output = out.getvalue()

    def test_units_pass_systemd_analyze_verify(self):
        tool = require_tool("systemd-analyze")
        names = sorted(os.listdir(self.units))
        self.assertEqual(names, ["popgate-pop3.socket", "popgate-pop3s.socket",
                                 "popgate-smtp.socket", "popgate-smtps.socket",
                                 "popgate-submission.socket", "popgate.service"])
        with open(os.path.join(self.units, "popgate.service"), encoding="utf-8") as f:
            service = f.read()
        self.assertIn(f"\nExecStart={firstrun.twistd_path()} --nodaemon --pidfile= "
                      f"--logfile=- popgate --config {self.config_path}\n", service)
        self.assertIn(f"\nReadWritePaths={self.dir}/data\n", service)
        result = subprocess.run([tool, "verify", *names], cwd=self.units, capture_output=True,
                                text=True, timeout=TIMEOUT)
        # verify exits 0 on unknown keys too, warning on stderr: nothing may be printed.
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
        # systemd's own score of the hardening (0 best, 10 worst; "OK" is below 5).
        result = subprocess.run([tool, "security", "--offline=yes", "popgate.service"],
                                cwd=self.units, capture_output=True, text=True,
                                timeout=TIMEOUT)
        match = re.search(r"Overall exposure level for popgate.service: ([0-9.]+)",
                          result.stdout)
        self.assertTrue(match, result.stdout + result.stderr)
        self.assertLessEqual(float(match.group(1)), 2.0, result.stdout)
        self.assertIn("systemctl enable --now popgate-smtp.socket popgate-submission.socket "
                      "popgate-smtps.socket popgate-pop3.socket popgate-pop3s.socket "
                      "popgate.service", self.init_output)

    def test_socket_activation_by_name(self):
        loaded = config.load(self.config_path)
        self.assertEqual(loaded.pop3.tls_listen, ("systemd:domain=INET6:name=pop3s",))
        names = [n for key in firstrun.SOCKETS for n in firstrun.SOCKETS[key]]
        sockets = {}
        for name in names:
            sock = socket.socket(socket.AF_INET6)
            self.addCleanup(sock.close)
            sock.bind(("::1", 0))
            sock.listen()
            sockets[name] = sock
        args = [sys.executable, "-c", _SOCKET_WRAPPER,
                ",".join(str(s.fileno()) for s in sockets.values()), ":".join(sockets),
                twistd_path(), "-n", "--pidfile=", "--logfile=-", "popgate",
                "--config", self.config_path]
        process = subprocess.Popen(args, env=child_env(), cwd=self.dir, text=True,
                                   pass_fds=[s.fileno() for s in sockets.values()],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.send_signal, signal.SIGTERM)
        port = {name: sock.getsockname()[1] for name, sock in sockets.items()}
        for sock in sockets.values():
            sock.close()  # the server holds them now
        output = ""
        while "popgate ready" not in output:
            line = process.stdout.readline()
            self.assertTrue(line, output)
            output += line
        self.assertEqual(output.count("listening on systemd:domain=INET6:name="), 5, output)

        def talk():
            with socket.create_connection(("::1", port["submission"]), timeout=TIMEOUT) as s:
                greeting = read_reply(s.makefile("rb"))
            context = ssl.create_default_context(
                cafile=config.load(self.config_path).tls.certificate)
            with socket.create_connection(("::1", port["pop3s"]), timeout=TIMEOUT) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                return greeting, tls.makefile("rb").readline(), tls.version()

        greeting, pop3s, version = talk()
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        self.assertTrue(pop3s.startswith(b"+OK"), pop3s)
        self.assertEqual(version, "TLSv1.3")
