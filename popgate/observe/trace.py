"""The protocol trace: every command and reply of every session, as ``C:`` / ``S:`` lines.

Switched on by ``[log] trace = true`` or ``twistd popgate --trace``.  One log event per
line, e.g.::

    3QZK1 POP3 127.0.0.1:50312 C: PASS ********
    3QZK1 POP3 127.0.0.1:50312 S: +OK alice@example.org has 2 messages (1284 octets)
    3QZK1 POP3 127.0.0.1:50312 S: +OK 642 octets [body: 642 octets, Subject: hello]

The session id comes first so that ``grep 3QZK1`` gives one session.  A reply of several
lines is shown by its first line and the number of lines that follow; a message body
(RETR, TOP) only by the summary the protocol gives, never whole; the data of a message
delivered over SMTP or LMTP (DATA, BDAT) as one ``C: [message data: ...]`` line with its
sizes, from the delivery event.  Secrets are masked by the protocol before it publishes, and once
more here (:class:`~popgate.observe.redact.SecretMask`).

The log events carry ``session``, ``protocol``, ``client``, ``direction`` (``C`` or ``S``)
and ``line`` as fields, for the JSON log format.  Cost: one log event per command and
reply, and the protocols publish those events only while someone subscribes to them;
meant for a lab or for debugging, not for a busy server.  Reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from popgate.events import Event, EventBus
from popgate.observe.redact import SecretMask

_FORMAT = "{session} {protocol} {client} {direction}: {line}"


class ProtocolTrace:
    """Subscribes to ``command``, ``reply`` and ``closed`` events; logs each line."""

    def __init__(self, log: Logger | None = None):
        self._log = log or Logger(namespace="popgate.trace")
        self._mask = SecretMask()

    def subscribe(self, events: EventBus) -> Callable[[], None]:
        return events.subscribe(self, ("command", "reply", "message", "closed"))

    def __call__(self, event: Event) -> None:
        session = event.session
        if event.kind == "closed":
            self._mask.closed(session.id)
            return
        line = event.data.get("line", "")
        if event.kind == "message":
            if event.data.get("action") != "delivered":
                return
            direction, line = "C", delivered_body(event.data)
        elif event.kind == "command":
            direction, line = "C", self._mask.command(session.id, line)
        else:
            direction = "S"
            self._mask.reply(session.id, line)
        if event.kind != "message":  # a delivery's summary is in its line already
            line = describe_line(line, event.data)
        self._log.info(_FORMAT, session=session.id, protocol=session.protocol,
                       client=session.client, direction=direction, line=line)


def delivered_body(data) -> str:
    """The message data a client sent (DATA or BDAT), as the trace shows it: the
    protocol publishes no line per body line, only the delivery, just before its 250."""
    summary = data.get("summary")
    return (f"[message data: {data.get('octets')} octets stored, {data.get('list_octets')} "
            f"as LIST reports them{'; ' + summary if summary else ''}]")


def describe_line(text: str, data) -> str:
    """A command's or reply's (masked) first line, what a message body in it was, and
    how many lines followed it."""
    summary = data.get("summary")
    if summary:
        text += f" [body: {summary}]"
    more = data.get("lines", 1) - 1
    if more > 0:
        text += f" (+{more} line{'s' if more > 1 else ''})"
    return text
