"""LabBoard: what the dashboard shows, kept from the session events.

For each open session: protocol, client, TLS, user, POP3 state, what it is doing (its
last command's verb, or ``delivered`` after a ``250`` for a message), the messages it has
marked deleted (by UIDL, with their session numbers), retrieved or delivered, and its
transcript (masked again by :class:`~popgate.observe.redact.SecretMask`; message bodies
appear only as the protocol's summary).  Closed sessions stay in a list of the most
recent ones.  Bounds: ``transcript_lines`` per session (the most recent; the number
dropped is counted), ``recent`` closed sessions, ``max_open`` open sessions shown (a
busy server's others are counted, not kept), 20 deliveries per session.

Browsers follow it through :meth:`add_stream` (server-sent events): at most every
``flush_interval`` seconds, one ``session`` event per session that changed and one
``mailboxes`` event when the Maildir survey changed; a ``flow`` event at once for each
message pushed into or pulled out of a mailbox (the page animates those).  Nothing is
built for streams when none is open.  Reactor thread only.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict

from twisted.internet import defer

from popgate.events import Event, EventBus
from popgate.observe.redact import SecretMask
from popgate.observe.trace import delivered_body, describe_line
from popgate.store.survey import MaildirSurvey

_RCPT = re.compile(r"RCPT\s+TO:\s*<([^>]*)>", re.IGNORECASE)
_MAX_DELIVERIES = 20


class LabBoard:
    def __init__(self, clock, watch=None, *, recent: int = 15, transcript_lines: int = 60,
                 max_open: int = 50, flush_interval: float = 0.2):
        self._clock = clock
        self._watch = watch
        self._transcript_lines = transcript_lines
        self._max_open = max_open
        self._flush_interval = flush_interval
        self._mask = SecretMask()
        self.open: OrderedDict[str, dict] = OrderedDict()
        self.not_shown = 0  # open sessions beyond max_open
        self._hidden: set[str] = set()
        self.recent: deque[dict] = deque(maxlen=recent)
        self._streams: list[Callable[[bytes], None]] = []
        self._dirty: dict[str, dict] = {}
        self._mailboxes_dirty = False
        self._flush_call = None
        if watch is not None:
            watch.listen(self._mailboxes_changed)

    def subscribe(self, events: EventBus) -> Callable[[], None]:
        return events.subscribe(self)

    # -- events --------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        session_id = event.session.id
        if event.kind == "connected":
            if len(self.open) >= self._max_open:
                self.not_shown += 1
                self._hidden.add(session_id)
                return
            self.open[session_id] = _new_session(event)
        if session_id in self._hidden:
            if event.kind == "closed":
                self._hidden.discard(session_id)
                self.not_shown -= 1
            return
        session = self.open.get(session_id)
        if session is None:
            return  # began before the board (or was never announced): not shown
        handler = getattr(self, f"_on_{event.kind}")
        handler(session, event)
        self._changed(session)

    def _on_connected(self, session: dict, event: Event) -> None:
        session["tls"] = "implicit TLS" if event.data.get("tls") else None

    def _on_command(self, session: dict, event: Event) -> None:
        line = self._mask.command(event.session.id, event.data.get("line", ""))
        self._transcript(session, event, "C", describe_line(line, event.data))
        session["doing"] = line.split(" ", 1)[0].upper()
        found = _RCPT.match(line)
        if found:
            target = _user_of(found.group(1))
            if target and target not in session["targets"]:
                session["targets"].append(target)
        if session["doing"] in ("DATA", "BDAT") and self._watch is not None:
            self._watch.refresh_soon()

    def _on_reply(self, session: dict, event: Event) -> None:
        line = event.data.get("line", "")
        self._mask.reply(event.session.id, line)
        self._transcript(session, event, "S", describe_line(line, event.data))

    def _on_tls(self, session: dict, event: Event) -> None:
        session["tls"] = f"{event.data.get('version', '')} {event.data.get('cipher', '')}"

    def _on_login(self, session: dict, event: Event) -> None:
        data = event.data
        session["logins"].append({"user": data.get("user"), "mechanism": data.get("mechanism"),
                                  "result": data.get("result")})
        if data.get("result") == "ok":
            session["user"] = data.get("user")

    def _on_state(self, session: dict, event: Event) -> None:
        session["state"] = event.data.get("state")

    def _on_message(self, session: dict, event: Event) -> None:
        data = event.data
        action = data.get("action")
        if action == "delivered":
            delivery = {key: data.get(key) for key in
                        ("id", "sender", "recipients", "users", "octets", "list_octets", "tls")}
            session["delivered"] = (session["delivered"] + [delivery])[-_MAX_DELIVERIES:]
            session["doing"] = "delivered"  # until its next command
            self._transcript(session, event, "C", delivered_body(data))
            for user in data.get("users", ()):
                self._flow("push", event.session.id, user, data.get("id"))
        elif action in ("retrieved", "topped"):
            uidl = data.get("uidl")
            if action == "retrieved" and uidl not in session["retrieved"]:
                session["retrieved"].append(uidl)
            self._flow("pull", event.session.id, session.get("user"), uidl)
        elif action == "deleted":
            session["marked"][data.get("uidl")] = data.get("number")
        elif action == "undeleted":
            session["marked"] = {}
        elif action == "removed":
            session["removed"] = {"count": data.get("count"), "octets": data.get("octets")}
        if self._watch is not None:
            self._watch.refresh_soon()

    def _on_refused(self, session: dict, event: Event) -> None:
        session["refusals"].append(event.data.get("reason"))
        session["refusals"] = session["refusals"][-10:]

    def _on_closed(self, session: dict, event: Event) -> None:
        self._mask.closed(event.session.id)
        data = event.data
        session["open"] = False
        session["closed"] = {key: value for key, value in data.items()
                             if isinstance(value, str | int | float | bool | type(None))}
        del self.open[event.session.id]
        self.recent.appendleft(session)
        if self._watch is not None:
            self._watch.refresh_soon()  # UPDATE moved or removed files

    def _transcript(self, session: dict, event: Event, direction: str, line: str) -> None:
        lines = session["transcript"]
        lines.append([round(event.time - session["started"], 3), direction, line])
        if len(lines) > self._transcript_lines:
            del lines[0]
            session["dropped"] += 1

    # -- what browsers get ------------------------------------------------------------

    def sessions_json(self) -> dict:
        return {"open": list(self.open.values()), "recent": list(self.recent),
                "not_shown": self.not_shown}

    def mailboxes_json(self, surveys: list[MaildirSurvey] | None = None) -> dict:
        if surveys is None:
            surveys = self._watch.latest if self._watch is not None else []
        return {"mailboxes": [asdict(box) for box in surveys]}

    def fresh_mailboxes_json(self) -> defer.Deferred:
        """:meth:`mailboxes_json` from a survey begun now."""
        if self._watch is None:
            return defer.succeed(self.mailboxes_json([]))
        return self._watch.fresh().addCallback(self.mailboxes_json)

    def snapshot(self) -> bytes:
        """Everything a page needs to start (or to catch up), as one event."""
        return _sse("snapshot", {**self.sessions_json(), **self.mailboxes_json()})

    def add_stream(self, write: Callable[[bytes], None]) -> Callable[[], None]:
        """Send ``write`` a snapshot now and every change from now on; returns a remove."""
        write(self.snapshot())
        self._streams.append(write)

        def remove() -> None:
            if write in self._streams:
                self._streams.remove(write)

        return remove

    @property
    def streams(self) -> int:
        return len(self._streams)

    def _changed(self, session: dict) -> None:
        if self._streams:
            self._dirty[session["id"]] = session
            self._schedule_flush()

    def _mailboxes_changed(self, _surveys: list[MaildirSurvey]) -> None:
        if self._streams:
            self._mailboxes_dirty = True
            self._schedule_flush()

    def _flow(self, kind: str, session_id: str, user, item) -> None:
        if self._streams and user:
            self._send(_sse("flow", {"kind": kind, "session": session_id, "user": user,
                                     "item": item}))

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._flush_interval, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        chunks = [_sse("session", session) for session in self._dirty.values()]
        self._dirty = {}
        if self._mailboxes_dirty:
            self._mailboxes_dirty = False
            chunks.append(_sse("mailboxes", self.mailboxes_json()))
        self._send(b"".join(chunks))

    def _send(self, chunk: bytes) -> None:
        for write in tuple(self._streams):
            write(chunk)


def _new_session(event: Event) -> dict:
    info = event.session
    return {"id": info.id, "protocol": info.protocol, "client": info.client,
            "started": info.started, "open": True, "tls": None,
            "user": None, "state": None, "doing": None, "targets": [],
            "logins": [], "delivered": [], "retrieved": [], "marked": {}, "removed": None,
            "refusals": [], "transcript": [], "dropped": 0, "closed": None}


def _user_of(address: str) -> str | None:
    """The user an RCPT TO address names, for drawing the arrow before delivery (the
    delivered event names the real users, after aliases)."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return None
    return f"{local.partition('+')[0]}@{domain}".lower()


def _sse(name: str, payload) -> bytes:
    # One "data:" line: json.dumps escapes every newline inside strings.
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
