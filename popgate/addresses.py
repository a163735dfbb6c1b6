"""Mail addresses: the one place that decides what is a valid user, domain and SMTP path.

Two jobs live here:

* :func:`normalise_user` validates the name of a popgate user (``local@domain``), as typed
  by an administrator or a POP3 client.  Only such a validated name, found in the user
  database, is ever turned into a filesystem path, so the rules are deliberately narrow:
  lowercase letters, digits, ``.``, ``-`` and ``_`` in the local part (``+`` is reserved for
  sub-addresses), an LDH DNS domain, bounded lengths.
* :func:`parse_path` parses the ``<...>`` path of SMTP ``MAIL FROM`` / ``RCPT TO``
  (RFC 5321 §4.1.2) and reports the forms a relay-hijacker uses (source routes, ``%`` and
  ``!`` hacks, quoted local parts holding ``@``) so that the SMTP layer can refuse them.

Everything here is pure and Twisted-free; strings in, values or :class:`AddressError` out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 253  # RFC 1035 §2.3.4, without the trailing dot
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets

_USER_LOCAL = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# RFC 5321 §4.1.2 atext, plus UTF-8 when SMTPUTF8 is in force (RFC 6531 §3.3).
# "-" is escaped: at the end of _ATEXT it would form a range with what follows.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ATOM = rf"[{_ATEXT}\u0080-\U0010ffff]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
_QTEXT = r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]"
_QUOTED_STRING = re.compile(rf'"(?:{_QTEXT}|\\[\x20-\x7e])*"\Z')
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")


class AddressError(ValueError):
    """An address that popgate refuses; ``str(error)`` is safe to show to the client."""


def normalise_domain(domain: str) -> str:
    """Return ``domain`` lowercased, or raise AddressError if it is not an LDH DNS name."""
    domain = domain.lower()
    if not domain:
        raise AddressError("empty domain")
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} characters")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"invalid domain {domain!r}")
    return domain


def normalise_user(name: str) -> str:
    """Validate a user name ``local@domain`` and return it in canonical (lowercase) form."""
    if not isinstance(name, str) or not name.isascii() or not name.isprintable():
        raise AddressError("user names are printable ASCII only")
    local, at, domain = name.lower().rpartition("@")
    if not at:
        raise AddressError(f"{name!r} is not of the form local@domain")
    if not local:
        raise AddressError("empty local part")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} characters")
    if "+" in local:
        raise AddressError("'+' is reserved for sub-addresses (user+tag@domain)")
    if not _USER_LOCAL.match(local):
        raise AddressError(
            f"invalid local part {local!r}: use letters, digits, '.', '-', '_' "
            "(no leading, trailing or doubled dots)"
        )
    return f"{local}@{normalise_domain(domain)}"


def split_user(name: str) -> tuple[str, str]:
    """Split a normalised user name into (local, domain)."""
    local, _, domain = name.rpartition("@")
    return local, domain


@dataclass(frozen=True)
class Mailbox:
    """An SMTP mailbox as written by the client.

    ``local`` keeps its original case and quoting; ``domain`` is lowercased.  ``routed``
    is true when the client wrote an RFC 5321 §4.1.2 source route (``<@a,@b:u@c>``).
    """

    local: str
    domain: str
    quoted: bool = False
    routed: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def has_relay_hack(self) -> bool:
        """True for forms historically used to relay through a server.

        Source routes, ``user%host@local``, ``host!user@local`` and quoted local parts
        holding an ``@`` (``"a@b"@local``): RFC 5321 §3.6.1 and Appendix C say a server may
        refuse them, and popgate refuses them all rather than guess.
        """
        return self.routed or self.quoted or any(c in self.local for c in "%!@")


def parse_path(text: str, *, utf8: bool = False) -> Mailbox | None:
    """Parse an RFC 5321 ``Path`` (``<...>``); return None for the null path ``<>``.

    Raises AddressError for anything that is not a path.  Non-ASCII characters are allowed
    only when ``utf8`` (the SMTPUTF8 parameter, RFC 6531) is in force.
    """
    if len(text) > MAX_PATH:
        raise AddressError("path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    if not utf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    inner = text[1:-1]
    if inner == "":
        return None
    routed = False
    if inner.startswith("@"):
        # A-d-l ":" Mailbox; parsed only to be refused later (RFC 5321 §4.1.2, App. C).
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        routed = True
    return _parse_mailbox(inner, routed)


def _parse_mailbox(text: str, routed: bool) -> Mailbox:
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("address must be local-part@domain")
    quoted = local.startswith('"')
    if quoted:
        if not _QUOTED_STRING.match(local):
            raise AddressError("malformed quoted local part")
    elif not _DOT_STRING.match(local):
        raise AddressError("malformed local part")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if _ADDRESS_LITERAL.match(domain):
        return Mailbox(local, domain, quoted, routed)
    return Mailbox(local, _normalise_mail_domain(domain), quoted, routed)


def _normalise_mail_domain(domain: str) -> str:
    """Lowercase a domain; internationalised names are converted to their A-label form."""
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise AddressError("invalid internationalised domain") from e
    return normalise_domain(domain)
