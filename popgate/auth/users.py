"""The user database: a Dovecot-compatible passwd-file, password schemes, a cred checker.

File format (one user a line, Dovecot's ``passwd-file``)::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...[:uid:gid:gecos:home:...]

Fields after the password are kept verbatim when popgate rewrites the file; comments and
blank lines are kept too.  Schemes: ``{ARGON2ID}`` (default; libsodium through PyNaCl, as
in Dovecot), ``{BLF-CRYPT}`` (bcrypt) and ``{PLAIN}`` / ``{CLEAR}`` (only useful for APOP
labs; warned about).

Concurrency: the server only reads.  :class:`UserDB` re-reads the file when its ``stat``
identity changed, so ``popgate user add`` is seen by a running server without a restart.
It checks that identity at most once per second (an ``os.stat`` per ``RCPT`` or login
showed in profiles), except after a miss: a name or domain that is not in the cached
table makes it look again at once, so a user added a moment ago is found at once, and a
changed password or a removed user is seen within a second.  Writers (the CLI) hold an
``flock`` on ``<file>.lock`` for the read-modify-write and replace the file atomically
(temp file, fsync, rename, directory fsync), keeping the file's owner, group and mode
(mode 0600 and the directory's owner for a new file).
Password verification is slow on purpose; :class:`PasswordChecker` runs it through an
injected ``run_in_thread`` so it never blocks the reactor.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import bcrypt
import nacl.exceptions
import nacl.pwhash
import nacl.pwhash.argon2id
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popgate.addresses import AddressError, normalise_user, split_user
from popgate.fileio import write_atomically

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "PLAIN")
DEFAULT_SCHEME = "ARGON2ID"
_VANISHED = (0, 0, 0, -1)  # UserDB's file identity while a loaded users file is missing
_NO_USERS = "# no users"  # what UserFile writes rather than an empty file
_BCRYPT_MAX = 72  # bcrypt ignores (bcrypt>=5: refuses) bytes past 72

log = Logger()


class UserError(Exception):
    """A user-database problem worth showing to the operator as is."""


# Dovecot's parameters (m=64 MiB, t=3, p=1).  libsodium is the library Dovecot itself uses:
# its AVX2/AVX-512 code verifies a hash in about 0.6 of the time of argon2-cffi's portable
# build, which is most of a POP3 login.  Verification reads the parameters from the hash,
# so hashes made elsewhere with any m, t and p (e.g. argon2-cffi's p=4) still verify.
_ARGON2_OPS = 3
_ARGON2_MEM = 64 * 1024 * 1024
# libsodium answers a malformed hash like a wrong password; this shape check lets the
# operator hear about a damaged users file.  (PHC string format, version 19 only.)  It
# also refuses hashes of 128 bytes or more, which libsodium cannot read (argon2-cffi
# makes them with hash_len or salt_len raised well above their defaults).
_ARGON2ID_MAX = 127
_ARGON2ID_SHAPE = re.compile(
    rb"\$argon2id?\$v=19\$m=[0-9]{1,10},t=[0-9]{1,10},p=[0-9]{1,3}"
    rb"\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}")


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """Return the stored form ``{SCHEME}...`` of ``password``."""
    secret = password.encode("utf-8")
    if scheme == "ARGON2ID":
        stored = nacl.pwhash.argon2id.str(secret, opslimit=_ARGON2_OPS, memlimit=_ARGON2_MEM)
        return "{ARGON2ID}" + stored.decode("ascii")
    if scheme == "BLF-CRYPT":
        if len(secret) > _BCRYPT_MAX:
            raise UserError(f"BLF-CRYPT passwords are limited to {_BCRYPT_MAX} bytes")
        return "{BLF-CRYPT}" + bcrypt.hashpw(secret, bcrypt.gensalt()).decode("ascii")
    if scheme == "PLAIN":
        return "{PLAIN}" + password
    raise UserError(f"unknown password scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def split_scheme(stored: str) -> tuple[str, str]:
    """``"{SCHEME}rest"`` -> ``("SCHEME", "rest")``; no prefix means PLAIN, as in Dovecot."""
    if stored.startswith("{") and "}" in stored:
        scheme, _, rest = stored[1:].partition("}")
        scheme = scheme.upper()
        return ("PLAIN" if scheme == "CLEAR" else scheme), rest
    return "PLAIN", stored


def verify_password(password: bytes, stored: str) -> bool:
    """Check ``password`` against a stored ``{SCHEME}hash``; slow; call off the reactor."""
    scheme, rest = split_scheme(stored)
    if scheme == "ARGON2ID":
        encoded = rest.encode("utf-8")
        if not _ARGON2ID_SHAPE.fullmatch(encoded):
            log.warn("malformed ARGON2ID hash in the user database")
            return False
        if len(encoded) > _ARGON2ID_MAX:
            log.warn("an ARGON2ID hash in the user database is longer than libsodium's "
                     "{limit} bytes; set that password again", limit=_ARGON2ID_MAX)
            return False
        try:
            # nacl.pwhash.verify reads the variant from the hash: an older $argon2i$
            # hash under {ARGON2ID} verifies too, as it does in Dovecot (libsodium).
            return nacl.pwhash.verify(encoded, password)
        except nacl.exceptions.InvalidkeyError:
            return False
    if scheme == "BLF-CRYPT":
        if len(password) > _BCRYPT_MAX:
            return False
        try:
            return bcrypt.checkpw(password, rest.encode("ascii"))
        except ValueError:
            log.warn("malformed BLF-CRYPT hash in the user database")
            return False
    if scheme == "PLAIN":
        # An empty field ("alice@example.org" or "alice@example.org:") is no password at
        # all, not the empty password.
        return bool(rest) and hmac.compare_digest(password, rest.encode("utf-8"))
    log.warn("unsupported password scheme {scheme} in the user database", scheme=scheme)
    return False


@dataclass(frozen=True)
class User:
    name: str  # normalised local@domain
    password: str  # stored {SCHEME}hash
    extra: str = ""  # the raw fields after the password, without the leading ':'

    @property
    def domain(self) -> str:
        return split_user(self.name)[1]

    @property
    def local(self) -> str:
        return split_user(self.name)[0]

    def line(self) -> str:
        return f"{self.name}:{self.password}" + (f":{self.extra}" if self.extra else "")


def parse_line(line: str) -> User | None:
    """Parse one passwd-file line; None for comments and blank lines."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    name, _, rest = line.partition(":")
    password, _, extra = rest.partition(":")
    return User(normalise_user(name), password, extra)


class UsersUnavailable(Exception):
    """The users file exists but has never loaded (unreadable, empty or unparseable):
    callers answer with a temporary error (``451 4.3.0``, ``-ERR [SYS/TEMP]``)."""


class UserDB:
    """Read access to the passwd-file, re-read whenever the file changes on disk.

    The file's identity is checked at most once per ``interval`` seconds of ``clock``, and
    again at once when a lookup misses (see the module docstring).

    A file that cannot serve (see :func:`_unusable_reason`: unreadable, a directory, empty,
    binary, or without one valid user line) never replaces the users loaded before: they
    are kept, and one error line naming the file and the problem is logged, again every
    ``fault_log_interval`` seconds while it lasts (its identity is not remembered, so the
    file is read again at the next check, whatever its ``stat`` says).
    If no file has loaded yet, lookups raise :class:`UsersUnavailable` instead: a
    permanent "no such user" would make senders bounce the mail.  A file that does not
    exist (yet) is no users, not a fault.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic,
                 interval: float = 1.0, fault_log_interval: float = 60.0):
        self.path = path
        self._clock = clock
        self._interval = interval
        self._fault_log_interval = fault_log_interval
        self._checked: float | None = None  # clock reading at the last stat
        self._identity: tuple[int, int, int, int] | None = None
        self._loaded = False  # a file has loaded (or there was none) at least once
        self._fault: str | None = None  # why the file on disk is not used now
        self._fault_logged: float | None = None
        self._users: dict[str, User] = {}
        self._domains: frozenset[str] = frozenset()

    def get(self, name: str) -> User | None:
        """The user called ``name`` (any case), or None; UsersUnavailable if none loaded."""
        key = name.lower()
        looked = self._refresh()
        user = self._users.get(key)
        if user is None and not looked:
            self._refresh(force=True)
            user = self._users.get(key)
        self._require_loaded()
        return user

    def has_domain(self, domain: str) -> bool:
        """Whether at least one user is in ``domain`` (lowercase)."""
        looked = self._refresh()
        if domain in self._domains:
            return True
        if not looked:
            self._refresh(force=True)
        self._require_loaded()
        return domain in self._domains

    def domains(self) -> frozenset[str]:
        """Every domain that has at least one user."""
        self._refresh()
        self._require_loaded()
        return self._domains

    def users(self) -> list[User]:
        """Every loaded user (none while the file has never loaded: a listing)."""
        self._refresh(force=True)
        return sorted(self._users.values(), key=lambda u: u.name)

    def first(self) -> User | None:
        """The first user in the file (``popgate init``'s, or the oldest one added)."""
        self._refresh()
        return next(iter(self._users.values()), None)

    def reload(self) -> int:
        """Read the file again now, even if its stat looks unchanged (SIGHUP); the count."""
        self._identity = None
        self._refresh(force=True)
        return len(self._users)

    def _require_loaded(self) -> None:
        if not self._loaded and self._fault is not None:
            raise UsersUnavailable(f"{self.path} {self._fault}")

    def _refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed; True if it was looked at (not throttled)."""
        now = self._clock()
        if not force and self._checked is not None and now - self._checked < self._interval:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._identity not in (None, _VANISHED):
                # Gone after it was loaded (an editor's rename, a restore in progress):
                # forgetting every user would bounce all mail with 550 5.1.1 meanwhile.
                log.warn("{path} has disappeared; keeping the {n} users loaded before",
                         path=self.path, n=len(self._users))
                self._identity = _VANISHED  # warn once; re-read when it is back
            elif self._identity is None and self._fault is None:
                self._loaded = True  # no file yet: no users, not a fault
            return True
        except OSError as e:
            self._unusable(f"cannot be read: {e.strerror}", now)
            return True
        # ctime too: a chmod that makes the file unreadable (or readable again) changes
        # nothing else.
        identity = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if identity == self._identity:
            return True
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._unusable(f"cannot be read: {e.strerror}", now)
            return True
        users, bad = _parse_users(data)
        reason = _unusable_reason(data, users, bad)
        if reason is not None:
            self._unusable(reason, now)
            return True
        for number, e in bad:
            log.warn("{path}:{n}: ignoring bad user name: {e}", path=self.path, n=number, e=e)
        if self._fault is not None:
            log.info("{path} is usable again: {n} users", path=self.path, n=len(users))
        self._users = users
        self._domains = frozenset(u.domain for u in users.values())
        self._identity = identity
        self._loaded, self._fault = True, None
        return True

    def _unusable(self, reason: str, now: float) -> None:
        """Keep what was loaded; say so loudly, at a bounded rate."""
        self._identity = None  # read it again at the next check, whatever its stat says
        repeat = (self._fault_logged is not None
                  and now - self._fault_logged < self._fault_log_interval)
        if reason != self._fault or not repeat:
            self._fault_logged = now
            if self._loaded:
                log.error("users file {path} {reason}; keeping the {n} users loaded "
                          "before until it is fixed", path=self.path, reason=reason,
                          n=len(self._users))
            else:
                log.error("users file {path} {reason}; no users are loaded: mail and "
                          "logins get temporary errors until it is fixed",
                          path=self.path, reason=reason)
        self._fault = reason


def _parse_users(data: bytes) -> tuple[dict[str, User], list[tuple[int, AddressError]]]:
    """The users of a passwd-file's bytes, and the (line number, error) of bad lines."""
    users: dict[str, User] = {}
    bad = []
    # A stray non-UTF-8 byte spoils one line (skipped), not every login.  Lines are split
    # as text files are (universal newlines), as UserFile does.
    text = data.decode("utf-8", errors="replace")
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        try:
            user = parse_line(line)
        except AddressError as e:
            bad.append((number, e))
            continue
        if user:
            users[user.name] = user
    return users, bad


def _unusable_reason(data: bytes, users: dict[str, User], bad: list) -> str | None:
    """Why a users file must not replace the users loaded before, or None.

    An empty file (``: > users``, or an in-place rewrite caught half-way), binary data or
    a file whose lines are all bad is a fault, not "nobody lives here": taking it would
    bounce every recipient.  A few bad lines among good ones are only skipped.  A file of
    comments only means no users, on purpose: ``popgate user del`` of the last user
    leaves one (:data:`_NO_USERS`).
    """
    if b"\0" in data:
        return "is not a text file (it contains NUL bytes)"
    if not users and bad:
        number, e = bad[0]
        return f"has no valid user line (line {number}: {e})"
    if not data.strip():
        return "is empty"
    return None  # comments only: no users, on purpose (UserFile writes _NO_USERS)


class UserFile:
    """Read-modify-write access for the admin command; one writer at a time (flock)."""

    def __init__(self, path: str):
        self.path = path

    @contextmanager
    def editing(self) -> Iterator[list[str]]:
        """Yield the file's lines for editing in place; write them back atomically."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = self._read_lines()
            yield lines
            self._write_atomically(lines)

    def add(self, name: str, password_hash: str) -> User:
        name = normalise_user(name)
        _check_storable(password_hash)
        with self.editing() as lines:
            if _find(lines, name) is not None:
                raise UserError(f"user {name} already exists")
            user = User(name, password_hash)
            lines.append(user.line())
        return user

    def set_password(self, name: str, password_hash: str) -> None:
        name = normalise_user(name)
        _check_storable(password_hash)
        with self.editing() as lines:
            index = _require(lines, name)
            old = parse_line(lines[index])
            lines[index] = User(name, password_hash, old.extra).line()

    def delete(self, name: str) -> None:
        name = normalise_user(name)
        with self.editing() as lines:
            del lines[_require(lines, name)]

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                # Split as UserDB reads (universal newlines), not str.splitlines(), which
                # also breaks at \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029 inside a field.
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        if lines[-1] == "":
            lines.pop()
        return lines

    def _write_atomically(self, lines: list[str]) -> None:
        # Never an empty file: the server takes that for a fault (see _unusable_reason).
        lines = [line for line in lines if line != _NO_USERS] or [_NO_USERS]
        # Keep the file's owner, group and mode: run as root, `popgate user add` must not
        # leave a file the server's user cannot read.  A new file takes its directory's
        # owner and group (mode 0600).
        like = self.path if os.path.exists(self.path) else os.path.dirname(self.path) or "."
        write_atomically(self.path, "".join(line + "\n" for line in lines).encode("utf-8"),
                         like=like)


def _check_storable(password_hash: str) -> None:
    if any(c in password_hash for c in ":\r\n"):
        raise UserError("a password containing ':' or a line break cannot be stored "
                        "in the passwd-file (use a hashed scheme)")


def _find(lines: list[str], name: str) -> int | None:
    for index, line in enumerate(lines):
        try:
            user = parse_line(line)
        except AddressError:
            continue
        if user and user.name == name:
            return index
    return None


def _require(lines: list[str], name: str) -> int:
    index = _find(lines, name)
    if index is None:
        raise UserError(f"no such user {name}")
    return index


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """RFC 1939 §7 APOP: the client proves it knows the secret by MD5(timestamp + secret)."""

    def __init__(self, username: str, timestamp: bytes, digest: bytes):
        self.username = username
        self._timestamp, self._digest = timestamp, digest.lower()

    def checkPassword(self, secret: bytes) -> bool:
        expected = hashlib.md5(self._timestamp + secret).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self._digest)


@implementer(ICredentialsChecker)
class PasswordChecker:
    """twisted.cred checker over :class:`UserDB`; the avatar id is the normalised user name.

    An unknown user is verified against a dummy hash of the default scheme, so that it
    costs the same time as a wrong password (no user enumeration by timing).
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, users: UserDB, run_in_thread: Callable[..., defer.Deferred]):
        self._users = users
        self._run_in_thread = run_in_thread
        self._dummy: str | None = None

    def requestAvatarId(self, credentials) -> defer.Deferred:
        # UsersUnavailable (the users file never loaded) fails the Deferred, not the call.
        if IUsernamePassword.providedBy(credentials):
            return defer.maybeDeferred(self._check_password, credentials)
        return defer.maybeDeferred(self._check_apop, credentials)

    def _lookup(self, username: bytes | str) -> User | None:
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        try:
            return self._users.get(normalise_user(username))
        except AddressError:
            return None

    def _check_password(self, credentials) -> defer.Deferred:
        user = self._lookup(credentials.username)
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if user is not None:
            d = self._run_in_thread(verify_password, password, user.password)
        else:
            d = self._run_in_thread(self._verify_unknown, password)

        def decide(ok: bool) -> str:
            if ok and user is not None:
                return user.name
            raise error.UnauthorizedLogin()

        return d.addCallback(decide)

    def _check_apop(self, credentials) -> defer.Deferred:
        user = self._lookup(credentials.username)
        if user is not None:
            scheme, secret = split_scheme(user.password)
            if (scheme == "PLAIN" and secret
                    and credentials.checkPassword(secret.encode("utf-8"))):
                return defer.succeed(user.name)
        return defer.fail(error.UnauthorizedLogin())

    def _verify_unknown(self, password: bytes) -> bool:
        # In the thread, like a real verification: the dummy hash is made here too, so
        # the first unknown user does not stall the reactor for a whole hash.
        verify_password(password, self._dummy_hash())
        return False

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = hash_password(secrets.token_urlsafe(16))
        return self._dummy
