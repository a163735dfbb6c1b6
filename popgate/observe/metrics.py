"""Prometheus metrics from the session events, served as text at ``/metrics``.

Every metric lives in one :class:`prometheus_client.CollectorRegistry` made per
:class:`Metrics` (none is registered globally), so that two servers in one process (the
tests) do not share counters.  The metrics, all prefixed ``popgate_``:

=======================================  ============================================
``sessions_open{protocol}``              sessions now open (SMTP, LMTP, POP3 ...)
``sessions_total{protocol}``             sessions opened since start
``logins_total{protocol,result}``        ok, failed, in-use, error
``messages_delivered_total{protocol}``   messages stored (one per SMTP transaction)
``delivered_octets_total{protocol}``     their size as stored (LF line ends)
``pop3_commands_total{command}``         RETR, TOP and DELE that succeeded
``refusals_total{protocol,reason}``      refusals: SMTP by reply code ("550 5.1.1"),
                                         POP3 and connection caps by reason (at most
                                         50 values; the rest count as ``other``)
``delivery_seconds``                     histogram: end of data to ``250``
``mailbox_messages{user}``, ``_octets``  per user, from the last Maildir survey (at most
                                         ``max_users`` users, the biggest; the rest as
                                         ``user="(others)"``); octets as LIST reports
``auth_queue_length``                    password checks waiting for a hashing thread
=======================================  ============================================

Secrets cannot reach a label: labels are protocol names, fixed words, reply codes,
refusal reasons written by the protocols and user names from the user database.
Reactor thread only, except :meth:`MetricsPage.render_GET`, which also runs there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource

from popgate.events import Event, EventBus
from popgate.observe.log import refusal_cause

MAX_REASONS = 50
_POP3_COMMANDS = {"retrieved": "RETR", "topped": "TOP", "deleted": "DELE"}
# From a loopback fsync (under a millisecond) to a slow disk or a busy group commit.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """Counts what the events report; ``registry`` holds the result."""

    def __init__(self, auth_queue: Callable[[], int] | None = None,
                 mailboxes: Callable[[], Sequence] | None = None, max_users: int = 100):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._reasons: set[str] = set()
        self._open: set[str] = set()  # ids: a refused connection may close unannounced

        def metric(cls, name, doc, labels=(), **kw):
            return cls(f"popgate_{name}", doc, labels, registry=registry, **kw)

        self.sessions_open = metric(Gauge, "sessions_open", "Open sessions", ["protocol"])
        self.sessions = metric(Counter, "sessions", "Sessions opened", ["protocol"])
        self.logins = metric(Counter, "logins", "Login attempts by result",
                             ["protocol", "result"])
        self.delivered = metric(Counter, "messages_delivered", "Messages stored",
                                ["protocol"])
        self.delivered_octets = metric(Counter, "delivered_octets",
                                       "Octets of the messages stored (LF line ends)",
                                       ["protocol"])
        self.pop3_commands = metric(Counter, "pop3_commands",
                                    "RETR, TOP and DELE commands that succeeded", ["command"])
        self.refusals = metric(Counter, "refusals", "Refusals by reason",
                               ["protocol", "reason"])
        self.delivery_latency = metric(Histogram, "delivery_seconds",
                                       "End of message data to the 250 reply",
                                       buckets=_LATENCY_BUCKETS)
        if auth_queue is not None:
            queue = metric(Gauge, "auth_queue_length",
                           "Password checks waiting for a hashing thread")
            queue.set_function(auth_queue)
        if mailboxes is not None:
            registry.register(_MailboxCollector(mailboxes, max_users))

    def subscribe(self, events: EventBus) -> Callable[[], None]:
        return events.subscribe(self, ("connected", "login", "message", "refused", "closed"))

    def __call__(self, event: Event) -> None:
        protocol = event.session.protocol
        data = event.data
        kind = event.kind
        if kind == "connected":
            self._open.add(event.session.id)
            self.sessions.labels(protocol).inc()
            self.sessions_open.labels(protocol).inc()
        elif kind == "closed":
            if event.session.id in self._open:
                self._open.discard(event.session.id)
                self.sessions_open.labels(protocol).dec()
        elif kind == "login":
            self.logins.labels(protocol, data.get("result", "error")).inc()
        elif kind == "refused":
            self.refusals.labels(protocol, self._reason(data)).inc()
        elif kind == "message":
            self._message(protocol, data)

    def _message(self, protocol: str, data) -> None:
        action = data.get("action")
        if action == "delivered":
            self.delivered.labels(protocol).inc()
            self.delivered_octets.labels(protocol).inc(data.get("octets", 0))
            latency = data.get("latency")
            if latency is not None:
                self.delivery_latency.observe(latency)
        elif action in _POP3_COMMANDS:
            self.pop3_commands.labels(_POP3_COMMANDS[action]).inc()

    def _reason(self, data) -> str:
        """The refusal's label: an SMTP reply's code and enhanced code ("550 5.1.1"; its
        text may quote the client), else the protocol's reason.  Bounded: a label never
        seen once MAX_REASONS are known is "other"."""
        reason = refusal_cause(data)
        if reason in self._reasons:
            return reason
        if len(self._reasons) >= MAX_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason


class _MailboxCollector:
    """Per-user gauges from the last survey (no disk access while scraping)."""

    def __init__(self, mailboxes: Callable[[], Sequence], max_users: int):
        self._mailboxes = mailboxes
        self._max_users = max_users

    def describe(self):
        return []  # the user labels are only known at collect time

    def collect(self):
        messages = GaugeMetricFamily("popgate_mailbox_messages",
                                     "Messages in new/ and cur/, per user", labels=["user"])
        octets = GaugeMetricFamily("popgate_mailbox_octets",
                                   "Octets as POP3 LIST reports them, per user",
                                   labels=["user"])
        boxes = sorted(self._mailboxes(), key=lambda box: (-box.octets, box.user))
        shown, others = boxes[:self._max_users], boxes[self._max_users:]
        for box in shown:
            messages.add_metric([box.user], box.messages)
            octets.add_metric([box.user], box.octets)
        if others:
            messages.add_metric(["(others)"], sum(box.messages for box in others))
            octets.add_metric(["(others)"], sum(box.octets for box in others))
        yield messages
        yield octets


class MetricsPage(Resource):
    """``/metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self._registry = metrics.registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
