"""End-to-end test support: a real ``twistd -n popgate`` process and real client programs.

:func:`start_twistd` writes a configuration (all listeners on port 0 of 127.0.0.1 unless
told otherwise), starts ``twistd -n popgate`` as a child process, reads the ports it
logged, and stops it with SIGTERM at test clean-up.  :func:`run_client` runs a client
program without blocking the reactor.  :func:`require_tool` skips a test when a client
program is missing, except under CI (``CI`` set), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.store.maildir import Maildir, MaildirStore, commit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LISTENING = re.compile(
    rb"popgate (\w+) listening on (\S+) \(\w+Address\(type='\w+', host='([^']*)', port=(\d+)")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        raise AssertionError(f"{name} is not installed; .ci/run must install it")
    raise SkipTest(f"{name} is not installed")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_private(path: str, text: str) -> str:
    """Client configuration files with passwords must be 0600 (fetchmail, mpop insist)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    return path


def read_reply(stream) -> bytes:
    """One complete (possibly multi-line) SMTP reply from a socket's file."""
    reply = b""
    while True:
        line = stream.readline()
        reply += line
        if not line or line[3:4] == b" ":
            return reply


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else require_tool("twistd")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: str, settings: dict[str, dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for section, table in settings.items():
            f.write(f"[{section}]\n")
            for key, value in table.items():
                name = toml_value(key) if section == "aliases" else key
                f.write(f"{name} = {toml_value(value)}\n")


@dataclass
class Server:
    """A running popgate process and where to reach it."""

    directory: str
    config_path: str
    data_dir: str
    ports: dict[str, list[int]] = field(default_factory=dict)
    process: protocol.ProcessProtocol | None = None
    pid: int | None = None

    def port(self, label: str) -> int:
        return self.ports[label][0]

    def add_user(self, name: str, password: str = "secret", scheme: str = "PLAIN") -> None:
        UserFile(os.path.join(self.data_dir, "users")).add(name, hash_password(password, scheme))

    def maildir(self, user: str) -> str:
        local, _, domain = user.partition("@")
        return os.path.join(self.data_dir, "mail", domain, local, "Maildir")

    def store(self, user: str, messages) -> Maildir:
        """Put ``messages`` (LF-terminated bytes) straight into the user's Maildir, as a
        delivery would; the Maildir, for a scan."""
        users = UserDB(os.path.join(self.data_dir, "users"))
        store = MaildirStore(os.path.join(self.data_dir, "mail"), "e2e.test")
        maildir = store.maildir(users.get(user))
        for body in messages:
            message = store.new_message(maildir)
            message.write(body)
            commit([message])
        return maildir

    def messages(self, user: str) -> list[str]:
        """Paths of the messages in the user's Maildir (new/ then cur/), sorted by name."""
        root = self.maildir(user)
        found = []
        for sub in ("new", "cur"):
            directory = os.path.join(root, sub)
            if os.path.isdir(directory):
                found += sorted(os.path.join(directory, n) for n in os.listdir(directory))
        return found

    @property
    def log(self) -> bytes:
        return self.process.output if self.process else b""


class _TwistdProtocol(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.listening: list[tuple[str, int]] = []
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.listening = [(m.group(1).decode(), int(m.group(4)))
                          for m in _LISTENING.finditer(self.output)]
        if b"popgate ready" in self.output and not self.ready.called:
            self.ready.callback(self.listening)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(
                "twistd exited before listening:\n" + self.output.decode("utf-8", "replace")))
        self.ended.callback(reason.value.exitCode)


@defer.inlineCallbacks
def start_twistd(testcase, settings: dict[str, dict] | None = None, users=(), timeout=30.0):
    """Start ``twistd -n popgate``; every listener defaults to 127.0.0.1 port 0.

    ``settings`` are config sections merged over the test defaults; ``users`` are
    ``(name, password)`` pairs created ({PLAIN}, fast) before the server starts.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    data_dir = os.path.join(directory, "data")
    merged: dict[str, dict] = {
        "server": {"data_dir": data_dir, "hostname": "mx.test"},
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "pop3": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "submission": {"listen": ["tcp:0:interface=127.0.0.1"]},
    }
    for section, table in (settings or {}).items():
        merged.setdefault(section, {}).update(table)
    config_path = os.path.join(directory, "popgate.toml")
    write_config(config_path, merged)
    server = Server(directory, config_path, data_dir)
    for name, password in users:
        server.add_user(name, password)

    yield spawn_twistd(testcase, server, timeout)
    return server


@defer.inlineCallbacks
def spawn_twistd(testcase, server: Server, timeout=30.0):
    """Start ``twistd -n popgate`` on the server's configuration (again, after a crash
    test killed it: the same data directory, new ports)."""
    proc = _TwistdProtocol()
    args = [twistd_path(), "-n", "--pidfile=", "--logfile=-", "popgate", "--config",
            server.config_path]
    transport = reactor.spawnProcess(proc, args[0], args, env=child_env(),
                                     path=server.directory)
    server.process = proc
    server.pid = transport.pid

    def stop():
        if proc.ended.called:
            return None
        transport.signalProcess(signal.SIGTERM)
        return proc.ended

    testcase.addCleanup(stop)
    timer = reactor.callLater(timeout, proc.ready.cancel)
    try:
        listening = yield proc.ready
    finally:
        if timer.active():
            timer.cancel()
    server.ports = {}
    for label, port in listening:
        server.ports.setdefault(label, []).append(port)
    return server


def run_client(args: list[str], stdin: bytes = b"", env: dict | None = None,
               path: str | None = None, timeout: float = 120.0) -> defer.Deferred:
    """Run a client program; fire with (stdout, stderr, exit code).  Never blocks.

    The default environment is ours without ``PYTHON*`` variables: client programs such as
    getmail run on the system Python, which must not load this interpreter's modules
    (trial -j gives its workers a PYTHONPATH).
    """
    executable = require_tool(args[0]) if os.sep not in args[0] else args[0]
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    d = _spawn_with_stdin(executable, args, stdin, env, path) if stdin else \
        getProcessOutputAndValue(executable, args[1:], env=env, path=path)
    return d.addTimeout(timeout, reactor)


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes):
        self.stdin, self.out, self.err = stdin, b"", b""
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.done.callback((self.out, self.err, reason.value.exitCode))


def _spawn_with_stdin(executable, args, stdin, env, path) -> defer.Deferred:
    collect = _Collect(stdin)
    reactor.spawnProcess(collect, executable, args, env=env, path=path)
    return collect.done
