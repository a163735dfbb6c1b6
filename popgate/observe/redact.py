"""A second line of defence for secrets in command lines.

The protocols publish ``command`` events with secrets already replaced by ``********``
(see :mod:`popgate.events`).  Every observer that shows command lines to people (the
trace, the dashboard) also passes them through :class:`SecretMask`, so that a protocol
that forgets one path (a new mechanism, an error path) still leaks nothing: a secret
that a client sends is recognised here by where it stands in the dialogue.

What counts as secret (RFC 1939 §7 APOP and PASS, RFC 5034 and RFC 4954 SASL):

* ``PASS <anything>``; ``APOP <user> <digest>`` (the digest);
* ``AUTH <mechanism> <initial-response>`` (the initial response);
* any line sent right after a SASL challenge (POP3 ``+ ...``, SMTP ``334 ...``), except
  ``*``, which cancels the exchange.

Concurrency: reactor thread only.  Memory: one entry per session waiting for a SASL
response, removed at its next command or when it closes.
"""

from __future__ import annotations

from popgate.events import SECRET, redact


class SecretMask:
    """Per-session memory of "a SASL challenge was just sent"."""

    def __init__(self) -> None:
        self._challenged: set[str] = set()

    def reply(self, session_id: str, line: str) -> None:
        if line.startswith(("+ ", "334 ")) or line in ("+", "334"):
            self._challenged.add(session_id)

    def command(self, session_id: str, line: str) -> str:
        """``line`` with any secret in it replaced by :data:`~popgate.events.SECRET`."""
        if session_id in self._challenged:
            self._challenged.discard(session_id)
            return line if line.strip() == "*" else SECRET
        return redact(line)

    def closed(self, session_id: str) -> None:
        self._challenged.discard(session_id)

