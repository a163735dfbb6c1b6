"""Asyncio SMTP and POP3 load generator used by benchmarks/run.py.

It talks to the server under test through raw asyncio streams (no smtplib/poplib), so
its costs are small and identical for every server, and it never imports popgate.

Workloads (each an ``async def ..._workload`` returning a flat dict of metrics):

- smtp:   N messages over C connections (EHLO, then MAIL/RCPT/DATA per message,
          MAIL+RCPT+DATA pipelined when PIPELINING is advertised); accepted msgs/s,
          DATA-end -> 250 latency, then delivered msgs/s by polling Maildir ``new/``.
- pop3:   M concurrent sessions (USER/PASS, STAT, UIDL, LIST, RETR all, QUIT), each
          RETR checked: un-dot-stuffed octets (with CRLF) must equal LIST's size.
- bigbox: login+STAT+UIDL+QUIT on a huge mailbox, cold then warm.
- bigmsg: RETR of one big message with the server's RSS sampled every 10 ms.
- idle:   many connections held open after the greeting; memory per connection.
- logins: a steady rate of USER/PASS/QUIT logins while one logged-in session sends
          NOOP at a fixed interval; NOOP latency shows whether logins stall others.

Server CPU (whole process tree, see procstat) is read before and after a workload.
Message helpers produce CRLF messages of an exact size whose body contains lines that
need dot-stuffing, and their LF (Maildir) form.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procstat import ProcTree, ProcTrees, RssSampler

CRLF = b"\r\n"
READ_CHUNK = 256 * 1024
MIB = 1024 * 1024

# Body lines: 70 printable characters each, some of them needing dot-stuffing.
_BODY_LINES = (
    b".",
    b"..two leading dots",
    b".one leading dot",
    b"The quick brown fox jumps over the lazy dog; pack my box with jugs.",
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_=+",
    b"",
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.",
    b"From here on, a line that mbox would have quoted.",
)
_BODY_BLOCK = b"".join(line + CRLF for line in _BODY_LINES)


class ProtocolError(Exception):
    """The server answered something the load generator did not expect."""


# --------------------------------------------------------------------------- stats


def percentile(values: list[float], pct: float) -> float | None:
    """Linear-interpolated percentile (0-100) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, keeping None."""
    return None if seconds is None else seconds * 1000.0


def rate(count: float, seconds: float) -> float | None:
    """count / seconds, None for an empty interval."""
    return count / seconds if seconds > 0 else None


# ------------------------------------------------------------------------ messages


def make_message(size: int, ident: str, rcpt: str = "user@bench.test") -> bytes:
    """A CRLF message of exactly `size` octets, ending in CRLF, with a unique header."""
    header = (
        f"From: Load Generator <loadgen@loadgen.test>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: benchmark message {ident}\r\n"
        f"Message-ID: <{ident}@loadgen.test>\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"\r\n"
    ).encode("ascii")
    room = size - len(header)
    if room < 2:
        raise ValueError(f"message size {size} is too small for the headers")
    blocks = (room - 2) // len(_BODY_BLOCK)
    tail = room - blocks * len(_BODY_BLOCK)
    return header + _BODY_BLOCK * blocks + b"x" * (tail - 2) + CRLF


def dot_stuff(message: bytes) -> bytes:
    """SMTP DATA payload: `message` (CRLF, ending in CRLF) dot-stuffed plus ".CRLF"."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def unstuffed_length(body: bytes) -> int:
    """Octets of a multi-line POP3 body once the leading dots are removed."""
    stuffed = body.count(b"\r\n.") + (1 if body.startswith(b".") else 0)
    return len(body) - stuffed


def has_bare_lf(body: bytes) -> bool:
    """True when some LF in `body` is not preceded by CR."""
    return body.count(b"\n") != body.count(CRLF)


def to_maildir(message: bytes) -> bytes:
    """The LF-terminated form a Maildir stores."""
    return message.replace(CRLF, b"\n")


# ---------------------------------------------------------------------- connection


class Conn:
    """A buffered line / multi-line reader and writer over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None = None) -> Conn:
        """Connect to host:port (with implicit TLS when `tls` is given)."""
        reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK,
                                                       ssl=tls)
        return cls(reader, writer)

    async def start_tls(self, tls: ssl.SSLContext) -> None:
        """Upgrade the connection in place (after STARTTLS/STLS was accepted)."""
        if self.buf:
            raise ProtocolError("server sent data before the TLS handshake")
        await self.writer.start_tls(tls)

    async def _fill(self) -> None:
        chunk = await self.reader.read(READ_CHUNK)
        if not chunk:
            raise ProtocolError("connection closed by server")
        self.buf += chunk

    async def read_line(self) -> bytes:
        """One line without its CRLF."""
        start = 0
        while (end := self.buf.find(CRLF, start)) < 0:
            start = max(0, len(self.buf) - 1)
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    async def read_multiline(self) -> bytes:
        """The body of a POP3 multi-line reply (after its status line), still
        dot-stuffed, ending in CRLF unless empty; the ".CRLF" is consumed."""
        while len(self.buf) < 3:
            await self._fill()
        if self.buf.startswith(b".\r\n"):
            del self.buf[:3]
            return b""
        start = 0
        while (end := self.buf.find(b"\r\n.\r\n", start)) < 0:
            start = max(0, len(self.buf) - 4)
            await self._fill()
        body = bytes(self.buf[:end + 2])
        del self.buf[:end + 5]
        return body

    def send(self, data: bytes) -> None:
        """Queue bytes for sending."""
        self.writer.write(data)

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark."""
        await self.writer.drain()

    def close(self) -> None:
        """Close the connection (FIN) without waiting."""
        self.writer.close()


# ---------------------------------------------------------------------------- SMTP


async def smtp_reply(conn: Conn) -> tuple[int, list[bytes]]:
    """Read one (possibly multi-line) SMTP reply: code and text lines."""
    lines = []
    while True:
        line = await conn.read_line()
        if len(line) < 3 or not line[:3].isdigit():
            raise ProtocolError(f"bad SMTP reply line {line[:80]!r}")
        lines.append(line[4:])
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def smtp_expect(conn: Conn, code: int) -> list[bytes]:
    """Read a reply and raise ProtocolError unless it has `code`."""
    got, lines = await smtp_reply(conn)
    if got != code:
        raise ProtocolError(f"expected {code}, got {got} {b' '.join(lines)[:120]!r}")
    return lines


def client_tls() -> ssl.SSLContext:
    """The load generator's TLS client context: TLS 1.3 only.  The servers present a
    self-signed certificate made for the run; it is not verified (loopback only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def smtp_open(host: str, port: int,
                    tls: ssl.SSLContext | None = None) -> tuple[Conn, bool]:
    """Connect, read the greeting, send EHLO (and with `tls`, STARTTLS and EHLO again);
    return (conn, PIPELINING advertised)."""
    conn = await Conn.open(host, port)
    try:
        await smtp_expect(conn, 220)
        conn.send(b"EHLO loadgen.test\r\n")
        lines = await smtp_expect(conn, 250)
        if tls is not None:
            conn.send(b"STARTTLS\r\n")
            await smtp_expect(conn, 220)
            await conn.start_tls(tls)
            conn.send(b"EHLO loadgen.test\r\n")
            lines = await smtp_expect(conn, 250)
    except BaseException:
        conn.close()
        raise
    keywords = {line.split(b" ")[0].upper() for line in lines[1:] if line}
    return conn, b"PIPELINING" in keywords


@dataclass
class SmtpStats:
    """Counters shared by the SMTP connections of one run."""

    accepted: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    pipelined: bool = False
    errors: list[str] = field(default_factory=list)


async def _smtp_envelope(conn: Conn, sender: str, rcpt: str, pipelining: bool) -> bool:
    """Send MAIL, RCPT and DATA; True when the server is waiting for the body."""
    commands = [f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode(),
                b"DATA\r\n"]
    codes = []
    if pipelining:
        conn.send(b"".join(commands))
        for _ in commands:
            codes.append((await smtp_reply(conn))[0])
    else:
        for command in commands:
            conn.send(command)
            codes.append((await smtp_reply(conn))[0])
            if codes[-1] >= 400:
                break
    if codes[-1] == 354 and not all(200 <= c < 300 for c in codes[:-1]):
        conn.send(b".\r\n")  # DATA accepted without a recipient: end it empty
        await smtp_reply(conn)
        codes[-1] = 0
    if codes[-1] != 354:
        conn.send(b"RSET\r\n")
        await smtp_reply(conn)
        return False
    return True


async def _smtp_send(conn: Conn, sender: str, rcpt: str, payload: bytes,
                     pipelining: bool, stats: SmtpStats) -> None:
    """One transaction; counts it and its DATA-end -> reply latency in `stats`."""
    if not await _smtp_envelope(conn, sender, rcpt, pipelining):
        stats.rejected += 1
        return
    conn.send(payload)
    await conn.drain()
    started = time.perf_counter()
    code, _ = await smtp_reply(conn)
    stats.latencies.append(time.perf_counter() - started)
    if code == 250:
        stats.accepted += 1
    else:
        stats.rejected += 1


async def _smtp_connection(host: str, port: int, sender: str,
                           jobs: list[tuple[str, bytes]], stats: SmtpStats,
                           tls: ssl.SSLContext | None = None) -> None:
    """One connection sending every (rcpt, dot-stuffed payload) in `jobs`."""
    conn, pipelining = await smtp_open(host, port, tls)
    stats.pipelined = pipelining
    try:
        for rcpt, payload in jobs:
            await _smtp_send(conn, sender, rcpt, payload, pipelining, stats)
        conn.send(b"QUIT\r\n")
        await smtp_reply(conn)
    finally:
        conn.close()


def count_new(maildirs: list[Path]) -> int:
    """Number of files in the new/ directories of `maildirs`."""
    total = 0
    for maildir in maildirs:
        with contextlib.suppress(FileNotFoundError):
            total += len(os.listdir(maildir / "new"))
    return total


async def wait_delivered(maildirs: list[Path], target: int, timeout: float,
                         poll: float = 0.02) -> tuple[int, float | None]:
    """Poll until `target` files exist in new/; return (count, time.perf_counter()
    when reached, or None after `timeout` seconds)."""
    deadline = time.perf_counter() + timeout
    while True:
        count = count_new(maildirs)
        now = time.perf_counter()
        if count >= target:
            return count, now
        if now > deadline:
            return count, None
        await asyncio.sleep(poll)


@dataclass
class SmtpLoad:
    """Parameters of the SMTP workload."""

    host: str
    port: int
    messages: int
    conns: int
    recipients: list[str]
    maildirs: list[Path]
    size: int = 4096
    sender: str = "loadgen@loadgen.test"
    deliver_timeout: float = 120.0
    tls: ssl.SSLContext | None = None  # STARTTLS on every connection


def _smtp_jobs(load: SmtpLoad) -> list[list[tuple[str, bytes]]]:
    """Split the messages round-robin over the connections, payloads pre-built."""
    jobs: list[list[tuple[str, bytes]]] = [[] for _ in range(load.conns)]
    for i in range(load.messages):
        rcpt = load.recipients[i % len(load.recipients)]
        payload = dot_stuff(make_message(load.size, f"m{i:010d}", rcpt))
        jobs[i % load.conns].append((rcpt, payload))
    return [j for j in jobs if j]


async def smtp_workload(load: SmtpLoad, tree: ProcTree) -> dict:
    """Send the messages, then wait for their delivery to the Maildirs."""
    jobs = _smtp_jobs(load)
    stats = SmtpStats()
    baseline = count_new(load.maildirs)
    cpu0, own0 = tree.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    results = await asyncio.gather(
        *(_smtp_connection(load.host, load.port, load.sender, j, stats, load.tls)
          for j in jobs),
        return_exceptions=True)
    sent = time.perf_counter()
    own1 = time.process_time()
    stats.errors = [repr(r) for r in results if isinstance(r, BaseException)]
    count, done = await wait_delivered(load.maildirs, baseline + stats.accepted,
                                       load.deliver_timeout)
    cpu = tree.cpu_seconds() - cpu0
    return {
        "accepted_per_s": rate(stats.accepted, sent - started),
        "delivered_per_s": rate(count - baseline, done - started) if done else None,
        "data_p50_ms": ms(percentile(stats.latencies, 50)),
        "data_p99_ms": ms(percentile(stats.latencies, 99)),
        "cpu_ms_per_msg": cpu * 1000 / stats.accepted if stats.accepted else None,
        "loadgen_cpu_pct": 100 * (own1 - own0) / (sent - started),
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "delivered": count - baseline,
        "pipelining": stats.pipelined,
        "errors": len(stats.errors) + stats.rejected + (stats.accepted - count + baseline),
        "first_error": stats.errors[0] if stats.errors else None,
    }


# ---------------------------------------------------------------------------- POP3


class Pop3:
    """A minimal POP3 client session."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None = None) -> Pop3:
        """Connect (implicit TLS with `tls`) and read the +OK greeting."""
        session = cls(await Conn.open(host, port, tls))
        try:
            await session.status()
        except BaseException:
            session.close()
            raise
        return session

    async def status(self) -> bytes:
        """Read a status line; raise ProtocolError on -ERR."""
        line = await self.conn.read_line()
        if not line.startswith(b"+OK"):
            raise ProtocolError(f"POP3 error: {line[:120]!r}")
        return line

    async def command(self, line: str) -> bytes:
        """Send a single-line command and return its +OK status line."""
        self.conn.send(line.encode() + CRLF)
        return await self.status()

    async def multi(self, line: str) -> bytes:
        """Send a multi-line command and return its (dot-stuffed) body."""
        await self.command(line)
        return await self.conn.read_multiline()

    async def login(self, user: str, password: str) -> None:
        """USER/PASS."""
        await self.command(f"USER {user}")
        await self.command(f"PASS {password}")

    async def listing(self, line: str) -> dict[int, bytes]:
        """UIDL or LIST as {message number: second field}."""
        body = await self.multi(line)
        result = {}
        for entry in body.split(CRLF):
            if entry:
                number, value = entry.split(b" ", 1)
                result[int(number)] = value
        return result

    async def quit(self) -> None:
        """QUIT and close."""
        try:
            await self.command("QUIT")
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection."""
        self.conn.close()


@dataclass
class Pop3Stats:
    """Counters shared by the POP3 sessions of one run."""

    retrs: int = 0
    octets: int = 0
    sessions: list[float] = field(default_factory=list)
    size_mismatch: int = 0
    bare_lf: int = 0
    wrong_size: int = 0
    count_mismatch: int = 0


def check_retr(body: bytes, listed: int, expected: int | None, stats: Pop3Stats) -> int:
    """Verify one RETR body against LIST's size (and the size the driver wrote)."""
    octets = unstuffed_length(body)
    if octets != listed:
        stats.size_mismatch += 1
    if expected is not None and octets != expected:
        stats.wrong_size += 1
    if has_bare_lf(body):
        stats.bare_lf += 1
    return octets


class Gate:
    """Lets waiters through once each of `parties` has arrived or dropped out."""

    def __init__(self, parties: int) -> None:
        self.pending = parties
        self.opened = asyncio.Event()

    def _leave(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.opened.set()

    def drop(self) -> None:
        """A party that will never arrive (its login failed)."""
        self._leave()

    async def arrive(self) -> None:
        """Arrive and wait for the others."""
        self._leave()
        await self.opened.wait()


async def pop3_session(host: str, port: int, user: str, password: str,
                       expected_size: int | None, stats: Pop3Stats, gate: Gate,
                       tls: ssl.SSLContext | None = None) -> None:
    """login, (wait at `gate` for the other clients' logins), STAT, UIDL, LIST, RETR
    every message, QUIT.  The session time excludes the wait at the gate."""
    started = time.perf_counter()
    arrived = False
    try:
        session = await Pop3.open(host, port, tls)
    except BaseException:
        gate.drop()
        raise
    try:
        await session.login(user, password)
        login_time = time.perf_counter() - started
        arrived = True
        await gate.arrive()
        started = time.perf_counter() - login_time
        count = int((await session.command("STAT")).split()[1])
        uids = await session.listing("UIDL")
        sizes = {n: int(v) for n, v in (await session.listing("LIST")).items()}
        if not len(uids) == len(sizes) == count:
            stats.count_mismatch += 1
        for number in sorted(sizes):
            body = await session.multi(f"RETR {number}")
            stats.octets += check_retr(body, sizes[number], expected_size, stats)
            stats.retrs += 1
        await session.quit()
    finally:
        session.close()
        if not arrived:
            gate.drop()
    stats.sessions.append(time.perf_counter() - started)


@dataclass
class Pop3Load:
    """Parameters of the POP3 workload: one session per user, all concurrent."""

    host: str
    port: int
    users: list[str]
    password: str
    messages: int
    size: int = 4096
    tls: ssl.SSLContext | None = None  # implicit TLS (POP3S)


async def pop3_workload(load: Pop3Load, tree: ProcTree) -> dict:
    """Run one session per user concurrently and verify every RETR.

    All clients log in first; rates and the server CPU per RETR are measured from the
    moment the last one is logged in (password hashing is the logins workload's
    business), the CPU including the logins is reported as cpu_us_per_retr_all."""
    stats = Pop3Stats()
    gate = Gate(len(load.users))
    cpu_all = tree.cpu_seconds()
    sessions = asyncio.gather(
        *(pop3_session(load.host, load.port, u, load.password, load.size, stats, gate,
                       load.tls)
          for u in load.users),
        return_exceptions=True)
    opened = asyncio.ensure_future(gate.opened.wait())
    await asyncio.wait([sessions, opened], return_when=asyncio.FIRST_COMPLETED)
    opened.cancel()
    cpu0, own0 = tree.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    results = await sessions
    elapsed = time.perf_counter() - started
    own = time.process_time() - own0
    cpu1 = tree.cpu_seconds()
    cpu, cpu_all = cpu1 - cpu0, cpu1 - cpu_all
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    missing = len(load.users) * load.messages - stats.retrs
    return {
        "retr_per_s": rate(stats.retrs, elapsed),
        "mb_per_s": rate(stats.octets / 1e6, elapsed),
        "session_p50_ms": ms(percentile(stats.sessions, 50)),
        "session_p99_ms": ms(percentile(stats.sessions, 99)),
        "cpu_us_per_retr": cpu * 1e6 / stats.retrs if stats.retrs else None,
        "cpu_us_per_retr_all": cpu_all * 1e6 / stats.retrs if stats.retrs else None,
        "loadgen_cpu_pct": 100 * own / elapsed,
        "retrs": stats.retrs,
        "size_mismatches": stats.size_mismatch,
        "wrong_sizes": stats.wrong_size,
        "bare_lf": stats.bare_lf,
        "errors": len(errors) + missing + stats.count_mismatch + stats.size_mismatch
        + stats.bare_lf + stats.wrong_size,
        "first_error": errors[0] if errors else None,
    }


# ------------------------------------------------------------------ big mailbox


async def stat_uidl_session(host: str, port: int, user: str, password: str) -> tuple[float, int]:
    """login+STAT+UIDL+QUIT; return (seconds, number of UIDL entries)."""
    started = time.perf_counter()
    session = await Pop3.open(host, port)
    try:
        await session.login(user, password)
        await session.command("STAT")
        uids = await session.listing("UIDL")
        await session.quit()
    finally:
        session.close()
    return time.perf_counter() - started, len(uids)


async def bigbox_workload(host: str, port: int, user: str, password: str,
                          messages: int, warm_runs: int = 5) -> dict:
    """Cold (first) and warm (median of the next `warm_runs`) STAT+UIDL sessions."""
    cold, seen = await stat_uidl_session(host, port, user, password)
    warm = []
    for _ in range(warm_runs):
        seconds, seen_warm = await stat_uidl_session(host, port, user, password)
        warm.append(seconds)
        seen = min(seen, seen_warm)
    return {
        "cold_ms": ms(cold),
        "warm_ms": ms(statistics.median(warm)) if warm else None,
        "messages_seen": seen,
        "errors": 0 if seen == messages else 1,
    }


# ------------------------------------------------------------------ big message


async def bigmsg_workload(host: str, port: int, user: str, password: str,
                          size: int, tree: ProcTree) -> dict:
    """RETR one big message while sampling the server tree's RSS every 10 ms."""
    session = await Pop3.open(host, port)
    try:
        await session.login(user, password)
        listed = int((await session.command("LIST 1")).split()[2])
        base_hwm = tree.reset_hwm()  # so that login-time peaks (argon2) do not mask it
        base_rss = tree.rss_kib()
        sampler = RssSampler(tree)
        sampler.start()
        cpu0 = tree.cpu_seconds()
        started = time.perf_counter()
        try:
            body = await session.multi("RETR 1")
        finally:
            elapsed = time.perf_counter() - started
            peak = sampler.stop()
        cpu = tree.cpu_seconds() - cpu0
        hwm = tree.hwm_kib()
        await session.quit()
    finally:
        session.close()
    octets = unstuffed_length(body)
    hwm_growth = sum(v - base_hwm.get(pid, 0) for pid, v in hwm.items())
    return {
        "mb_per_s": rate(octets / 1e6, elapsed),
        "rss_growth_mib": (peak - base_rss) / 1024,
        "hwm_growth_mib": hwm_growth / 1024,
        "cpu_ms": cpu * 1000,
        "samples": sampler.samples,
        "errors": int(octets != listed) + int(octets != size) + int(has_bare_lf(body)),
    }


# ------------------------------------------------------------------------- idle


async def _open_idle(host: str, port: int, gate: asyncio.Semaphore) -> Conn:
    """Connect and read the greeting line, at most `gate` connects at a time."""
    async with gate:
        conn = await Conn.open(host, port)
        try:
            await conn.read_line()
        except BaseException:
            conn.close()
            raise
        return conn


async def idle_workload(host: str, port: int, count: int, tree: ProcTree,
                        settle: float = 1.0, parallel: int = 50) -> dict:
    """Hold `count` connections open after their greeting; memory per connection."""
    await asyncio.sleep(settle)
    base_rss, base_pss = tree.rss_kib(), tree.pss_kib()
    gate = asyncio.Semaphore(parallel)
    started = time.perf_counter()
    results = await asyncio.gather(*(_open_idle(host, port, gate) for _ in range(count)),
                                   return_exceptions=True)
    opened = [r for r in results if isinstance(r, Conn)]
    elapsed = time.perf_counter() - started
    try:
        await asyncio.sleep(settle)
        pids = tree.pids()
        rss, pss = tree.rss_kib(pids), tree.pss_kib(pids)
    finally:
        for conn in opened:
            conn.close()
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "rss_kib_per_conn": (rss - base_rss) / count,
        "pss_kib_per_conn": (pss - base_pss) / count,
        "open_per_s": rate(len(opened), elapsed),
        "opened": len(opened),
        "processes": len(pids),
        "errors": len(failed),
        "first_error": failed[0] if failed else None,
    }


# ----------------------------------------------------------------------- logins


async def _noop_loop(session: Pop3, interval: float, stop: asyncio.Event,
                     latencies: list[float]) -> None:
    """Send NOOP every `interval` seconds (fixed schedule) until `stop` is set."""
    tick = time.perf_counter()
    while not stop.is_set():
        started = time.perf_counter()
        await session.command("NOOP")
        latencies.append(time.perf_counter() - started)
        tick += interval
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))


async def _one_login(host: str, port: int, user: str, password: str,
                     latencies: list[float]) -> None:
    """Connect, USER/PASS, QUIT; record connect-to-PASS-OK time."""
    started = time.perf_counter()
    session = await Pop3.open(host, port)
    try:
        await session.login(user, password)
        latencies.append(time.perf_counter() - started)
        await session.quit()
    finally:
        session.close()


@dataclass
class LoginLoad:
    """Parameters of the login-storm workload."""

    host: str
    port: int
    users: list[str]
    noop_user: str
    password: str
    rate: float = 20.0
    seconds: float = 5.0
    noop_interval: float = 0.02


async def _login_storm(load: LoginLoad, latencies: list[float]) -> list:
    """Start logins at a fixed rate, independent of their completion."""
    tasks = []
    started = time.perf_counter()
    for i in range(max(1, round(load.rate * load.seconds))):
        await asyncio.sleep(max(0.0, started + i / load.rate - time.perf_counter()))
        user = load.users[i % len(load.users)]
        tasks.append(asyncio.ensure_future(
            _one_login(load.host, load.port, user, load.password, latencies)))
    return await asyncio.gather(*tasks, return_exceptions=True)


async def logins_workload(load: LoginLoad, tree: ProcTree) -> dict:
    """NOOP latency of a logged-in session during a storm of logins."""
    noop = await Pop3.open(load.host, load.port)
    noops: list[float] = []
    logins: list[float] = []
    try:
        await noop.login(load.noop_user, load.password)
        stop = asyncio.Event()
        cpu0 = tree.cpu_seconds()
        ticker = asyncio.ensure_future(_noop_loop(noop, load.noop_interval, stop, noops))
        try:
            results = await _login_storm(load, logins)
        finally:
            stop.set()
            await ticker
        cpu = tree.cpu_seconds() - cpu0
        await noop.quit()
    finally:
        noop.close()
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "noop_p50_ms": ms(percentile(noops, 50)),
        "noop_p99_ms": ms(percentile(noops, 99)),
        "noop_max_ms": ms(max(noops)) if noops else None,
        "login_p50_ms": ms(percentile(logins, 50)),
        "login_p99_ms": ms(percentile(logins, 99)),
        "logins_ok": len(logins),
        "cpu_ms_per_login": cpu * 1000 / len(results) if results else None,
        "errors": len(failed),
        "first_error": failed[0] if failed else None,
    }


# ------------------------------------------------------------------- smtp-source


@dataclass
class SmtpSourceLoad:
    """Postfix's `smtp-source` as the SMTP client: ``-l SIZE -m N -s CONNS``, one
    recipient, delivery counted in its Maildir as for the smtp workload."""

    host: str
    port: int
    messages: int
    conns: int
    recipient: str
    maildir: Path
    size: int = 4096
    sender: str = "loadgen@loadgen.test"
    deliver_timeout: float = 120.0
    command: str = "smtp-source"


async def smtp_source_workload(load: SmtpSourceLoad, tree: ProcTree) -> dict:
    """Run smtp-source to completion, then wait for every message in new/."""
    baseline = count_new([load.maildir])
    cpu0 = tree.cpu_seconds()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        load.command, "-l", str(load.size), "-m", str(load.messages), "-s", str(load.conns),
        "-f", load.sender, "-t", load.recipient, f"{load.host}:{load.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    sent = time.perf_counter()
    count, done = await wait_delivered([load.maildir], baseline + load.messages,
                                       load.deliver_timeout)
    cpu = tree.cpu_seconds() - cpu0
    delivered = count - baseline
    problem = output.decode(errors="replace").strip().splitlines()[:1]
    return {
        "sent_per_s": rate(load.messages, sent - started),
        "delivered_per_s": rate(delivered, done - started) if done else None,
        "cpu_ms_per_msg": cpu * 1000 / delivered if delivered else None,
        "delivered": delivered,
        "errors": int(proc.returncode != 0) + (load.messages - delivered),
        "first_error": (f"smtp-source exit {proc.returncode}: {problem}"
                        if proc.returncode or problem else None),
    }


# ---------------------------------------------------------------- office morning


@dataclass
class OfficeLoad:
    """An office morning: every user logs in once (sessions start at a steady rate
    over `seconds`), STAT, UIDL, RETR of every message, QUIT; meanwhile `smtp_conns`
    connections deliver to random users of the office at `smtp_rate` messages/s."""

    host: str
    smtp_port: int
    pop3_port: int
    users: list[str]
    password: str
    seconds: float = 20.0
    smtp_rate: float = 20.0
    smtp_conns: int = 4
    size: int = 4096
    sender: str = "loadgen@loadgen.test"
    seed: int = 17


@dataclass
class OfficeStats:
    """What the office sessions saw."""

    sessions: list[float] = field(default_factory=list)
    retrs: int = 0
    problems: int = 0  # STAT/UIDL count disagreements, bare LFs in RETR


async def office_session(load: OfficeLoad, user: str, stats: OfficeStats) -> None:
    """login, STAT, UIDL, RETR of each message, QUIT; timed from connect to QUIT's reply."""
    started = time.perf_counter()
    session = await Pop3.open(load.host, load.pop3_port)
    try:
        await session.login(user, load.password)
        count = int((await session.command("STAT")).split()[1])
        uids = await session.listing("UIDL")
        if len(uids) != count:
            stats.problems += 1
        for number in sorted(uids):
            body = await session.multi(f"RETR {number}")
            if has_bare_lf(body):
                stats.problems += 1
            stats.retrs += 1
        await session.quit()
    finally:
        session.close()
    stats.sessions.append(time.perf_counter() - started)


async def _office_smtp(load: OfficeLoad, conn_index: int, stop: float,
                       stats: SmtpStats) -> None:
    """One SMTP connection sending at rate smtp_rate / smtp_conns on a fixed schedule."""
    conn, pipelining = await smtp_open(load.host, load.smtp_port)
    interval = load.smtp_conns / load.smtp_rate
    pick = random.Random(load.seed + conn_index)
    tick = time.perf_counter() + conn_index * interval / load.smtp_conns
    sent = 0
    try:
        while tick < stop:
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            rcpt = pick.choice(load.users)
            payload = dot_stuff(make_message(load.size, f"o{conn_index}-{sent}", rcpt))
            await _smtp_send(conn, load.sender, rcpt, payload, pipelining, stats)
            sent += 1
            tick += interval
        conn.send(b"QUIT\r\n")
        await smtp_reply(conn)
    finally:
        conn.close()


async def office_workload(load: OfficeLoad, tree: ProcTree | ProcTrees) -> dict:
    """Sessions at a steady start rate plus steady SMTP; session and 250 latencies."""
    stats, smtp = OfficeStats(), SmtpStats()
    cpu0 = tree.cpu_seconds()
    started = time.perf_counter()
    stop = started + load.seconds
    senders = [asyncio.ensure_future(_office_smtp(load, i, stop, smtp))
               for i in range(load.smtp_conns)]
    sessions = []
    for i, user in enumerate(load.users):
        await asyncio.sleep(max(0.0, started + i * load.seconds / len(load.users)
                                - time.perf_counter()))
        sessions.append(asyncio.ensure_future(office_session(load, user, stats)))
    results = await asyncio.gather(*sessions, *senders, return_exceptions=True)
    elapsed = time.perf_counter() - started
    cpu = tree.cpu_seconds() - cpu0
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "session_p50_ms": ms(percentile(stats.sessions, 50)),
        "session_p99_ms": ms(percentile(stats.sessions, 99)),
        "smtp_250_p50_ms": ms(percentile(smtp.latencies, 50)),
        "smtp_250_p99_ms": ms(percentile(smtp.latencies, 99)),
        "cpu_s": cpu,
        "seconds": elapsed,
        "sessions_ok": len(stats.sessions),
        "retrs": stats.retrs,
        "smtp_accepted": smtp.accepted,
        "errors": len(errors) + stats.problems + smtp.rejected,
        "first_error": errors[0] if errors else None,
    }
