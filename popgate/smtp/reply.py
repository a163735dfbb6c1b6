"""SMTP replies as values: the code, the RFC 3463 enhanced code and the text.

One :class:`Reply` type for success and refusal alike; the replies every part of the SMTP
side shares are named here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, enhanced status code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str


RELAY_DENIED = Reply(554, "5.7.1", "relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "no such user here")
TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
CANNOT_STORE = Reply(451, "4.3.0", "Error: cannot store the message now")
# RFC 5321 §4.2.2 452 "insufficient system storage"; RFC 3463 §3.4 X.3.1 "mail system full".
STORAGE_FULL = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")
# The users file has never loaded (UserDB logs why): temporary, or senders would bounce.
USERS_UNAVAILABLE = Reply(451, "4.3.0", "user database temporarily unavailable")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
