"""SASL mechanisms for the AUTH commands of POP3 (RFC 5034) and SMTP (RFC 4954).

An :class:`Exchange` turns the client's base64 responses into :class:`Credentials`, one
step at a time, without knowing which protocol carries it:

* ``PLAIN`` (RFC 4616): one response, ``authzid NUL authcid NUL passwd``; sent as the
  initial response or after an empty challenge.
* ``LOGIN`` (draft-murchison-sasl-login): the challenges ``Username:`` and ``Password:``,
  one response each; an initial response is the user name.

Wire rules shared by both protocols: a response is base64 (RFC 4648, no line breaks);
``=`` as an initial response means an empty one (RFC 4954 §4, RFC 5034 §4); ``*`` cancels
(:class:`SASLCancelled`).  Decoding errors raise :class:`SASLError` whose text is what the
protocol answers after its error prefix.  The secret is only ever inside
:class:`Credentials`; nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")


class SASLError(Exception):
    """A malformed exchange; ``str()`` is the text for the error reply."""


class SASLCancelled(SASLError):
    def __init__(self):
        super().__init__("Authentication cancelled")


@dataclass(frozen=True, repr=False)
class Credentials:
    """What an exchange yields; ``repr`` hides the password."""

    authzid: bytes
    authcid: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"Credentials(authcid={self.authcid!r}, password=********)"


def _decode(response: bytes, what: str) -> bytes:
    if response.strip() == b"*":
        raise SASLCancelled()
    if response.strip() == b"=":
        return b""  # an empty response, however it comes
    try:
        return base64.b64decode(response.strip(), validate=True)
    except binascii.Error:
        raise SASLError(f"Invalid base64 in the {what}") from None


class Exchange:
    """One SASL exchange; :meth:`step` is called with each client response."""

    name = ""

    def first(self, initial: bytes | None) -> bytes | Credentials:
        """Start: with the initial response (``=`` for an empty one), or None for none.

        Returns the next challenge (raw, the protocol base64-encodes it) or the result.
        """
        if initial is None:
            return self.challenge()
        return self.step(b"" if initial == b"=" else initial, raw=initial == b"=")

    def challenge(self) -> bytes:
        raise NotImplementedError

    def step(self, response: bytes, raw: bool = False) -> bytes | Credentials:
        raise NotImplementedError


class PlainExchange(Exchange):
    name = "PLAIN"

    def challenge(self) -> bytes:
        return b""  # RFC 5034 §4 / RFC 4954 §4: an empty challenge asks for the response

    def step(self, response: bytes, raw: bool = False) -> Credentials:
        message = response if raw else _decode(response, "PLAIN response")
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SASLError("Malformed PLAIN response")
        return Credentials(*parts)


class LoginExchange(Exchange):
    name = "LOGIN"

    def __init__(self):
        self._user: bytes | None = None

    def challenge(self) -> bytes:
        return b"Username:" if self._user is None else b"Password:"

    def step(self, response: bytes, raw: bool = False) -> bytes | Credentials:
        what = "user name" if self._user is None else "password"
        value = response if raw else _decode(response, what)
        if self._user is None:
            if not value or b"\0" in value:
                raise SASLError("Malformed LOGIN user name")
            self._user = value
            return self.challenge()
        return Credentials(b"", self._user, value)


def exchange(mechanism: str) -> Exchange:
    """A new exchange for ``mechanism`` (case-insensitive); SASLError if unsupported."""
    kinds = {"PLAIN": PlainExchange, "LOGIN": LoginExchange}
    kind = kinds.get(mechanism.upper())
    if kind is None:
        raise SASLError("Unsupported authentication mechanism")
    return kind()

