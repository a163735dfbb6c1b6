"""Configure, start and stop each server the benchmark compares, in a private temp dir.

Every server gets its own directory tree, free 127.0.0.1 ports and the same mail
layout, ``<mail_root>/<domain>/<local>/Maildir``, so the driver can fill and watch
mailboxes the same way for all of them:

- Popgate:  ``twistd -n --pidfile= popgate --config <dir>/popgate.toml``; users added
            with ``popgate user add ADDR --password-stdin --config FILE``.
- Dovecot:  ``dovecot -F -c <dir>/dovecot.conf``, passwd-file users mapped to the
            ``mail`` uid (Dovecot refuses uid 0), high-performance login mode.
- Postfix:  ``postfix -c <dir>/postfix start``, its own queue and data directories,
            smtpd on a loopback port, virtual(8) delivery to Maildirs as ``mail``.
- Aiosmtpd: ``python benchmarks/aiosmtpd_peer.py`` (mailbox.Maildir handler).

``missing()`` says why a server cannot run here (None when it can).  ``start()`` waits
until every port accepts connections; ``stop()`` always ends the whole process group
(or, for Postfix, every process of the instance).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.maildirs import make_maildir
from benchmarks.procstat import ProcTree, ProcTrees

HOST = "127.0.0.1"
DOMAIN = "bench.test"
PASSWORD = "bench-Passw0rd"
REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class Options:
    """Knobs the driver passes to every server."""

    popgate_twistd: str = ""  # "" = twistd beside this Python, else on PATH
    popgate_cli: str = ""  # "" = popgate beside this Python, on PATH, or -m popgate.cli
    popgate_users: str = "clone"  # "clone": one CLI call, hash line copied; "cli": all
    dovecot_scheme: str = "ARGON2ID"
    max_procs: int = 1200  # process/client limits of Postfix and Dovecot
    tls_cert: Path | None = None  # one self-signed certificate + key for every server
    tls_key: Path | None = None
    popgate_workers: int = 1  # [server] workers (2 measured slower here: benchmarks/README)


class ServerError(RuntimeError):
    """A server could not be configured, started or stopped."""


# ------------------------------------------------------------------------ helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def beside_python(command: str) -> str | None:
    """`command` in the directory of the running Python (a venv's bin/), if there."""
    path = Path(sys.executable).parent / command
    return str(path) if path.exists() else None


def mail_owner() -> tuple[int, int]:
    """uid and gid of the system ``mail`` user."""
    entry = pwd.getpwnam("mail")
    return entry.pw_uid, entry.pw_gid


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file ("" if absent)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while /proc/PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to each PID that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process (group leader), wait, then SIGKILL its whole group."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


def run_checked(argv: list[str], what: str, timeout: float = 120.0,
                stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; raise ServerError with its output when it fails."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                              check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"{what}: {exc}") from exc
    out = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode != 0:
        raise ServerError(f"{what} failed ({done.returncode}): {out[-800:]}")
    return out


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for DOMAIN, localhost and HOST, written as
    ``cert.pem`` and ``key.pem`` (mode 0600, read by the servers as root) in `directory`;
    every server of a run presents this one (the TLS workloads)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(DOMAIN), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --------------------------------------------------------------------------- base


class Server:
    """Common shape of a benchmarked server."""

    name = "server"
    protocols: tuple[str, ...] = ()  # one listening port each (and one idle run each)
    ports_extra: tuple[str, ...] = ()  # implicit-TLS ports (only with Options.tls_cert)
    features: frozenset[str] = frozenset()  # workloads it can run (see run.NEEDS)
    owner: tuple[int, int] | None = None  # owner of mail files, None = us

    def __init__(self, root: Path, options: Options) -> None:
        self.root = root
        self.options = options
        extra = self.ports_extra if options.tls_cert is not None else ()
        self.ports = {proto: free_port() for proto in self.protocols + extra}
        self.proc: subprocess.Popen | None = None
        self.log = root / f"{self.name}.log"

    @property
    def mail_root(self) -> Path:
        """Directory holding <domain>/<local>/Maildir."""
        return self.root / "mail"

    def address(self, user: str) -> str:
        """The mail address (and POP3 login) of a local user."""
        return f"{user}@{DOMAIN}"

    def maildir(self, user: str) -> Path:
        """The Maildir of a local user."""
        return self.mail_root / DOMAIN / user / "Maildir"

    def prepare_mailbox(self, user: str) -> Path:
        """Create the user's empty Maildir (and home) owned as the server needs."""
        path = make_maildir(self.maildir(user), self.owner)
        if self.owner:
            os.chown(path.parent, *self.owner)
        return path

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        raise NotImplementedError

    def configure(self, users: list[str]) -> None:
        """Write configuration and create `users` (local parts)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until its ports accept connections."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def root_pid(self) -> int:
        """PID whose process tree is the server."""
        if self.proc is None:
            raise ServerError(f"{self.name} is not running")
        return self.proc.pid

    def tree(self) -> ProcTree:
        """The server's process tree."""
        return ProcTree(self.root_pid())

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start `argv` in its own session with output to the log, then wait for ports."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True, env=env)
        self._wait_ready(lambda: self.proc is not None and self.proc.poll() is None)

    def _wait_ready(self, alive) -> None:
        """Poll until all ports are open; raise if the server died or took too long."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(self.ports.values())
        while pending:
            if not alive():
                self.stop()
                raise ServerError(f"{self.name} exited at start:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name} did not listen within "
                                  f"{START_TIMEOUT:.0f}s:\n{tail(self.log)}")
            pending = {port for port in pending if not port_open(port)}
            if pending:
                time.sleep(0.05)


# ------------------------------------------------------------------------ popgate


class Popgate(Server):
    """popgate under twistd; configuration and users through its documented CLI."""

    name = "popgate"
    protocols = ("smtp", "pop3")
    ports_extra = ("pop3s",)
    features = frozenset({"smtp", "pop3", "pop3s", "smtptls", "smtpsource", "office"})

    @property
    def data_dir(self) -> Path:
        """popgate's [server] data_dir."""
        return self.root / "data"

    @property
    def mail_root(self) -> Path:
        """popgate keeps mail under <data_dir>/mail."""
        return self.data_dir / "mail"

    @property
    def config_path(self) -> Path:
        """The TOML configuration file."""
        return self.root / "popgate.toml"

    def _twistd(self) -> list[str]:
        if self.options.popgate_twistd:
            return shlex.split(self.options.popgate_twistd)
        return [beside_python("twistd") or "twistd"]

    def _cli(self) -> list[str]:
        if self.options.popgate_cli:
            return shlex.split(self.options.popgate_cli)
        found = beside_python("popgate") or shutil.which("popgate")
        return [found] if found else [sys.executable, "-m", "popgate.cli"]

    def _env(self) -> dict[str, str]:
        """Environment with this checkout first on PYTHONPATH, so that an uninstalled
        checkout's popgate package and twisted/plugins/ are found."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def missing(self) -> str | None:
        """twistd, the popgate plugin and the popgate CLI must all be there."""
        for what, argv in (("twistd", self._twistd()), ("popgate CLI", self._cli())):
            if not argv or not shutil.which(argv[0]):
                return f"{what} command {argv[:1]} not found"
        for what, argv in (("twistd popgate --help", [*self._twistd(), "popgate", "--help"]),
                           ("popgate --help", [*self._cli(), "--help"])):
            try:
                probe = subprocess.run(argv, capture_output=True, timeout=60, check=False,
                                       env=self._env(), cwd=self.root)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{what}: {exc}"
            if probe.returncode != 0:
                last = (probe.stderr or probe.stdout).decode(errors="replace").strip()
                last = last.splitlines()[-1] if last else f"exit status {probe.returncode}"
                return f"{what} failed (popgate not installed or incomplete?): {last}"
        return None

    def config_text(self) -> str:
        """popgate.toml for this instance."""
        return (
            "[server]\n"
            f"data_dir = {json.dumps(str(self.data_dir))}\n"
            f'hostname = "{DOMAIN}"\n'
            f"workers = {self.options.popgate_workers}\n"
            "[smtp]\n"
            f'listen = ["tcp:{self.ports["smtp"]}:interface={HOST}"]\n'
            "max_message_size = 104857600\n"
            "[pop3]\n"
            f'listen = ["tcp:{self.ports["pop3"]}:interface={HOST}"]\n'
            + self._tls_text() +
            "[submission]\n"
            "listen = []\n"
            "[limits]\n"
            "max_sessions = 5000\n"
            "max_sessions_per_ip = 5000\n"
        )

    def _tls_text(self) -> str:
        """The POP3S listener and [tls] (STARTTLS too); none without a certificate."""
        if self.options.tls_cert is None:
            return ""
        return (f'tls_listen = ["tcp:{self.ports["pop3s"]}:interface={HOST}"]\n'
                "[tls]\n"
                f"certificate = {json.dumps(str(self.options.tls_cert))}\n"
                f"key = {json.dumps(str(self.options.tls_key))}\n")

    def configure(self, users: list[str]) -> None:
        """Write popgate.toml and add the users."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        if not users:
            return
        self._add_user(users[0])
        if self.options.popgate_users == "cli" or not self._clone_users(users):
            for user in users[1:]:
                self._add_user(user)

    def _add_user(self, user: str) -> None:
        """popgate user add ADDR --password-stdin --config FILE (no newline sent)."""
        run_checked([*self._cli(), "user", "add", self.address(user), "--password-stdin",
                     "--config", str(self.config_path)],
                    f"popgate user add {user}", stdin=PASSWORD.encode(), env=self._env())

    def _clone_users(self, users: list[str]) -> bool:
        """Copy the first user's passwd-file line (same password) for the others,
        which saves one password hashing CLI run per user; False if not possible."""
        path = self.data_dir / "users"
        if not path.exists():
            return False
        prefix = self.address(users[0]) + ":"
        lines = path.read_text().splitlines()
        model = next((line for line in lines if line.startswith(prefix)), None)
        if model is None:
            return False
        rest = model[len(prefix):]
        extra = [f"{self.address(u)}:{rest}" for u in users[1:]]
        path.write_text("\n".join(lines + extra) + "\n")
        return True

    def start(self) -> None:
        """twistd -n --pidfile= popgate --config FILE."""
        self._spawn([*self._twistd(), "-n", "--pidfile=", "popgate",
                     "--config", str(self.config_path)], env=self._env())


# ------------------------------------------------------------------------ dovecot


DOVECOT_CONF = """\
# Generated by benchmarks/servers.py: a private Dovecot instance for the benchmark.
base_dir = {root}/run
state_dir = {root}/state
instance_name = {instance}
protocols = pop3
listen = {host}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {root}/dovecot.log
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{mail_root}/%d/%n/Maildir
default_client_limit = {limit}
default_process_limit = {limit}
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s}
    ssl = yes
  }}
  # high-performance mode: a few long-lived login processes serve all clients
  service_count = 0
  process_min_avail = {cores}
}}
"""


class Dovecot(Server):
    """A private Dovecot POP3 instance (dovecot-pop3d)."""

    name = "dovecot"
    protocols = ("pop3",)
    ports_extra = ("pop3s",)
    features = frozenset({"pop3", "pop3s"})

    def __init__(self, root: Path, options: Options) -> None:
        super().__init__(root, options)
        self.owner = mail_owner()

    def missing(self) -> str | None:
        """dovecot and its pop3 binary are needed."""
        if not shutil.which("dovecot"):
            return "dovecot not installed (apt-get install dovecot-core dovecot-pop3d)"
        if not Path("/usr/lib/dovecot/pop3").exists():
            return "dovecot pop3 not installed (apt-get install dovecot-pop3d)"
        return None

    def password_hash(self) -> str:
        """{SCHEME}hash of PASSWORD (doveadm pw); {PLAIN} when the scheme is PLAIN."""
        scheme = self.options.dovecot_scheme.upper()
        if scheme == "PLAIN":
            return "{PLAIN}" + PASSWORD
        return run_checked(["doveadm", "pw", "-s", scheme, "-p", PASSWORD],
                           "doveadm pw").splitlines()[-1].strip()

    def configure(self, users: list[str]) -> None:
        """Write dovecot.conf and the passwd-file."""
        uid, gid = self.owner
        (self.root / "state").mkdir(exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        secret = self.password_hash()
        lines = [f"{self.address(u)}:{secret}:{uid}:{gid}::"
                 f"{self.maildir(u).parent}::" for u in users]
        (self.root / "users").write_text("\n".join(lines) + "\n")
        (self.root / "dovecot.conf").write_text(DOVECOT_CONF.format(
            root=self.root, instance=f"bench-{self.root.name}", host=HOST,
            port=self.ports["pop3"], pop3s=self.ports["pop3s"], ssl=self._ssl_text(),
            uid=uid, gid=gid, mail_root=self.mail_root,
            limit=self.options.max_procs, cores=os.cpu_count() or 1))
        self.log = self.root / "dovecot.log"

    def _ssl_text(self) -> str:
        """dovecot.conf SSL settings: the run's certificate, TLS 1.3 only."""
        if self.options.tls_cert is None:
            raise ServerError("dovecot needs a certificate (Options.tls_cert) for POP3S")
        return (f"ssl = yes\nssl_cert = <{self.options.tls_cert}\n"
                f"ssl_key = <{self.options.tls_key}\nssl_min_protocol = TLSv1.3")

    def start(self) -> None:
        """dovecot -F -c dovecot.conf."""
        self._spawn(["dovecot", "-F", "-c", str(self.root / "dovecot.conf")])


# ------------------------------------------------------------------------ postfix


POSTFIX_MAIN = """\
# Generated by benchmarks/servers.py: a private Postfix instance for the benchmark.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = {domain}
mydomain = {domain}
myorigin = {domain}
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
message_size_limit = 104857600
default_process_limit = {limit}
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail_root}
virtual_mailbox_maps = texthash:{root}/postfix/vmailbox
virtual_minimum_uid = {uid}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_limit = 0
"""

# STARTTLS with the run's certificate (only when Options has one), TLS 1.3 only.
POSTFIX_TLS = """\
smtpd_tls_security_level = may
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_protocols = >=TLSv1.3
smtpd_tls_mandatory_protocols = >=TLSv1.3
"""

# The Debian master.cf services a virtual-only instance needs, none chrooted.
POSTFIX_MASTER = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


class Postfix(Server):
    """A private Postfix instance: ``postfix -c DIR`` with its own queue."""

    name = "postfix"
    protocols = ("smtp",)
    features = frozenset({"smtp", "smtptls", "smtpsource"})

    def __init__(self, root: Path, options: Options) -> None:
        super().__init__(root, options)
        self.owner = mail_owner()
        self.config_dir = root / "postfix"
        self.log = root / "postfix.log"
        self.master_pid: int | None = None

    def missing(self) -> str | None:
        """postfix and its master daemon are needed."""
        if not shutil.which("postfix") or not Path("/usr/lib/postfix/sbin/master").exists():
            return "postfix not installed (apt-get install postfix)"
        return None

    def configure(self, users: list[str]) -> None:
        """Write main.cf, master.cf and the virtual mailbox map."""
        uid, gid = self.owner
        self.config_dir.mkdir(exist_ok=True)
        (self.root / "queue").mkdir(exist_ok=True)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(data, postfix.pw_uid, postfix.pw_gid)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "main.cf").write_text(POSTFIX_MAIN.format(
            root=self.root, domain=DOMAIN, host=HOST, limit=self.options.max_procs,
            mail_root=self.mail_root, uid=uid, gid=gid) + self._tls_text())
        (self.config_dir / "master.cf").write_text(POSTFIX_MASTER.format(
            host=HOST, port=self.ports["smtp"]))
        (self.config_dir / "vmailbox").write_text("".join(
            f"{self.address(u)} {DOMAIN}/{u}/Maildir/\n" for u in users))

    def _tls_text(self) -> str:
        """main.cf lines for STARTTLS; none without a certificate in Options."""
        if self.options.tls_cert is None:
            return ""
        return POSTFIX_TLS.format(cert=self.options.tls_cert, key=self.options.tls_key)

    def _postfix(self, command: str) -> str:
        return run_checked(["postfix", "-c", str(self.config_dir), command],
                           f"postfix {command}")

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        """postfix -c DIR start, then wait for the master and the smtpd port."""
        try:
            self._postfix("start")
        except ServerError as exc:
            raise ServerError(f"{exc}\n{tail(self.log)}") from exc
        deadline = time.monotonic() + START_TIMEOUT
        while (pid := self._read_master_pid()) is None or not pid_alive(pid):
            if time.monotonic() > deadline:
                raise ServerError(f"postfix master did not start:\n{tail(self.log)}")
            time.sleep(0.05)
        self.master_pid = pid
        self._wait_ready(lambda: pid_alive(pid))

    def root_pid(self) -> int:
        """The Postfix master."""
        if self.master_pid is None:
            raise ServerError("postfix is not running")
        return self.master_pid

    def stop(self) -> None:
        """postfix stop; SIGKILL whatever of the instance is left after that."""
        if self.master_pid is None:
            return
        pids = ProcTree(self.master_pid).pids()
        try:
            self._postfix("stop")
        except ServerError as exc:
            print(f"note: {exc}", file=sys.stderr)
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid_alive(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_pids([p for p in pids if pid_alive(p)])
        self.master_pid = None


# ----------------------------------------------------------------------- aiosmtpd


class Aiosmtpd(Server):
    """benchmarks/aiosmtpd_peer.py in a subprocess."""

    name = "aiosmtpd"
    protocols = ("smtp",)
    features = frozenset({"smtp", "smtpsource"})

    def missing(self) -> str | None:
        """The aiosmtpd package must be importable by this interpreter."""
        probe = subprocess.run([sys.executable, "-c", "import aiosmtpd"],
                               capture_output=True, timeout=60, check=False)
        return None if probe.returncode == 0 else "aiosmtpd not installed (pip install aiosmtpd)"

    def configure(self, users: list[str]) -> None:
        """Nothing to configure: every address in the domain is accepted."""
        self.mail_root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """python aiosmtpd_peer.py --port P --mail-root DIR."""
        peer = Path(__file__).with_name("aiosmtpd_peer.py")
        self._spawn([sys.executable, str(peer), "--host", HOST, "--port",
                     str(self.ports["smtp"]), "--mail-root", str(self.mail_root),
                     "--domain", DOMAIN])


# ------------------------------------------------------------ Dovecot + Postfix


class DovecotPostfix(Server):
    """Postfix delivering into the Maildirs that Dovecot serves: the office peer.

    Both instances share one temp dir (their files do not collide: Dovecot's
    run/, state/, users; Postfix's postfix/, queue/, data/) and so one mail root."""

    name = "dovecot+postfix"
    protocols = ()
    features = frozenset({"office"})

    def __init__(self, root: Path, options: Options) -> None:
        super().__init__(root, options)
        self.dovecot = Dovecot(root, options)
        self.postfix = Postfix(root, options)
        self.parts = (self.dovecot, self.postfix)
        self.ports = {**self.dovecot.ports, **self.postfix.ports}
        self.owner = mail_owner()

    def missing(self) -> str | None:
        """Both are needed."""
        return self.dovecot.missing() or self.postfix.missing()

    def configure(self, users: list[str]) -> None:
        """Configure both for the same users."""
        for part in self.parts:
            part.configure(users)

    def start(self) -> None:
        """Dovecot, then Postfix (Dovecot is stopped again if Postfix fails)."""
        self.dovecot.start()
        try:
            self.postfix.start()
        except BaseException:
            self.dovecot.stop()
            raise

    def stop(self) -> None:
        """Stop both."""
        for part in self.parts:
            part.stop()

    def tree(self) -> ProcTrees:
        """Both process trees."""
        return ProcTrees([part.tree() for part in self.parts])


SERVERS: dict[str, type[Server]] = {
    cls.name: cls for cls in (Popgate, Dovecot, Postfix, Aiosmtpd, DovecotPostfix)
}
