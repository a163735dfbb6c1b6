"""End-to-end test support: a real ``twistd -n popgate`` process and real client programs.

:func:`start_twistd` writes a configuration (all listeners on port 0 of 127.0.0.1 unless
told otherwise), starts ``twistd -n popgate`` as a child process (optionally in PID and
UTS namespaces of its own, as if on another machine), reads the ports it logged, and
stops it with SIGTERM at test clean-up.  :func:`run_client` runs a client program without
blocking the reactor.  :func:`require_tool` skips a test when a client program is missing,
except under CI (``CI`` set), where a missing tool is a failure.

For several nodes: :func:`start_gluster_volume` starts a private ``glusterd`` and mounts
one one-brick GlusterFS volume several times through FUSE (root only), and
:func:`start_haproxy` runs HAProxy in front of the nodes and reads its servers' health
states.  Both tear everything down at clean-up, so that a rerun starts from nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import poplib
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import FailTest, SkipTest

from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.store.maildir import Maildir, MaildirStore, commit

_log = Logger()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LISTENING = re.compile(
    rb"popgate (\w+) listening on (\S+) \(\w+Address\(type='\w+', host='([^']*)', port=(\d+)")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} is not installed", f"{name} is not installed; .ci/run must install it")


def unavailable(reason: str, in_ci: str | None = None):
    """Skip the test with ``reason``; under CI (``CI`` set) fail instead (``in_ci``)."""
    if os.environ.get("CI"):
        raise AssertionError(in_ci or f"{reason} (CI must provide it)")
    raise SkipTest(reason)


def require_fuse_mounts() -> None:
    """Mounting a FUSE file system needs root and ``/dev/fuse``."""
    if os.geteuid() != 0:
        unavailable("mounting a FUSE file system needs root")
    if not os.path.exists("/dev/fuse"):
        unavailable("no /dev/fuse: FUSE mounts are unavailable here")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (bind port 0, read it, close), for
    configurations that need a number, such as HAProxy's.  Another program could take it
    before it is used; on a test machine that is rare enough."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_directory(testcase) -> str:
    """A new directory with a short path (for UNIX sockets: at most 107 bytes), removed
    at clean-up; trial's own temporary paths are too long."""
    path = tempfile.mkdtemp(prefix="popgate-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def deferred_sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until(condition, what, timeout: float = 20.0, every: float = 0.05):
    """Wait until ``condition()`` is true; after ``timeout`` seconds fail the test with
    ``what``: a string, or a callable giving one (read then: a log tail, a state)."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise FailTest("timed out waiting for " + (what() if callable(what) else what))
        yield deferred_sleep(every)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_private(path: str, text: str) -> str:
    """Client configuration files with passwords must be 0600 (fetchmail, mpop insist)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    return path


def without_trace_headers(stored: bytes) -> bytes:
    """The message as the client sent it: drop Return-Path, Delivered-To and Received."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: ")
    index = 3
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


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
def start_twistd(testcase, settings: dict[str, dict] | None = None, users=(), timeout=30.0,
                 namespace_host: str | None = None):
    """Start ``twistd -n popgate``; every listener defaults to 127.0.0.1 port 0.

    ``settings`` are config sections merged over the test defaults (``server.data_dir``
    may point elsewhere, e.g. to a shared volume); ``users`` are ``(name, password)``
    pairs created ({PLAIN}, fast) before the server starts.  With ``namespace_host``,
    the server runs in new PID and UTS namespaces with that host name: to it, as to
    another machine, no process of ours exists (its own pid is 1).
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    merged: dict[str, dict] = {
        "server": {"data_dir": os.path.join(directory, "data"), "hostname": "mx.test"},
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "pop3": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "submission": {"listen": ["tcp:0:interface=127.0.0.1"]},
    }
    for section, table in (settings or {}).items():
        merged.setdefault(section, {}).update(table)
    config_path = os.path.join(directory, "popgate.toml")
    write_config(config_path, merged)
    server = Server(directory, config_path, merged["server"]["data_dir"])
    for name, password in users:
        server.add_user(name, password)

    yield spawn_twistd(testcase, server, timeout, namespace_host)
    return server


@defer.inlineCallbacks
def spawn_twistd(testcase, server: Server, timeout=30.0, namespace_host: str | None = None):
    """Start ``twistd -n popgate`` on the server's configuration (again, after a crash
    test killed it: the same data directory, new ports); ``namespace_host`` as for
    :func:`start_twistd`."""
    proc = _TwistdProtocol()
    args = [twistd_path(), "-n", "--pidfile=", "--logfile=-", "popgate", "--config",
            server.config_path]
    if namespace_host:
        args = _in_namespaces(namespace_host, args)
    transport = reactor.spawnProcess(proc, args[0], args, env=child_env(),
                                     path=server.directory)
    server.process = proc
    server.pid = transport.pid

    def stop():
        if proc.ended.called:
            return None
        with contextlib.suppress(ProcessLookupError):  # ended, not yet reaped
            os.kill(server.pid, signal.SIGTERM)
        return proc.ended

    testcase.addCleanup(stop)
    if namespace_host:
        server.pid = yield _child_pid(transport.pid)
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


def _in_namespaces(host_name: str, args: list[str]) -> list[str]:
    """``args`` run as the first process of new PID and UTS namespaces named ``host_name``.

    ``unshare --fork`` ignores SIGTERM itself: signals go to the child
    (:func:`_child_pid`); if unshare dies, the child is killed with it.
    """
    return [require_tool("unshare"), "--pid", "--uts", "--fork", "--kill-child=SIGKILL",
            "sh", "-c", 'hostname "$0" && exec "$@"', host_name, *args]


@defer.inlineCallbacks
def _child_pid(pid: int, timeout: float = 10.0):
    """The pid (in our namespace) of the only child of process ``pid``, once it exists."""
    path = f"/proc/{pid}/task/{pid}/children"
    for _ in range(int(timeout / 0.05)):
        with open(path) as f:
            children = f.read().split()
        if children:
            return int(children[0])
        yield deferred_sleep(0.05)
    raise AssertionError(f"process {pid} started no child in {timeout} s")


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


class ProxiedPOP3(poplib.POP3):
    """poplib straight to a ``haproxy:`` listener: it sends the PROXY protocol (v1) header
    itself, naming ``client_ip`` (TEST-NET-3 unless told) as the client."""

    def __init__(self, host: str, port: int, client_ip: str = "203.0.113.9", **kwargs):
        self.client_ip = client_ip
        super().__init__(host, port, **kwargs)

    def _create_socket(self, timeout):
        sock = super()._create_socket(timeout)
        sock.sendall(f"PROXY TCP4 {self.client_ip} {self.host} 40000 {self.port}\r\n".encode())
        return sock


# -- daemons: GlusterFS and HAProxy ------------------------------------------------------


def _start_daemon(testcase, args: list[str], stop_signal=signal.SIGTERM) -> _Collect:
    """Run ``args`` in the foreground as our child; stopped with ``stop_signal`` and
    waited for at clean-up.  Its output collects in ``out``/``err``."""
    daemon = _Collect(b"")
    transport = reactor.spawnProcess(daemon, args[0], args, env=os.environ.copy())

    def stop():
        if daemon.done.called:
            return None
        transport.signalProcess(stop_signal)
        return daemon.done

    testcase.addCleanup(stop)
    return daemon


@defer.inlineCallbacks
def _wait_until(condition, what: str, daemon: _Collect | None = None, timeout: float = 20.0):
    """Poll ``condition()`` every 50 ms; fail with ``what`` (and the daemon's output)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        if daemon is not None and daemon.done.called:
            break
        yield deferred_sleep(0.05)
    if daemon is not None and daemon.done.called:
        output = (daemon.out + daemon.err).decode("utf-8", "replace")
        raise AssertionError(f"{what}: the process exited\n{output}")
    raise AssertionError(f"{what}: not done after {timeout} s")


@defer.inlineCallbacks
def _check_call(args: list[str]):
    """Run a command; its stdout, or an AssertionError with everything it said."""
    out, err, code = yield run_client(args, timeout=60.0)
    if code != 0:
        raise AssertionError(f"{' '.join(args)}: exit {code}\n{out.decode()}{err.decode()}")
    return out


def loopback_host_name(testcase) -> str:
    """The machine's host name, resolving to a loopback address.

    ``gluster volume create`` refuses ``localhost`` and ``127.0.0.1`` as a brick's host,
    but takes the machine's own name when ``/etc/hosts`` maps it to 127.0.0.1.  If no
    mapping exists, one is added (and logged) and removed again at clean-up.
    """
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except socket.gaierror:
        address = None
    if address is None:
        line = f"127.0.0.1 {name}  # added by popgate's tests\n"
        with open("/etc/hosts", "a", encoding="utf-8") as f:
            f.write(line)
        _log.info("added '127.0.0.1 {name}' to /etc/hosts for GlusterFS", name=name)
        testcase.addCleanup(_remove_line, "/etc/hosts", line)
    elif not ipaddress.ip_address(address).is_loopback:
        unavailable(f"the host name {name} resolves to {address}, not to a loopback "
                    "address: GlusterFS traffic would leave the machine")
    return name


def _remove_line(path: str, line: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if line in lines:
        lines.remove(line)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)


GLUSTERD_PORT = 24007  # where bricks and clients find glusterd: not configurable for them


def _require_free_port(port: int, reason: str) -> None:
    with socket.socket() as sock:
        # As a server binds: connections of a previous run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise AssertionError(f"port {port}: {e.strerror}: {reason}") from None


_GLUSTERD_VOL = """\
volume management
    type mgmt/glusterd
    option working-directory {state}
    option run-directory {run}
    option logging-directory {logs}
    option glusterd-sockfile {run}/glusterd.socket
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
end-volume
"""


@dataclass
class GlusterVolume:
    """One started GlusterFS volume and the FUSE mounts of it (one per node)."""

    name: str
    host: str
    brick: str
    mounts: list[str]
    cli: list[str]  # the gluster command, talking to our glusterd only


@defer.inlineCallbacks
def start_gluster_volume(testcase, mounts: int = 2, volume_options: dict | None = None,
                         mount_options: str = "") -> GlusterVolume:
    """A private ``glusterd``, one volume with one brick on local disk, mounted ``mounts``
    times through FUSE; all torn down at clean-up (unmount, stop and delete the volume,
    stop glusterd, remove its state).

    glusterd keeps its state, sockets and logs in the test's directory and listens on
    127.0.0.1 only, on GlusterFS's fixed management port (:data:`GLUSTERD_PORT`: a brick
    finds glusterd there, whatever glusterd.vol says).
    """
    require_fuse_mounts()
    glusterd = require_tool("glusterd")
    cli = [require_tool("gluster")]
    require_tool("mount.glusterfs")
    host = loopback_host_name(testcase)
    _require_free_port(GLUSTERD_PORT, "a glusterd is running already; this test starts its "
                                      "own (stop the other: systemctl stop glusterd)")
    directory = os.path.abspath(testcase.mktemp())
    paths = {part: os.path.join(directory, part) for part in ("state", "logs", "brick")}
    for path in paths.values():
        os.makedirs(path)
    paths["run"] = short_directory(testcase)  # UNIX socket paths are short
    testcase.addCleanup(shutil.rmtree, directory, True)
    volfile = os.path.join(directory, "glusterd.vol")
    with open(volfile, "w", encoding="utf-8") as f:
        f.write(_GLUSTERD_VOL.format(**paths))
    logs = paths["logs"]
    daemon = _start_daemon(testcase, [glusterd, "--no-daemon", "-f", volfile,
                                      f"--log-file={logs}/glusterd.log"])
    socket_path = os.path.join(paths["run"], "glusterd.socket")
    yield _wait_until(lambda: os.path.exists(socket_path), "glusterd start", daemon)
    cli += [f"--glusterd-sock={socket_path}", "--mode=script", f"--log-file={logs}/cli.log"]
    volume = GlusterVolume("popgate", host, paths["brick"], [], cli)
    yield _check_call([*cli, "volume", "create", volume.name, f"{host}:{volume.brick}",
                       "force"])
    testcase.addCleanup(_check_call, [*cli, "volume", "delete", volume.name])
    for key, value in (volume_options or {}).items():
        yield _check_call([*cli, "volume", "set", volume.name, key, value])
    yield _check_call([*cli, "volume", "start", volume.name])
    testcase.addCleanup(_stop_volume, volume, paths["run"])
    for index in range(mounts):
        mount_point = os.path.join(directory, f"mount{index}")
        os.makedirs(mount_point)
        options = ",".join(filter(None, [f"log-file={logs}/mount{index}.log", mount_options]))
        yield _check_call(["mount", "-t", "glusterfs", "-o", options,
                           f"{host}:/{volume.name}", mount_point])
        testcase.addCleanup(_check_call, ["umount", mount_point])
        yield _wait_until(lambda p=mount_point: os.path.ismount(p), f"mount {mount_point}")
        volume.mounts.append(mount_point)
    return volume


@defer.inlineCallbacks
def _stop_volume(volume: GlusterVolume, run_dir: str):
    """Stop the volume and remove its brick process's socket, which glusterd leaves in
    the system's /run/gluster whatever its run directory."""
    sockets = _brick_sockets(run_dir)
    yield _check_call([*volume.cli, "volume", "stop", volume.name])
    for path in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _brick_sockets(run_dir: str) -> list[str]:
    """The ``-S`` socket of every brick process started from ``run_dir``."""
    found = []
    for root, _, names in os.walk(os.path.join(run_dir, "vols")):
        for name in names:
            if not name.endswith(".pid"):
                continue
            with contextlib.suppress(OSError, ValueError):
                pid = int(read(os.path.join(root, name)))
                args = read(f"/proc/{pid}/cmdline").split(b"\0")
                found.append(args[args.index(b"-S") + 1].decode())
    return found


@dataclass
class HAProxy:
    """A running HAProxy and its administration socket."""

    config_path: str
    admin_socket: str
    process: _Collect

    def command(self, text: str) -> defer.Deferred:
        """Send one command to the admin socket (e.g. ``disable server b/s``); fires
        with the answer."""
        return threads.deferToThread(self._command, text)

    def _command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.admin_socket)
            sock.sendall(text.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    @defer.inlineCallbacks
    def states(self):
        """Fires with {"backend/server": "UP" | "DOWN" | "MAINT" ...} (``show stat``)."""
        states = {}
        for line in (yield self.command("show stat")).splitlines():
            fields = line.split(",")
            if len(fields) > 17 and not line.startswith("#") \
                    and fields[1] not in ("FRONTEND", "BACKEND"):
                states[f"{fields[0]}/{fields[1]}"] = fields[17].split(" ")[0]
        return states

    @defer.inlineCallbacks
    def wait_for(self, expected: dict[str, str], timeout: float = 20.0):
        """Wait until every server named in ``expected`` is in its state there."""
        states = {}
        for _ in range(int(timeout / 0.05)):
            states = yield self.states()
            if all(states.get(name) == state for name, state in expected.items()):
                return
            yield deferred_sleep(0.05)
        raise AssertionError(f"HAProxy servers: {states}, expected {expected}")


@defer.inlineCallbacks
def start_haproxy(testcase, config: str) -> HAProxy:
    """Run ``haproxy -db`` on ``config`` plus a ``global`` section with an admin socket
    in the test's directory; stopped at clean-up."""
    haproxy = require_tool("haproxy")
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    admin_socket = os.path.join(short_directory(testcase), "admin.sock")
    config_path = os.path.join(directory, "haproxy.cfg")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(f"global\n    stats socket {admin_socket} mode 600 level admin\n\n{config}")
    yield _check_call([haproxy, "-c", "-q", "-f", config_path])
    daemon = _start_daemon(testcase, [haproxy, "-db", "-f", config_path])
    yield _wait_until(lambda: os.path.exists(admin_socket), "haproxy start", daemon)
    return HAProxy(config_path, admin_socket, daemon)
