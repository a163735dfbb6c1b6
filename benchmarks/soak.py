"""Soak test: mixed SMTP and POP3 load on one popgate for minutes, then the proof.

    python -m benchmarks.soak                 # 3 minutes
    python -m benchmarks.soak --minutes 30    # the release check (issue 12)

popgate runs as an administrator runs it (``twistd -n popgate``, users through
``popgate user add``; see :mod:`benchmarks.servers`) in a private temp directory on
127.0.0.1.  For the whole run:

- ``--smtp`` connections send messages (1 to 150 KB, dot-stuffed lines included; at
  most ``--rate`` a second in all) to one or two of ``--users`` users, reconnecting
  every 20 messages; a ledger keeps the
  SHA-256 of every message acknowledged with ``250``, per recipient;
- ``--pop3`` sessions (each owning a slice of the users, so none waits for a lock) log
  in, RETR and check every message, DELE them and QUIT; a retrieval counts only once
  QUIT has answered ``+OK`` (a session that failed leaves its messages for the next);
- every ``--sample`` seconds the server's RSS, open file descriptors (less the spare
  message files kept open in ``tmp/``, bounded by design) and threads, summed over its
  worker processes with ``--workers``, are read from ``/proc``, and one line is printed.

Then the load stops, every mailbox is emptied over POP3, and the run fails (exit 1)
unless: every acknowledged copy was retrieved exactly once and intact (nothing lost,
duplicated or damaged), the file descriptors at the end are back to where they were
after the warm-up (+ a small slack), and memory did not keep growing: the lowest RSS of
the last quarter of the run is within 10% + 8 MiB of the second quarter's (the floor:
each login's Argon2 check lifts RSS by 64 MiB for a moment).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import (
    CRLF,
    Pop3,
    ProtocolError,
    dot_stuff,
    make_message,
    percentile,
    smtp_open,
    smtp_reply,
    to_maildir,
)
from benchmarks.procstat import ProcTree, status_kib
from benchmarks.servers import DOMAIN, PASSWORD, Options, Popgate

SIZES = (1_000, 4_000, 20_000, 150_000)
PER_CONNECTION = 20  # messages per SMTP connection, then QUIT and reconnect
FD_SLACK = 8
RSS_GROWTH = 0.10
RSS_SLACK_KIB = 8 * 1024


@dataclass
class Ledger:
    """What was acknowledged and what came back, per (token, user)."""

    acknowledged: dict[tuple[str, str], bytes] = field(default_factory=dict)  # -> sha256
    retrieved: dict[tuple[str, str], int] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)
    refused: int = 0
    smtp_errors: int = 0
    pop3_errors: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int
    threads: int


def log(text: str) -> None:
    print(text, flush=True)


def fd_count(pid: int) -> int:
    """Open descriptors, less the spare message files popgate keeps open in Maildir
    ``tmp/`` directories: at most 64 per process by design (``SparePool``), their number
    follows how many messages arrive at once, not a leak."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        count += "/Maildir/tmp/" not in target
    return count


def without_trace_headers(stored: bytes) -> bytes:
    """Drop popgate's Return-Path, Delivered-To and (folded) Received lines."""
    lines = stored.split(b"\n")
    index = 3
    while index < len(lines) and lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


def unstuff(body: bytes) -> bytes:
    """A POP3 multi-line body without its dot-stuffing, in Maildir (LF) form."""
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.").replace(CRLF, b"\n")


def token_of(message: bytes) -> str | None:
    for line in message.split(b"\n", 8):
        if line.startswith(b"Message-ID: <"):
            return line[13:].split(b"@")[0].decode("ascii", "replace")
    return None


async def smtp_client(server: Popgate, users: list[str], ledger: Ledger, number: int,
                      deadline: float, interval: float) -> None:
    """Send messages, one per ``interval`` seconds at most, until ``deadline``."""
    rng = random.Random(number)
    sequence = 0
    due = time.monotonic()
    while time.monotonic() < deadline:
        try:
            conn, _ = await smtp_open("127.0.0.1", server.ports["smtp"])
        except (OSError, ProtocolError):
            ledger.smtp_errors += 1
            await asyncio.sleep(0.5)
            continue
        try:
            for _ in range(PER_CONNECTION):
                if time.monotonic() >= deadline:
                    break
                sequence += 1
                token = f"s{number}n{sequence}"
                rcpts = rng.sample(users, rng.choice((1, 1, 1, 2)))
                message = make_message(rng.choice(SIZES), token, server.address(rcpts[0]))
                await send_one(conn, rcpts, token, message, ledger, server)
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            conn.send(b"QUIT\r\n")
            await smtp_reply(conn)
        except (OSError, ProtocolError):
            ledger.smtp_errors += 1
        finally:
            conn.close()


async def send_one(conn, rcpts, token, message, ledger: Ledger, server: Popgate) -> None:
    conn.send(b"MAIL FROM:<soak@loadgen.test>\r\n"
              + b"".join(f"RCPT TO:<{server.address(u)}>\r\n".encode() for u in rcpts)
              + b"DATA\r\n")
    codes = [(await smtp_reply(conn))[0] for _ in range(len(rcpts) + 2)]
    if codes[-1] != 354:
        ledger.refused += 1
        conn.send(b"RSET\r\n")
        await smtp_reply(conn)
        return
    conn.send(dot_stuff(message))
    await conn.drain()
    started = time.perf_counter()
    code, _ = await smtp_reply(conn)
    ledger.latencies.append(time.perf_counter() - started)
    if code != 250:
        ledger.refused += 1
        return
    digest = hashlib.sha256(to_maildir(message)).digest()
    for user in rcpts:
        ledger.acknowledged[token, user] = digest


async def empty_mailbox(server: Popgate, user: str, ledger: Ledger) -> int:
    """One POP3 session: RETR, check and DELE everything, QUIT; the messages taken."""
    session = await Pop3.open("127.0.0.1", server.ports["pop3"])
    taken = []
    try:
        await session.login(server.address(user), PASSWORD)
        for number in sorted(await session.listing("UIDL")):
            stored = unstuff(await session.multi(f"RETR {number}"))
            message = without_trace_headers(stored)
            token = token_of(message)
            expected = ledger.acknowledged.get((token, user))
            if expected is not None and hashlib.sha256(message).digest() != expected:
                ledger.damaged.append(f"{token} for {user}")
            taken.append((token, user))
            await session.command(f"DELE {number}")
        await session.quit()  # +OK: the deletions are done, the retrieval counts
    finally:
        session.close()
    for key in taken:
        ledger.retrieved[key] = ledger.retrieved.get(key, 0) + 1
    return len(taken)


async def pop3_client(server: Popgate, users: list[str], ledger: Ledger, number: int,
                      deadline: float) -> None:
    rng = random.Random(-number)
    while time.monotonic() < deadline:
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        try:
            await empty_mailbox(server, rng.choice(users), ledger)
        except (OSError, ProtocolError):
            ledger.pop3_errors += 1


def take_sample(pid: int, started: float) -> Sample:
    """RSS, open descriptors and threads of twistd and its workers, if any, summed."""
    tree = ProcTree(pid)
    pids = tree.pids()
    return Sample(time.monotonic() - started, tree.rss_kib(pids),
                  sum(fd_count(p) for p in pids), sum(status_kib(p, "Threads") for p in pids))


async def sampler(pid: int, samples: list[Sample], every: float, deadline: float,
                  ledger: Ledger, started: float) -> None:
    while time.monotonic() < deadline:
        sample = take_sample(pid, started)
        samples.append(sample)
        log(f"{sample.at:7.0f} s  rss {sample.rss_kib / 1024:6.1f} MiB  fds {sample.fds:4d}  "
            f"threads {sample.threads:3d}  acknowledged {len(ledger.acknowledged):7d}  "
            f"retrieved {sum(ledger.retrieved.values()):7d}")
        await asyncio.sleep(every)


async def soak(server: Popgate, users: list[str], args) -> tuple[Ledger, list[Sample]]:
    ledger = Ledger()
    samples: list[Sample] = []
    pid = server.root_pid()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    slices = [users[i::args.pop3] for i in range(args.pop3)]
    interval = args.smtp / args.rate
    tasks = [smtp_client(server, users, ledger, n, deadline, interval)
             for n in range(args.smtp)]
    tasks += [pop3_client(server, slices[n], ledger, n, deadline) for n in range(args.pop3)]
    tasks.append(sampler(pid, samples, args.sample, deadline, ledger, started))
    await asyncio.gather(*tasks)
    log("load stopped; emptying every mailbox")
    for user in users:
        while await empty_mailbox(server, user, ledger):
            pass
    await asyncio.sleep(1.0)  # closed sessions' descriptors
    samples.append(take_sample(pid, started))
    return ledger, samples


def verdict(ledger: Ledger, samples: list[Sample], minutes: float) -> list[str]:
    """The failures (empty: the soak passed); prints the figures."""
    lost = [key for key in ledger.acknowledged if key not in ledger.retrieved]
    duplicated = [key for key, n in ledger.retrieved.items() if n > 1]
    unknown = [key for key in ledger.retrieved if key not in ledger.acknowledged]
    warm = samples[min(1, len(samples) - 1)]
    final = samples[-1]
    quarter = max(1, (len(samples) - 1) // 4)
    # The floor of each quarter: a password check (Argon2, 64 MiB) lifts RSS for a
    # moment at every login; a leak lifts the floor.
    second = min(s.rss_kib for s in samples[quarter:2 * quarter] or samples)
    last = min(s.rss_kib for s in samples[-1 - quarter:-1] or samples)
    p50, p99 = percentile(ledger.latencies, 50), percentile(ledger.latencies, 99)
    log(f"figures for {minutes:g} min: acknowledged copies {len(ledger.acknowledged)} "
        f"({len(ledger.acknowledged) / (minutes * 60):.1f}/s), retrieved "
        f"{sum(ledger.retrieved.values())}, refused {ledger.refused}, connection errors "
        f"SMTP {ledger.smtp_errors} POP3 {ledger.pop3_errors}")
    log(f"DATA-end -> 250 latency: p50 {1000 * (p50 or 0):.1f} ms, "
        f"p99 {1000 * (p99 or 0):.1f} ms")
    log(f"fds: after warm-up {warm.fds}, peak {max(s.fds for s in samples)}, end {final.fds}")
    log(f"rss: after warm-up {warm.rss_kib / 1024:.1f} MiB, peak "
        f"{max(s.rss_kib for s in samples) / 1024:.1f} MiB, end {final.rss_kib / 1024:.1f} "
        f"MiB; floor of the 2nd quarter {second / 1024:.1f} MiB, of the last "
        f"{last / 1024:.1f} MiB")
    failures = []
    for what, keys in (("lost", lost), ("duplicated", duplicated),
                       ("retrieved but never acknowledged", unknown),
                       ("damaged", ledger.damaged)):
        if keys:
            failures.append(f"{len(keys)} {what}, e.g. {keys[:3]}")
    if final.fds > warm.fds + FD_SLACK:
        failures.append(f"file descriptors grew from {warm.fds} to {final.fds}")
    if last > second * (1 + RSS_GROWTH) + RSS_SLACK_KIB:
        failures.append(f"memory kept growing: {second / 1024:.1f} -> {last / 1024:.1f} MiB")
    if not ledger.acknowledged:
        failures.append("nothing was delivered")
    return failures


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--smtp", type=int, default=8, help="SMTP connections")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="messages per second over all SMTP connections, at most "
                             "(the POP3 sessions must keep up, or the mailboxes grow)")
    parser.add_argument("--pop3", type=int, default=4, help="POP3 sessions")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=1,
                        help="[server] workers (their fds, memory and threads are summed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="popgate-soak-"))
    server = Popgate(root, Options(popgate_users="clone", popgate_workers=args.workers))
    users = [f"user{n}" for n in range(args.users)]
    try:
        reason = server.missing()
        if reason:
            log(f"cannot run popgate: {reason}")
            return 1
        server.configure(users)
        server.start()
        log(f"popgate {server.ports} in {root}; {args.minutes:g} min, {args.smtp} SMTP "
            f"connections (at most {args.rate:g} messages/s), {args.pop3} POP3 sessions, "
            f"{args.users} users @{DOMAIN}")
        ledger, samples = asyncio.run(soak(server, users, args))
        failures = verdict(ledger, samples, args.minutes)
    finally:
        server.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for failure in failures:
        log(f"FAIL: {failure}")
    log("FAIL" if failures else "OK: nothing lost, file descriptors and memory bounded")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
