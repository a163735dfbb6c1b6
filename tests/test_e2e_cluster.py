"""Two popgate nodes behind a real HAProxy, sharing one GlusterFS volume (issue 16, item 9).

The layout of docs/deployment.md ("Several nodes on shared storage"), on loopback: a
private ``glusterd`` serves one one-brick volume, mounted twice through FUSE; node A
(``twistd -n popgate``) keeps its mail root and users file on the first mount, node B on
the second.  Node B runs in PID and UTS namespaces of its own, so that, as seen from B,
A's processes do not exist: what B's start-up and sweeps may conclude about A's files is
what a second machine would conclude.  HAProxy (``send-proxy-v2``, health checks every
200 ms) spreads SMTP and POP3 sessions over the ``haproxy:`` listeners of both nodes.

One test runs the phases in order (a GlusterFS volume takes seconds to build, and
glusterd's port is fixed, so two at once could not run):

1. B starts while A has sessions in the middle of DATA and spare files in ``tmp/``, and
   delivers with A drained: none of A's ``tmp/`` files vanishes, A's messages then land.
2. Deliveries through HAProxy, spread over both nodes.
3. A POP3 session on one node holds ``-ERR [IN-USE]`` against the other; a session can
   start on one node as soon as QUIT is answered on the other; a deletion made through
   one node is seen at once by the other (no stale listing).
4. SMTP and POP3 load through HAProxy; A gets ``kill -9``; new sessions go to B.

Every message a ``250`` acknowledged is in a ledger (token and body hash); at the end
each is in the Maildirs exactly once, the same seen through both mounts.  The figures go
to the test log (``_trial_temp/test.log``).  Needs root and /dev/fuse (skipped otherwise,
never under CI), glusterd, gluster, mount.glusterfs, haproxy and unshare.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import poplib
import random
import re
import signal
import smtplib
import threading
import time
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.harness import (
    ProxiedPOP3,
    deferred_sleep,
    free_port,
    start_gluster_volume,
    start_haproxy,
    start_twistd,
)

log = Logger()

USERS = ["alice@example.test", "bob@example.test", "carol@example.test"]
HANDOVER_USER = "dave@example.test"  # for the [IN-USE] and deletion checks only
PASSWORD = "pw"
SENDER = "load@client.test"
TIMEOUT = 30

# What the docs recommend, and measured here (see docs/deployment.md): without them a
# node sees a directory's old mtime, and opens a file another node removed, for ~1 s.
VOLUME_OPTIONS = {"performance.stat-prefetch": "off"}
MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"

# The example in docs/deployment.md, with the test's ports.
HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 2s
    timeout check 2s
    timeout client 10m
    timeout server 10m
    retries 3
    option redispatch 1

frontend smtp
    bind 127.0.0.1:{smtp}
    default_backend smtp_nodes

frontend pop3
    bind 127.0.0.1:{pop3}
    default_backend pop3_nodes

backend smtp_nodes
    balance roundrobin
    option smtpchk EHLO haproxy.test
    default-server send-proxy-v2 check-send-proxy check inter 200ms fall 1 rise 1
    server node-a 127.0.0.1:{a_smtp}
    server node-b 127.0.0.1:{b_smtp}

backend pop3_nodes
    balance roundrobin
    option tcp-check
    tcp-check expect string +OK
    tcp-check send QUIT\\r\\n
    tcp-check expect string +OK
    default-server send-proxy-v2 check-send-proxy check inter 200ms fall 1 rise 1
    server node-a 127.0.0.1:{a_pop3}
    server node-b 127.0.0.1:{b_pop3}
"""

_TOKEN = re.compile(rb"^X-Ledger: (\S+)$", re.MULTILINE)
_BY = re.compile(rb"\bby (\S+) \(popgate\)")


# -- the ledger ----------------------------------------------------------------------


@dataclass
class Ledger:
    """Every message sent through HAProxy, by token: the body hash of those a ``250``
    acknowledged; those refused; those whose session broke before the answer (their
    fate is unknown to the client, so they may or may not be stored)."""

    acknowledged: dict[str, str] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)
    _count: itertools.count = field(default_factory=itertools.count)

    @property
    def sent(self) -> int:
        return len(self.acknowledged) + len(self.refused) + len(self.unanswered)

    def new_message(self, recipient: str, size: int, rng: random.Random):
        """(token, message with LF line ends, body hash)."""
        token = f"m{next(self._count)}.{rng.getrandbits(32):08x}"
        lines = [rng.randbytes(30).hex().encode() for _ in range(max(1, size // 61))]
        body = b"\n".join(lines) + b"\n"
        headers = (f"From: {SENDER}\nTo: {recipient}\nSubject: ledger {token}\n"
                   f"X-Ledger: {token}\n\n").encode()
        return token, headers + body, hashlib.sha256(body).hexdigest()


def parse_stored(content: bytes) -> tuple[str, str, str]:
    """(token, body hash, receiving node) of a stored or retrieved message."""
    head, _, body = content.partition(b"\n\n")
    token = _TOKEN.search(head).group(1).decode()
    node = _BY.search(head).group(1).decode()
    return token, hashlib.sha256(body).hexdigest(), node


def inventory(mount: str) -> list[tuple[str, str, str]]:
    """(token, body hash, node) of every ledger message in the Maildirs, through one mount."""
    found = []
    for user in USERS:
        local, _, domain = user.partition("@")
        maildir = os.path.join(mount, "popgate", "mail", domain, local, "Maildir")
        for sub in ("new", "cur"):
            directory = os.path.join(maildir, sub)
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    found.append(parse_stored(f.read()))
    return sorted(found)


def audit(ledger: Ledger, stored: list[tuple[str, str, str]]) -> dict[str, int]:
    """The figures: how many acknowledged messages are stored exactly once, lost (absent or
    altered), duplicated; stored though refused; stored though the session broke."""
    copies: dict[str, list[str]] = {}
    for token, digest, _ in stored:
        copies.setdefault(token, []).append(digest)
    lost = sum(1 for token, digest in ledger.acknowledged.items()
               if digest not in copies.get(token, ()))
    return {
        "sent": ledger.sent,
        "acknowledged": len(ledger.acknowledged),
        "delivered": sum(1 for token in ledger.acknowledged if token in copies),
        "lost": lost,
        "duplicated": sum(len(digests) - 1 for digests in copies.values()),
        "stored_though_refused": sum(1 for token in ledger.refused if token in copies),
        "broken_sessions_stored": sum(1 for token in ledger.unanswered if token in copies),
        "broken_sessions_not_stored": sum(1 for t in ledger.unanswered if t not in copies),
        "unknown_tokens": sum(1 for token in copies
                              if token not in ledger.acknowledged
                              and token not in ledger.unanswered),
    }


# -- clients (blocking: run in threads) ----------------------------------------------


@dataclass
class Session:
    """What one client session through HAProxy saw."""

    kind: str  # "smtp" or "pop3"
    started: float
    outcome: str  # ok, refused (no greeting), broken (cut after it), in-use, rejected
    node: str = ""  # the node that greeted (SMTP banners name it)
    error: str = ""  # why it was refused or broken


def connect_smtp(port: int) -> tuple[smtplib.SMTP, str]:
    """A connected client and the node named in its banner; raises if no banner came."""
    client = smtplib.SMTP(timeout=TIMEOUT)
    code, banner = client.connect("127.0.0.1", port)
    if code != 220:
        client.close()
        raise smtplib.SMTPConnectError(code, banner)
    return client, banner.split()[0].decode()


def send_one(port: int, ledger: Ledger, recipient: str, rng: random.Random,
             size: int = 0) -> Session:
    """One SMTP session delivering one message through HAProxy, recorded in the ledger."""
    started = time.monotonic()
    try:
        client, node = connect_smtp(port)
    except (OSError, smtplib.SMTPException) as e:
        return Session("smtp", started, "refused", error=repr(e))
    token, message, digest = ledger.new_message(recipient, size or rng.randint(200, 30_000),
                                                rng)
    try:
        client.sendmail(SENDER, [recipient], message.replace(b"\n", b"\r\n"))
    except smtplib.SMTPResponseException:
        ledger.refused.add(token)
        client.close()
        return Session("smtp", started, "rejected", node)
    except (OSError, smtplib.SMTPException) as e:
        ledger.unanswered.add(token)
        client.close()
        return Session("smtp", started, "broken", node, repr(e))
    ledger.acknowledged[token] = digest
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.quit()
    return Session("smtp", started, "ok", node)


def read_some(port: int, user: str, ledger: Ledger, mismatches: list[str]) -> Session:
    """One POP3 session through HAProxy: log in, RETR up to three messages (each must be
    what was acknowledged), QUIT."""
    started = time.monotonic()
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
    except (OSError, poplib.error_proto) as e:  # error_proto: "-ERR EOF", closed at once
        return Session("pop3", started, "refused", error=repr(e))
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        for number in range(1, min(count, 3) + 1):
            token, digest, _ = parse_stored(b"\n".join(client.retr(number)[1]) + b"\n")
            if ledger.acknowledged.get(token, digest) != digest:
                mismatches.append(token)
        client.quit()
    except poplib.error_proto as e:  # a server's answer (bytes), or poplib's "-ERR EOF"
        client.close()
        in_use = isinstance(e.args[0], bytes) and e.args[0].startswith(b"-ERR [IN-USE]")
        return Session("pop3", started, "in-use" if in_use else "broken", error=repr(e))
    except OSError as e:
        client.close()
        return Session("pop3", started, "broken", error=repr(e))
    return Session("pop3", started, "ok")


class HeldDelivery:
    """An SMTP session stopped in the middle of DATA: its node is writing the message to
    a ``tmp/`` file (more than one write buffer of it is already there)."""

    def __init__(self, port: int, ledger: Ledger, recipient: str, rng: random.Random):
        self.ledger = ledger
        self.client, self.node = connect_smtp(port)
        self.token, message, self.digest = ledger.new_message(recipient, 200_000, rng)
        wire = message.replace(b"\n", b"\r\n")  # body lines are hex: no dot to stuff
        self.client.ehlo("client.test")
        self.client.mail(SENDER)
        self.client.rcpt(recipient)
        code, reply = self.client.docmd("DATA")
        assert code == 354, reply
        self.rest = wire[150_000:] + b".\r\n"
        self.client.send(wire[:150_000])

    def finish(self) -> tuple[int, bytes]:
        self.client.send(self.rest)
        code, reply = self.client.getreply()
        if code == 250:
            self.ledger.acknowledged[self.token] = self.digest
        self.client.quit()
        return code, reply


def tmp_files(mount: str) -> dict[str, int]:
    """Every file in every ``tmp/`` of the mail root on ``mount``: relative path -> size."""
    root = os.path.join(mount, "popgate", "mail")
    found = {}
    for directory, _, names in os.walk(root):
        if os.path.basename(directory) == "tmp":
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    found[os.path.relpath(path, root)] = os.stat(path).st_size
    return found


def pop3_on(port: int, user: str) -> ProxiedPOP3:
    """A POP3 session straight to one node's ``haproxy:`` listener, logged in."""
    client = ProxiedPOP3("127.0.0.1", port, client_ip="127.0.0.1", timeout=TIMEOUT)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def uidls(client: poplib.POP3) -> list[bytes]:
    return [line.split()[1] for line in client.uidl()[1]]


# -- the test ------------------------------------------------------------------------


class TwoNodesOnGlusterFSTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.volume = yield start_gluster_volume(self, 2, VOLUME_OPTIONS, MOUNT_OPTIONS)
        self.ports = {name: free_port() for name in
                      ("smtp", "pop3", "a_smtp", "a_pop3", "b_smtp", "b_pop3")}
        self.ledger = Ledger()
        self.rng = random.Random(16)
        self.sessions: list[Session] = []

    def node_settings(self, node: str, mount: str) -> dict[str, dict]:
        return {
            "server": {"data_dir": os.path.join(mount, "popgate"),
                       "hostname": f"node-{node}.mx.test"},
            "smtp": {"listen": [f"haproxy:tcp:{self.ports[node + '_smtp']}:"
                                "interface=127.0.0.1"]},
            "pop3": {"listen": [f"haproxy:tcp:{self.ports[node + '_pop3']}:"
                                "interface=127.0.0.1"]},
            "limits": {"trusted_proxies": ["127.0.0.1/32"]},
        }

    @defer.inlineCallbacks
    def start_node(self, node: str, mount: str, **options):
        """Start a node; once it ends, its log is kept in its directory (node.log)."""
        server = yield start_twistd(self, self.node_settings(node, mount), **options)

        def keep_log(result):
            with open(os.path.join(server.directory, "node.log"), "wb") as f:
                f.write(server.log)
            return result
        server.process.ended.addBoth(keep_log)
        return server

    def expected_states(self, **nodes: str) -> dict[str, str]:
        return {f"{backend}/node-{node}": state for node, state in nodes.items()
                for backend in ("smtp_nodes", "pop3_nodes")}

    def deliver(self, count: int, workers: int = 4) -> defer.Deferred:
        """``count`` messages through HAProxy by ``workers`` concurrent clients; fires
        with their sessions."""
        lock = threading.Lock()
        sessions: list[Session] = []
        numbers = iter(range(count))

        def worker(seed: int):
            rng = random.Random(seed)
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                sessions.append(send_one(self.ports["smtp"], self.ledger,
                                         USERS[number % len(USERS)], rng))
        seeds = [self.rng.getrandbits(32) for _ in range(workers)]
        done = defer.gatherResults([threads.deferToThread(worker, s) for s in seeds],
                                   consumeErrors=True)
        return done.addCallback(lambda _: sessions)

    @defer.inlineCallbacks
    def test_two_nodes_behind_haproxy_on_one_volume(self):
        mount_a, mount_b = self.volume.mounts
        started = time.monotonic()
        self.node_a = yield self.start_node(
            "a", mount_a, users=[(user, PASSWORD) for user in (*USERS, HANDOVER_USER)])
        self.haproxy = yield start_haproxy(self, HAPROXY_CONFIG.format(**self.ports))
        yield self.haproxy.wait_for(self.expected_states(a="UP", b="DOWN"))

        yield self.b_starts_while_a_has_files_in_tmp(mount_a, mount_b)
        yield self.deliveries_land_on_both_nodes()
        yield self.pop3_lock_and_deletions_hold_across_nodes()
        yield self.kill_a_under_load()

        stored_a, stored_b = inventory(mount_a), inventory(mount_b)
        self.assertEqual(stored_a, stored_b, "the two mounts disagree")
        figures = audit(self.ledger, stored_a)
        per_node = {node: sum(1 for *_, n in stored_a if n == node)
                    for node in ("node-a.mx.test", "node-b.mx.test")}
        log.info("two nodes on GlusterFS: {figures}; stored per node: {per_node}; "
                 "whole test {seconds:.1f} s", figures=figures, per_node=per_node,
                 seconds=time.monotonic() - started)
        self.assertEqual((figures["lost"], figures["duplicated"],
                          figures["stored_though_refused"], figures["unknown_tokens"]),
                         (0, 0, 0, 0), figures)
        self.assertEqual(figures["delivered"], figures["acknowledged"])

    @defer.inlineCallbacks
    def b_starts_while_a_has_files_in_tmp(self, mount_a: str, mount_b: str):
        """B's start-up, and B's deliveries, remove nothing A still uses."""
        sessions = yield self.deliver(9)  # A makes spare files for each user
        self.assertEqual({(s.outcome, s.node) for s in sessions}, {("ok", "node-a.mx.test")})
        held = yield defer.gatherResults([
            threads.deferToThread(HeldDelivery, self.ports["smtp"], self.ledger, user,
                                  random.Random(index))
            for index, user in enumerate(USERS)])
        self.assertEqual({h.node for h in held}, {"node-a.mx.test"})
        before = tmp_files(mount_a)
        self.assertGreaterEqual(sum(1 for size in before.values() if size > 0), len(held),
                                f"A's partly written messages are not in tmp/: {before}")
        self.assertTrue(any(size == 0 for size in before.values()),
                        f"A has no spare files in tmp/: {before}")

        self.node_b = yield self.start_node("b", mount_b, namespace_host="node-b")
        yield self.haproxy.wait_for(self.expected_states(a="UP", b="UP"))
        # A drained (its sessions continue), so that B alone delivers; A stays idle.
        yield self.haproxy.command("disable server smtp_nodes/node-a")
        sessions = yield self.deliver(9)
        self.assertEqual({(s.outcome, s.node) for s in sessions}, {("ok", "node-b.mx.test")})
        yield self.haproxy.command("enable server smtp_nodes/node-a")
        for mount in (mount_a, mount_b):
            self.assertEqual(sorted(set(before) - set(tmp_files(mount))), [],
                             "A's tmp/ files removed while A uses them")

        answers = yield defer.gatherResults([threads.deferToThread(h.finish) for h in held])
        self.assertEqual([code for code, _ in answers], [250] * len(held), answers)
        yield self.haproxy.wait_for(self.expected_states(a="UP", b="UP"))

    @defer.inlineCallbacks
    def deliveries_land_on_both_nodes(self):
        sessions = yield self.deliver(60)
        self.assertEqual({s.outcome for s in sessions}, {"ok"})
        nodes = {s.node for s in sessions}
        self.assertEqual(nodes, {"node-a.mx.test", "node-b.mx.test"})

    @defer.inlineCallbacks
    def pop3_lock_and_deletions_hold_across_nodes(self):
        self.node_a.store(HANDOVER_USER, [b"Subject: handover %d\n\nbody\n" % n
                                          for n in range(5)])
        ports = (self.ports["a_pop3"], self.ports["b_pop3"])
        for holder, other in (ports, ports[::-1]):
            refusal = yield threads.deferToThread(self.refused_while_held, holder, other)
            self.assertTrue(refusal.startswith(b"-ERR [IN-USE]"), refusal)
        # A client that has QUIT's answer may log in through the other node at once.
        refusals = yield threads.deferToThread(self.handovers, ports, 40)
        self.assertEqual(refusals, [])
        # Once B's listing is settled (popgate trusts a directory stamp 2 s old), a
        # deletion through A must be seen by B's next session at once.
        yield deferred_sleep(2.1)
        before, deleted, after = yield threads.deferToThread(self.delete_through_a)
        self.assertEqual(len(before), 5)
        self.assertEqual(after, [uid for uid in before if uid != deleted])

    def refused_while_held(self, holder: int, other: int) -> bytes:
        """A session on ``holder`` logged in; the answer to a login on ``other``."""
        held = pop3_on(holder, HANDOVER_USER)
        try:
            pop3_on(other, HANDOVER_USER).quit()
            return b"(logged in)"
        except poplib.error_proto as e:
            return e.args[0]
        finally:
            held.quit()

    def handovers(self, ports: tuple[int, int], count: int) -> list[bytes]:
        """``count`` sessions, alternately on each node, each started as soon as the
        previous one's QUIT is answered; the refusals they met."""
        refusals = []
        for number in range(count):
            try:
                pop3_on(ports[number % 2], HANDOVER_USER).quit()
            except poplib.error_proto as e:
                refusals.append(e.args[0])
        return refusals

    def delete_through_a(self):
        on_b = pop3_on(self.ports["b_pop3"], HANDOVER_USER)
        before = uidls(on_b)
        on_b.quit()
        on_a = pop3_on(self.ports["a_pop3"], HANDOVER_USER)
        on_a.dele(1)
        on_a.quit()
        on_b = pop3_on(self.ports["b_pop3"], HANDOVER_USER)
        after = uidls(on_b)
        on_b.quit()
        return before, before[0], after

    @defer.inlineCallbacks
    def kill_a_under_load(self):
        """Four SMTP senders and two POP3 readers through HAProxy; ``kill -9`` of A after
        1.5 s; 3 s more."""
        stop = threading.Event()
        sessions: list[Session] = []
        mismatches: list[str] = []

        def record(session: Session) -> None:
            sessions.append(session)
            if session.outcome == "refused":
                time.sleep(0.05)  # as a client would wait before it tries again

        def sender(seed: int):
            rng = random.Random(seed)
            for number in itertools.count(seed):
                if stop.is_set():
                    return
                record(send_one(self.ports["smtp"], self.ledger, USERS[number % len(USERS)],
                                rng))

        def reader(user: str):
            while not stop.is_set():
                record(read_some(self.ports["pop3"], user, self.ledger, mismatches))

        workers = [threads.deferToThread(sender, seed) for seed in range(4)]
        workers += [threads.deferToThread(reader, user) for user in USERS[:2]]
        yield deferred_sleep(1.5)
        killed = time.monotonic()
        os.kill(self.node_a.pid, signal.SIGKILL)
        yield self.node_a.process.ended
        yield self.haproxy.wait_for(self.expected_states(a="DOWN", b="UP"))
        down = time.monotonic()
        yield deferred_sleep(3.0)
        stop.set()
        yield defer.gatherResults(workers, consumeErrors=True)

        outcomes: dict[tuple[str, str, str], int] = {}
        for s in sessions:
            window = ("before the kill" if s.started < killed else
                      "until A was marked down" if s.started < down else "after")
            outcomes[s.kind, window, s.outcome] = outcomes.get((s.kind, window, s.outcome), 0) + 1
        log.info("kill -9 of node A: HAProxy marked it down after {detect:.2f} s; sessions "
                 "(kind, started, outcome): {outcomes}; refused from the kill on: {refused}",
                 detect=down - killed, outcomes=outcomes,
                 refused=sum(1 for s in sessions if s.started >= killed
                             and s.outcome == "refused"))
        after_down = [s for s in sessions if s.started >= down]
        log.info("sessions refused or broken: {errors}",
                 errors=sorted({(s.kind, s.outcome, s.error) for s in sessions if s.error}))
        self.assertEqual(mismatches, [], "POP3 returned messages unlike those acknowledged")
        # Each reader is its user's only client: its next session never finds the lock.
        self.assertNotIn(("pop3", "before the kill", "in-use"), outcomes)
        self.assertEqual({s.outcome for s in after_down}, {"ok"}, outcomes)
        self.assertEqual({s.node for s in after_down if s.kind == "smtp"}, {"node-b.mx.test"})
        self.assertGreater(sum(1 for s in after_down if s.kind == "pop3"), 0)
