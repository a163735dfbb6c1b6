"""Benchmark driver: run the loadgen workloads against popgate and its peers.

For each selected server: make a temp dir, write its configuration, create the users,
then for each workload it supports fill the mailboxes, start the server, run the
workload under a timeout, and stop the server (a fresh process per workload, so memory
and CPU figures are not skewed by earlier workloads).  Prints one table (rows =
metrics, columns = servers and popgate/peer ratios), notes about skipped servers and
errors, and last a single ``RESULT {json}`` line.

    python -m benchmarks.run [--quick] [--only smtp,pop3,...] [--servers popgate,...]

Exit status: 0 when every workload that ran was error-free, 1 otherwise; with
``--strict`` a skipped server (not installed) also gives 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import loadgen  # noqa: E402
from benchmarks.maildirs import fill  # noqa: E402
from benchmarks.procstat import ProcTree  # noqa: E402
from benchmarks.servers import (  # noqa: E402
    HOST,
    PASSWORD,
    SERVERS,
    Options,
    Server,
    ServerError,
    make_certificate,
)

WORKLOADS = ("smtp", "smtpsource", "smtptls", "pop3", "pop3s", "bigbox", "bigmsg", "idle",
             "logins", "office")
# the feature (Server.features) a workload needs; None: every server
NEEDS = {"smtp": "smtp", "smtpsource": "smtpsource", "smtptls": "smtptls", "pop3": "pop3",
         "pop3s": "pop3s", "bigbox": "pop3", "bigmsg": "pop3", "logins": "pop3",
         "office": "office", "idle": None}
TIMEOUTS = {"smtp": 300, "smtpsource": 300, "smtptls": 300, "pop3": 300, "pop3s": 300,
            "bigbox": 180, "bigmsg": 120, "idle": 120, "logins": 60, "office": 300}
MIB = 1024 * 1024


@dataclass
class Params:
    """Workload sizes (full run defaults; see QUICK)."""

    smtp_messages: int = 2000
    smtp_conns: str = "8,50"  # one SMTP run per connection count
    source_conns: str = "8,50"  # one smtp-source run per session count
    smtptls_conns: int = 8
    smtp_recipients: int = 8
    message_size: int = 4096
    pop3_clients: int = 10
    pop3_messages: int = 1000
    bigbox_messages: int = 10000
    bigmsg_mib: float = 50.0
    idle_conns: int = 1000
    login_rate: float = 20.0
    login_seconds: float = 5.0
    noop_interval: float = 0.02
    office_users: int = 200
    office_messages: int = 3  # new mail waiting in each office mailbox at the start
    office_seconds: float = 20.0  # session starts spread over this; SMTP runs this long
    office_smtp_rate: float = 20.0
    office_smtp_conns: int = 4
    timeout_scale: float = 1.0


QUICK = {"smtp_messages": 100, "smtp_conns": "2,4", "smtp_recipients": 4, "pop3_clients": 4,
         "pop3_messages": 50, "bigbox_messages": 1000, "bigmsg_mib": 5.0,
         "idle_conns": 100, "login_seconds": 1.0, "smtptls_conns": 2, "source_conns": "4",
         "office_users": 6, "office_seconds": 1.0, "office_smtp_rate": 10.0,
         "office_smtp_conns": 2}


@dataclass
class ServerResult:
    """What one server produced."""

    metrics: dict[str, object] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------ users / data


def workload_users(workload: str, p: Params) -> list[str]:
    """Local parts of the users a workload needs."""
    if workload == "smtp":
        return [u for n in smtp_conn_counts(p) for u in smtp_users(p, n)]
    if workload == "smtpsource":
        return [f"source{n}c" for n in smtp_conn_counts(p, p.source_conns)]
    if workload == "smtptls":
        return [f"rcpttls{i}" for i in range(p.smtp_recipients)]
    if workload in ("pop3", "pop3s"):
        return [f"{workload}u{i}" for i in range(p.pop3_clients)]
    if workload == "office":
        return [f"office{i}" for i in range(p.office_users)]
    if workload in ("bigbox", "bigmsg"):
        return [workload]
    if workload == "logins":
        # one user per login: popgate locks a mailbox per session (-ERR [IN-USE])
        # and logins may overlap when password hashing saturates the CPU
        logins = max(1, round(p.login_rate * p.login_seconds))
        return [f"login{i}" for i in range(logins)] + ["noop"]
    return []


def supported(server: Server, workload: str) -> bool:
    """Whether the server can run the workload."""
    need = NEEDS[workload]
    return need is None or need in server.features


Factory = Callable[[ProcTree], Coroutine]


def smtp_conn_counts(p: Params, counts: str | None = None) -> list[int]:
    """The connection counts of the SMTP runs ("8,50" -> [8, 50])."""
    text = p.smtp_conns if counts is None else counts
    return [int(n) for n in text.split(",") if n.strip()]


def smtp_users(p: Params, conns: int) -> list[str]:
    """The recipients of the SMTP run over `conns` connections: each run has its own, so
    no run deletes the files of the one before (see `bench_server` on deletions)."""
    return [f"rcpt{conns}c{i}" for i in range(p.smtp_recipients)]


def prep_smtp(server: Server, p: Params, conns: int, users: list[str] | None = None,
              tls: bool = False) -> Factory:
    """Empty recipient Maildirs; the SMTP workload over `conns` connections (STARTTLS on
    each with `tls`)."""
    users = users or smtp_users(p, conns)
    load = loadgen.SmtpLoad(
        HOST, server.ports["smtp"], p.smtp_messages, conns,
        [server.address(u) for u in users], [server.prepare_mailbox(u) for u in users],
        p.message_size, deliver_timeout=120 * p.timeout_scale,
        tls=loadgen.client_tls() if tls else None)
    return lambda tree: loadgen.smtp_workload(load, tree)


def prep_smtptls(server: Server, p: Params) -> Factory:
    """The SMTP workload with STARTTLS, over smtptls_conns connections."""
    return prep_smtp(server, p, p.smtptls_conns, workload_users("smtptls", p), tls=True)


def prep_smtpsource(server: Server, p: Params, conns: int) -> Factory:
    """One empty recipient Maildir; smtp-source over `conns` sessions."""
    user = f"source{conns}c"
    load = loadgen.SmtpSourceLoad(HOST, server.ports["smtp"], p.smtp_messages, conns,
                                  server.address(user), server.prepare_mailbox(user),
                                  p.message_size, deliver_timeout=120 * p.timeout_scale)
    return lambda tree: loadgen.smtp_source_workload(load, tree)


def prep_pop3(server: Server, p: Params, workload: str = "pop3") -> Factory:
    """One filled mailbox per client; the POP3 workload (implicit TLS for pop3s)."""
    users = workload_users(workload, p)
    for user in users:
        fill(server.prepare_mailbox(user), p.pop3_messages, p.message_size, server.owner)
    tls = loadgen.client_tls() if workload == "pop3s" else None
    load = loadgen.Pop3Load(HOST, server.ports[workload], [server.address(u) for u in users],
                            PASSWORD, p.pop3_messages, p.message_size, tls)
    return lambda tree: loadgen.pop3_workload(load, tree)


def prep_pop3s(server: Server, p: Params) -> Factory:
    """The POP3 workload over implicit TLS (POP3S)."""
    return prep_pop3(server, p, "pop3s")


def prep_office(server: Server, p: Params) -> Factory:
    """Office mailboxes with office_messages new messages each; the office morning."""
    users = workload_users("office", p)
    for user in users:
        fill(server.prepare_mailbox(user), p.office_messages, p.message_size, server.owner)
    load = loadgen.OfficeLoad(HOST, server.ports["smtp"], server.ports["pop3"],
                              [server.address(u) for u in users], PASSWORD,
                              p.office_seconds, p.office_smtp_rate, p.office_smtp_conns,
                              p.message_size)
    return lambda tree: loadgen.office_workload(load, tree)


def prep_bigbox(server: Server, p: Params) -> Factory:
    """A huge mailbox; cold and warm STAT+UIDL."""
    fill(server.prepare_mailbox("bigbox"), p.bigbox_messages, p.message_size, server.owner)
    return lambda tree: loadgen.bigbox_workload(
        HOST, server.ports["pop3"], server.address("bigbox"), PASSWORD, p.bigbox_messages)


def prep_bigmsg(server: Server, p: Params) -> Factory:
    """One big message; its RETR with RSS sampling."""
    size = int(p.bigmsg_mib * MIB)
    fill(server.prepare_mailbox("bigmsg"), 1, size, server.owner, tag="big")
    return lambda tree: loadgen.bigmsg_workload(
        HOST, server.ports["pop3"], server.address("bigmsg"), PASSWORD, size, tree)


def prep_logins(server: Server, p: Params) -> Factory:
    """Empty mailboxes for the login pool and the NOOP session; the login storm."""
    users = workload_users("logins", p)
    for user in users:
        server.prepare_mailbox(user)
    load = loadgen.LoginLoad(HOST, server.ports["pop3"],
                             [server.address(u) for u in users[:-1]],
                             server.address(users[-1]), PASSWORD, p.login_rate,
                             p.login_seconds, p.noop_interval)
    return lambda tree: loadgen.logins_workload(load, tree)


def prep_idle(server: Server, p: Params, protocol: str) -> Factory:
    """Idle connections on one protocol."""
    port = server.ports[protocol]
    return lambda tree: loadgen.idle_workload(HOST, port, p.idle_conns, tree)


PREPARE = {"pop3": prep_pop3, "pop3s": prep_pop3s, "smtptls": prep_smtptls,
           "bigbox": prep_bigbox, "bigmsg": prep_bigmsg, "logins": prep_logins,
           "office": prep_office}


# ------------------------------------------------------------------------ running


def log(message: str) -> None:
    """Progress and notes go to stderr; stdout is the table and RESULT."""
    print(message, file=sys.stderr, flush=True)


Run = tuple[str, Callable[[Params], Factory]]


def runs_of(server: Server, workload: str, p: Params) -> list[Run]:
    """(metric prefix, preparer) pairs: idle runs once per protocol, SMTP once per
    connection count."""
    if workload == "smtp":
        return [(f"smtp{n}", lambda p, n=n: prep_smtp(server, p, n))
                for n in smtp_conn_counts(p)]
    if workload == "smtpsource":
        return [(f"source{n}", lambda p, n=n: prep_smtpsource(server, p, n))
                for n in smtp_conn_counts(p, p.source_conns)]
    if workload == "idle":
        return [(f"idle_{proto}", lambda p, proto=proto: prep_idle(server, p, proto))
                for proto in server.protocols]
    return [(workload, lambda p: PREPARE[workload](server, p))]


def run_one(server: Server, prefix: str, prepare: Callable[[Params], Factory],
            p: Params, timeout: float) -> dict[str, object]:
    """Prepare data, start the server, run one workload under a timeout, stop."""
    factory = prepare(p)
    server.start()
    try:
        tree = server.tree()
        result = asyncio.run(asyncio.wait_for(factory(tree), timeout))
    except TimeoutError as exc:
        raise ServerError(f"timed out after {timeout:.1f}s") from exc
    finally:
        server.stop()
    return {f"{prefix}.{key}": value for key, value in result.items()}


def bench_server(name: str, p: Params, workloads: list[str], options: Options,
                 root: Path) -> ServerResult:
    """Set up one server in `root` and run every workload it supports.

    Nothing is deleted until every server has run (`main`): on ext4 without a journal,
    every file creation skips over the inodes freed in the last 30 seconds nearby
    (``recently_deleted``), which made the server that ran after another one's clean-up
    up to 40 % slower at SMTP.
    """
    outcome = ServerResult()
    started = time.monotonic()
    try:
        server = SERVERS[name](root, options)
        outcome.skipped = server.missing()
        if outcome.skipped:
            return outcome
        todo = [w for w in workloads if supported(server, w)]
        other = [w for w in workloads if w not in todo]
        if other:
            outcome.notes.append(f"{name} does not run {', '.join(other)}")
        users = list(dict.fromkeys(u for w in todo for u in workload_users(w, p)))
        server.configure(users)
        for workload in todo:
            for prefix, prepare in runs_of(server, workload, p):
                run_workload(server, prefix, prepare, p, TIMEOUTS[workload], outcome)
    except ServerError as exc:
        outcome.errors["setup"] = str(exc)
        log(f"[{name}] setup failed: {exc}")
    finally:
        outcome.seconds = time.monotonic() - started
    return outcome


def run_workload(server: Server, prefix: str, prepare: Callable[[Params], Factory],
                 p: Params, timeout: float, outcome: ServerResult) -> None:
    """Run one workload, recording its metrics or its failure in `outcome`."""
    log(f"[{server.name}] {prefix} ...")
    began = time.monotonic()
    try:
        metrics = run_one(server, prefix, prepare, p, timeout * p.timeout_scale)
    except (ServerError, OSError, loadgen.ProtocolError, ValueError, IndexError) as exc:
        outcome.errors[prefix] = str(exc)
        log(f"[{server.name}] {prefix} FAILED: {exc}")
        return
    outcome.metrics.update(metrics)
    problems = metrics.get(f"{prefix}.errors") or 0
    if problems:
        first = metrics.get(f"{prefix}.first_error") or "see the error counters"
        outcome.errors[prefix] = f"{problems} error(s): {first}"
    log(f"[{server.name}] {prefix} done in {time.monotonic() - began:.1f}s"
        + (f" with {problems} error(s)" if problems else ""))


# -------------------------------------------------------------------------- table


def rows(p: Params) -> list[tuple[str, str, str]]:
    """(metric key, label, better) for the table, in display order."""
    big = f"{p.bigmsg_mib:g} MiB RETR"
    box = f"{p.bigbox_messages}-msg box STAT+UIDL"
    smtp = [row for n in smtp_conn_counts(p) for row in [
        (f"smtp{n}.accepted_per_s", f"SMTP accepted msgs/s, {n} conns", "higher"),
        (f"smtp{n}.delivered_per_s", f"SMTP delivered msgs/s, {n} conns", "higher"),
        (f"smtp{n}.data_p50_ms", f"SMTP DATA-end->250 p50 ms, {n} conns", "lower"),
        (f"smtp{n}.data_p99_ms", f"SMTP DATA-end->250 p99 ms, {n} conns", "lower"),
        (f"smtp{n}.cpu_ms_per_msg", f"SMTP server CPU ms/msg, {n} conns", "lower"),
    ]]
    source = [row for n in smtp_conn_counts(p, p.source_conns) for row in [
        (f"source{n}.delivered_per_s", f"smtp-source delivered msgs/s, {n} conns", "higher"),
        (f"source{n}.cpu_ms_per_msg", f"smtp-source server CPU ms/msg, {n} conns", "lower"),
    ]]
    tls = p.smtptls_conns
    return [
        *smtp,
        *source,
        ("smtptls.delivered_per_s", f"SMTP STARTTLS delivered msgs/s, {tls} conns", "higher"),
        ("smtptls.data_p99_ms", f"SMTP STARTTLS DATA-end->250 p99 ms, {tls} conns", "lower"),
        ("smtptls.cpu_ms_per_msg", f"SMTP STARTTLS server CPU ms/msg, {tls} conns", "lower"),
        ("pop3.retr_per_s", "POP3 RETR/s", "higher"),
        ("pop3.mb_per_s", "POP3 MB/s", "higher"),
        ("pop3.session_p50_ms", "POP3 session p50 ms", "lower"),
        ("pop3.session_p99_ms", "POP3 session p99 ms", "lower"),
        ("pop3.cpu_us_per_retr", "POP3 server CPU us/RETR", "lower"),
        ("pop3.cpu_us_per_retr_all", "POP3 server CPU us/RETR incl. logins", "lower"),
        ("pop3s.retr_per_s", "POP3S RETR/s", "higher"),
        ("pop3s.cpu_us_per_retr", "POP3S server CPU us/RETR", "lower"),
        ("pop3s.cpu_us_per_retr_all", "POP3S server CPU us/RETR incl. logins", "lower"),
        ("bigbox.cold_ms", f"{box} cold ms", "lower"),
        ("bigbox.warm_ms", f"{box} warm ms", "lower"),
        ("bigmsg.mb_per_s", f"{big} MB/s", "higher"),
        ("bigmsg.rss_growth_mib", f"{big} peak RSS growth MiB", "lower"),
        ("bigmsg.hwm_growth_mib", f"{big} VmHWM growth MiB", "lower"),
        ("idle_smtp.rss_kib_per_conn", "idle SMTP KiB/conn (RSS)", "lower"),
        ("idle_smtp.pss_kib_per_conn", "idle SMTP KiB/conn (PSS)", "lower"),
        ("idle_pop3.rss_kib_per_conn", "idle POP3 KiB/conn (RSS)", "lower"),
        ("idle_pop3.pss_kib_per_conn", "idle POP3 KiB/conn (PSS)", "lower"),
        ("logins.noop_p50_ms", "NOOP p50 ms during logins", "lower"),
        ("logins.noop_p99_ms", "NOOP p99 ms during logins", "lower"),
        ("logins.login_p50_ms", "login p50 ms", "lower"),
        ("logins.cpu_ms_per_login", "server CPU ms/login", "lower"),
        ("office.session_p50_ms", "office session p50 ms", "lower"),
        ("office.session_p99_ms", "office session p99 ms", "lower"),
        ("office.smtp_250_p99_ms", "office SMTP DATA-end->250 p99 ms", "lower"),
        ("office.cpu_s", "office server CPU s", "lower"),
        ("errors", "errors (all workloads)", "lower"),
    ]


def fmt(value: object) -> str:
    """Compact number formatting; "-" for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        size = abs(value)
        return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"
    return str(value)


def total_errors(result: ServerResult) -> int:
    """Error counters of all workloads plus workloads that failed outright."""
    counted = sum(v for k, v in result.metrics.items()
                  if k.endswith(".errors") and isinstance(v, int))
    failed = sum(1 for k in result.errors if f"{k}.errors" not in result.metrics)
    return counted + failed


def ratio(a: object, b: object) -> str:
    """popgate/peer ratio, "" when either side is missing or zero."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return ""
    return f"{a / b:.3g}x"


def render_table(results: dict[str, ServerResult], p: Params) -> str:
    """The metrics table for the servers that ran."""
    ran = [name for name, r in results.items() if not r.skipped]
    peers = [name for name in ran if name != "popgate"] if "popgate" in ran else []
    header = ["metric", "better", *ran, *[f"popgate/{peer}" for peer in peers]]
    body = []
    for key, label, better in rows(p):
        values = {name: (total_errors(results[name]) if key == "errors"
                         else results[name].metrics.get(key)) for name in ran}
        if all(v is None for v in values.values()):
            continue
        cells = [label, better, *(fmt(values[name]) for name in ran)]
        cells += [ratio(values["popgate"], values[peer]) for peer in peers]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(p: Params) -> str:
    """One line saying what was measured."""
    return (f"SMTP {p.smtp_messages} x {p.message_size} B over {p.smtp_conns} conns; "
            f"POP3 {p.pop3_clients} clients x {p.pop3_messages} msgs; "
            f"big box {p.bigbox_messages}; big msg {p.bigmsg_mib:g} MiB; "
            f"idle {p.idle_conns} conns; logins {p.login_rate:g}/s for "
            f"{p.login_seconds:g}s, NOOP every {p.noop_interval * 1000:g} ms; "
            f"STARTTLS over {p.smtptls_conns} conns; office {p.office_users} users x "
            f"{p.office_messages} msgs over {p.office_seconds:g}s with SMTP "
            f"{p.office_smtp_rate:g}/s over {p.office_smtp_conns} conns")


def report(results: dict[str, ServerResult], p: Params, workloads: list[str]) -> str:
    """Table, notes and the RESULT line."""
    out = [describe(p), "", render_table(results, p), ""]
    for name, result in results.items():
        if result.skipped:
            out.append(f"note: {name} skipped: {result.skipped}")
        out += [f"note: {n}" for n in result.notes]
        out += [f"error: {name} {k}: {v}" for k, v in result.errors.items()]
    payload = {
        "params": dataclasses.asdict(p),
        "workloads": workloads,
        "servers": {n: r.metrics for n, r in results.items() if not r.skipped},
        "errors": {n: r.errors for n, r in results.items() if r.errors},
        "skipped": {n: r.skipped for n, r in results.items() if r.skipped},
        "seconds": {n: round(r.seconds, 1) for n, r in results.items()},
    }
    out.append("RESULT " + json.dumps(payload, sort_keys=True))
    return "\n".join(out)


# ---------------------------------------------------------------------------- CLI


def csv_choice(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of `allowed`, order kept."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"choose from {','.join(allowed)} (got {text!r})")
        return list(dict.fromkeys(items))
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(description="popgate benchmark suite (see benchmarks/README.md)")
    ap.add_argument("--quick", action="store_true", help="small counts for a CI smoke run")
    ap.add_argument("--only", type=csv_choice(WORKLOADS), default=list(WORKLOADS),
                    help="workloads, comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--servers", type=csv_choice(tuple(SERVERS)), default=list(SERVERS),
                    help="servers, comma-separated: " + ",".join(SERVERS))
    for f in dataclasses.fields(Params):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"(default {f.default}; --quick: {QUICK.get(f.name, f.default)})")
    ap.add_argument("--popgate-twistd", default=Options.popgate_twistd,
                    help="twistd command (shell words; default: twistd beside this "
                         "Python, else on PATH)")
    ap.add_argument("--popgate-cli", default=Options.popgate_cli,
                    help="popgate admin command (shell words; default: popgate beside "
                         "this Python, else on PATH, else python -m popgate.cli)")
    ap.add_argument("--popgate-users", choices=("clone", "cli"), default=Options.popgate_users,
                    help="clone: add one user with the CLI and copy its hash line for the "
                         "rest (fast); cli: run the CLI for every user")
    ap.add_argument("--popgate-workers", type=int, default=Options.popgate_workers,
                    help="popgate's [server] workers (default 1)")
    ap.add_argument("--dovecot-scheme", default=Options.dovecot_scheme,
                    help="Dovecot password scheme (doveadm pw -s), PLAIN for none")
    ap.add_argument("--tmpdir", default=None, help="where the per-server temp dirs go")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (debugging)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a server is skipped")
    return ap.parse_args(argv)


def make_params(args: argparse.Namespace) -> Params:
    """Defaults, then --quick, then explicit overrides."""
    values = dataclasses.asdict(Params())
    if args.quick:
        values.update(QUICK)
    for name in values:
        given = getattr(args, name)
        if given is not None:
            values[name] = given
    return Params(**values)


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that every finally: stops its server."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    args = parse_args(argv)
    params = make_params(args)
    terminate_on_sigterm()
    results = {}
    roots = [Path(tempfile.mkdtemp(prefix="popgate-bench-tls-", dir=args.tmpdir))]
    try:
        os.chmod(roots[0], 0o755)
        cert, key = make_certificate(roots[0])
        options = Options(args.popgate_twistd, args.popgate_cli, args.popgate_users,
                          args.dovecot_scheme, max(1200, params.idle_conns + 200), cert, key,
                          args.popgate_workers)
        for name in args.servers:
            log(f"[{name}] starting")
            roots.append(Path(tempfile.mkdtemp(prefix=f"popgate-bench-{name}-",
                                               dir=args.tmpdir)))
            os.chmod(roots[-1], 0o755)  # the peers' unprivileged processes traverse it
            results[name] = bench_server(name, params, args.only, options, roots[-1])
            if results[name].skipped:
                log(f"[{name}] SKIPPED: {results[name].skipped}")
    finally:
        for root in roots:
            if args.keep:
                log(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    print(report(results, params, args.only), flush=True)
    failed = any(r.errors for r in results.values())
    skipped = any(r.skipped for r in results.values())
    return 1 if failed or (args.strict and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
