"""Delivery status notifications (RFC 3464) for queued mail that could not be relayed.

:func:`bounce` builds the ``multipart/report; report-type=delivery-status`` message
(RFC 6522) that goes into the sender's own Maildir: a human-readable part, the
``message/delivery-status`` part with one block per failed recipient (``Action: failed``,
the RFC 3463 ``Status`` from the smarthost's enhanced code, its ``Diagnostic-Code``), and
the original message's header as ``text/rfc822-headers``.  The result has LF line ends,
as the Maildir stores messages.

A bounce never bounces: it is delivered locally with the null reverse-path and is never
queued; the runner drops it (logged) if it cannot be delivered.  No Twisted, no I/O.
"""

from __future__ import annotations

import email.utils
import re
import secrets

from popgate.codec import header_section
from popgate.relay.queue import Envelope

_ENHANCED = re.compile(r"^(?:\d{3}[ -])?([245])\.(\d{1,3})\.(\d{1,3})\b")
EXPIRED = "4.4.7"  # RFC 3463: delivery time expired


def status_of(reply: str, default: str = "5.0.0") -> str:
    """The RFC 3463 status of an SMTP reply ("550 5.1.1 ..." -> "5.1.1"); failures the
    smarthost answered without an enhanced code get ``default``."""
    match = _ENHANCED.match(reply)
    if match is None:
        return default
    return ".".join(match.groups())


def bounce(envelope: Envelope, message: bytes, *, hostname: str, smarthost: str,
           now: float) -> bytes:
    """The DSN for the envelope's failed recipients."""
    boundary = f"=_popgate-dsn-{secrets.token_hex(8)}"
    failed = envelope.failed()
    human = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
        *(f"<{r.address}>: {r.reply}" for r in failed),
        "",
        "The header of your message is attached.",
    ]
    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Popgate-Queue-ID: {envelope.id}",
        f"Arrival-Date: {email.utils.formatdate(envelope.created, localtime=True)}",
    ]
    for recipient in failed:
        code = recipient.reply
        status += [
            "",
            f"Final-Recipient: rfc822; {recipient.address}",
            "Action: failed",
            f"Status: {status_of(code)}",
            *([f"Remote-MTA: dns; {smarthost}"] if smarthost else []),  # "": direct to MX
            f"Diagnostic-Code: smtp; {code}",
            f"Last-Attempt-Date: {email.utils.formatdate(now, localtime=True)}",
        ]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: <{envelope.id}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: not to be answered automatically
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered message headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\n".join(head).encode("utf-8") + b"\n"
    return text + header_section(message) + f"\n--{boundary}--\n".encode("ascii")
