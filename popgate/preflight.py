"""Checks that catch, before any client does, what would trip a real deployment.

* :func:`storage_problem` runs at start-up, as the user the server runs as (after twistd's
  ``--uid``, or systemd's ``User=``): the data directory, the Maildirs under it, the
  outbound queue directory ``<data_dir>/queue`` (where it exists) and the users file must
  be usable.  The answer is one line naming the path, its owner and mode, and the
  ``chown`` that fixes it.  The kernel decides (``os.access`` with the effective ids), so
  ACLs and capabilities count.
* :func:`config_problems` runs in ``popgate config check``, usually as root for a server
  that runs as another user: alias and catch-all targets that are not users, listen
  addresses this machine does not have, and certificate files that user cannot read
  (owner, group and mode bits of the files and of every directory above them; ACLs are
  not read).

Everything here blocks on the file system and is called before the reactor runs.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from popgate.auth.users import UserDB
from popgate.config import Config

_SEARCH_WRITE = os.R_OK | os.W_OK | os.X_OK
_ENDPOINT_KEYS = ("smtp.listen", "smtp.tls_listen", "smtp.lmtp_listen", "pop3.listen",
                  "pop3.tls_listen")


# -- start-up: the effective user -------------------------------------------------------


def storage_problem(config: Config) -> str | None:
    """One line saying what the effective user cannot use, and what to chown; or None."""
    data_dir = config.server.data_dir
    who = _effective_user()
    fix_data = f"fix with: chown -R {who}: {data_dir}"
    if not os.path.exists(data_dir):
        parent = _existing_ancestor(data_dir)
        if not _access(parent, os.W_OK | os.X_OK):
            return (f"user {who} cannot create {data_dir}: {_describe(parent)} is not "
                    f"writable; create it with: install -d -o {who} -m 700 {data_dir}")
    else:
        for directory in _storage_directories(config):
            if not _access(directory, _SEARCH_WRITE):
                return f"user {who} cannot write {_describe(directory)}; {fix_data}"
    users_file = config.users_file
    if os.path.exists(users_file) and not _access(users_file, os.R_OK):
        fix = fix_data if _inside(users_file, data_dir) else f"fix with: chown {who}: {users_file}"
        return f"user {who} cannot read {_describe(users_file)}; {fix}"
    return None


def _storage_directories(config: Config) -> Iterator[str]:
    """The data directory and every existing directory the server writes in."""
    yield config.server.data_dir
    for directory in (config.mail_root, config.queue_dir):
        if os.path.isdir(directory):
            yield directory
    for domain in _subdirectories(config.mail_root):
        yield domain
        for local in _subdirectories(domain):
            yield local
            maildir = os.path.join(local, "Maildir")
            for sub in ("", "tmp", "new", "cur"):
                path = os.path.join(maildir, sub)
                if os.path.isdir(path):
                    yield path.rstrip(os.sep)


def _subdirectories(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, PermissionError):
        return []  # a directory we cannot list has been reported by its own check


def _access(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _effective_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _existing_ancestor(path: str) -> str:
    path = os.path.dirname(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _describe(path: str) -> str:
    """``/var/lib/popgate (owner root:root, mode 0700)``."""
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path} (owner {_user_name(st.st_uid)}:{_group_name(st.st_gid)}, " \
           f"mode {stat.S_IMODE(st.st_mode):04o})"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- config check: another user ---------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A user as the file system sees it: uid and every group it is in."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account:
        """@raise KeyError: no such user."""
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def owner_of(cls, path: str) -> Account:
        uid = os.stat(path).st_uid
        try:
            return cls.named(pwd.getpwuid(uid).pw_name)
        except KeyError:
            return cls(str(uid), uid, frozenset())

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        return cls(_user_name(uid), uid, frozenset({os.getegid(), *os.getgroups()}))

    def allowed(self, st: os.stat_result, bits: int) -> bool:
        """Whether the mode bits give this user ``bits`` (4 read, 2 write, 1 search)."""
        if self.uid == 0:
            return True
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid == self.uid:
            granted = mode >> 6
        elif st.st_gid in self.gids:
            granted = mode >> 3
        else:
            granted = mode
        return granted & bits == bits


def unreadable(path: str, account: Account) -> str | None:
    """Why ``account`` cannot read the file ``path`` (one phrase), or None if it can."""
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    parents = []
    while True:
        parents.append(directory)
        if directory == os.path.dirname(directory):
            break
        directory = os.path.dirname(directory)
    for directory in reversed(parents):
        if not account.allowed(os.stat(directory), 1):
            return f"{_describe(directory)} is not searchable by {account.name}"
    if not account.allowed(os.stat(real), 4):
        return f"{_describe(real)} is not readable by {account.name}"
    return None


def config_problems(config: Config, account: Account) -> list[str]:
    """Problems start-up would not catch, one line each (``popgate config check``)."""
    users = UserDB(config.users_file)
    problems = []
    for alias, targets in config.aliases.items():
        kind = "catch-all" if alias.startswith("@") else "alias"
        for target in targets:
            if users.get(target) is None:
                problems.append(f"aliases.{alias!r}: {kind} target {target} is not a user "
                                "(mail for it would be skipped)")
    for key in _ENDPOINT_KEYS:
        section, _, name = key.partition(".")
        for description in getattr(getattr(config, section), name):
            problem = endpoint_problem(description)
            if problem:
                problems.append(f"{key}: {description}: {problem}")
    if config.tls.enabled:
        for key, path in (("tls.certificate", config.tls.certificate),
                          ("tls.key", config.tls.key)):
            problem = unreadable(path, account)
            if problem:
                problems.append(f"{key}: {problem}, the user popgate runs as")
    return problems


def endpoint_problem(description: str) -> str | None:
    """Why this listen endpoint cannot work on this machine, or None (no socket listens)."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if description.startswith("systemd:"):
        return None  # the socket comes from systemd; only the unit says what it is
    endpoint = serverFromString(MemoryReactor(), description)
    endpoint = getattr(endpoint, "_wrappedEndpoint", endpoint)  # haproxy:
    interface = getattr(endpoint, "_interface", None)
    if interface:
        return _interface_problem(interface)
    address = getattr(endpoint, "_address", None)
    if isinstance(address, str) and not os.path.isdir(os.path.dirname(address) or "."):
        return f"directory {os.path.dirname(address)} does not exist"
    return None


def _interface_problem(interface: str) -> str | None:
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return f"interface {interface!r} is not an IP address"
    if address.is_unspecified:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    # Binding port 0 (and never listening) asks the kernel whether the address is ours.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((interface, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{interface} is not an address of this machine"
            return f"cannot use {interface}: {e.strerror}"
    return None
