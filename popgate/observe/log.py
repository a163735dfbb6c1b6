"""The session log: one readable line per thing that happened, from the session events.

Every line starts with the protocol and the session id, then the client address and
port, so that two sessions from one host can be told apart::

    SMTP [K3F9a] 192.0.2.1:40000 connected
    SMTP [K3F9a] 192.0.2.1:40000 3NB2AYQCK2ZNQ: delivered from <bob@example.net> to
        alice@example.org (612 octets stored, 634 as LIST reports them) TLSv1.3
    POP3 [K3F9b] 192.0.2.1:40002 closed (quit): user=alice@example.org retr=1/634 del=1/634 0.4 s

The event's fields travel with each line (``log_format`` renders them; a JSON log keeps
them as fields).  Refusals are rate-limited per client and cause (one line a minute; see
:func:`refusal_cause`), so a client hammering bad commands cannot flood the log.
Commands and replies are not logged here: that is the protocol trace's job.  Secrets
never arrive: the events carry none.  Reactor thread only.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from popgate.events import Event, EventBus
from popgate.loglimit import LogLimiter

_log = Logger(namespace="popgate.session")
_SMTP_CODES = re.compile(r"[245]\d\d(?: [245]\.\d{1,3}\.\d{1,3})?(?= |\Z)")


def refusal_cause(data) -> str:
    """What a ``refused`` event counts as, for log rate limits and metric labels: an SMTP
    reply's code and enhanced code (``550 5.1.1``: its text may quote the client, such as
    each address a guesser tries), else the protocol's reason."""
    found = _SMTP_CODES.match(data.get("reply") or "")
    return found.group(0) if found else data.get("reason", "")


class SessionLog:
    """Writes the session events to a twisted.logger ``Logger``."""

    def __init__(self, clock, logger: Logger = _log):
        self._log = logger
        self._refusals = LogLimiter(clock)

    def subscribe(self, events: EventBus) -> None:
        events.subscribe(self, ("connected", "tls", "login", "message", "refused", "closed"))

    def __call__(self, event: Event) -> None:
        getattr(self, "_" + event.kind)(event)

    def _emit(self, event: Event, text: str, level: str = "info") -> None:
        session = event.session
        head = f"{session.protocol} [{session.id}] {session.client} "
        # Formatted here: the fields travel with the line, but a format string without
        # fields is much cheaper for the log observer to render (this runs per message).
        getattr(self._log, level)((head + text).replace("{", "{{").replace("}", "}}"),
                                  session=session.id, proto=session.protocol,
                                  client=session.client, kind=event.kind, **event.data)

    def _connected(self, event: Event) -> None:
        self._emit(event, "connected" + (" (implicit TLS)" if event.data["tls"] else ""))

    def _tls(self, event: Event) -> None:
        self._emit(event, f"TLS started: {event.data['version']} {event.data['cipher']}")

    def _login(self, event: Event) -> None:
        data = event.data
        text = f"login {data['result']}: user={data['user']} mechanism={data['mechanism']}"
        if data["result"] == "ok":
            self._emit(event, text)
        elif self._refusals.allow((event.session.client_host, "login", data["result"])):
            self._emit(event, text, "warn")

    def _message(self, event: Event) -> None:
        data = event.data
        if data["action"] == "queued":
            self._emit(event, f"{data['id']}: queued from <{data['sender']}> for relay to "
                              f"{', '.join(data['recipients'])} ({data['octets']} octets)")
        if data["action"] != "delivered":
            return
        self._emit(event, f"{data['id']}: delivered from <{data['sender']}> to "
                          f"{', '.join(data['users'])} ({data['octets']} octets stored, "
                          f"{data['list_octets']} as LIST reports them)"
                          + (f" {data['tls']}" if data.get("tls") else ""))

    def _refused(self, event: Event) -> None:
        key = (event.session.client_host, event.session.protocol, refusal_cause(event.data))
        if self._refusals.allow(key):
            self._emit(event, f"refused: {event.data['reply'] or event.data['reason']}", "warn")

    def _closed(self, event: Event) -> None:
        data = event.data
        if "messages" in data:
            summary = f"{data['messages']} message(s) accepted"
        else:
            summary = (f"user={data['user'] or '-'} "
                       f"retr={data['retrieved']}/{data['retrieved_octets']} "
                       f"del={data['deleted']}/{data['deleted_octets']}")
        tls = data.get("tls")
        self._emit(event, f"closed ({data['reason']}): {summary}"
                          f"{' ' + tls if tls else ''} {data['duration']:.1f} s")
