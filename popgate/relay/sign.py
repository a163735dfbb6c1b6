"""What a submitted message gets before it is queued: hygiene headers, a DKIM signature.

:func:`prepare` runs once per queued message, in a thread, on the queue file's bytes
(our ``Received:`` line, then the content as the client sent it; LF line ends):

1. **Hygiene** (RFC 5322 §3.6): ``Message-ID: <ID.RANDOM@hostname>`` and ``Date:`` are
   added when the client left them out, right after our ``Received:`` line; nothing else
   is changed.
2. **DKIM** (RFC 6376, with dkimpy): when the ``From:`` address's domain has a key in
   the key directory, a ``DKIM-Signature:`` goes on top: ``relaxed/relaxed``, ``d=`` the
   From domain, the header list :data:`SIGNED_HEADERS` as present, ``From`` listed
   twice (over-signed: a second From added on the way breaks the signature).  RSA
   (``rsa-sha256``) or Ed25519 (``ed25519-sha256``, RFC 8463) from the key file's form.

Keys are files ``<key_dir>/<domain>.<selector>.key`` (mode 0600): an RSA key in PEM, or
an Ed25519 seed in base64 (dkimpy's form).  :func:`keygen` writes one and returns the
TXT record to publish at ``<selector>._domainkey.<domain>``.  With no configured
selector, a domain's newest key signs (selector names ``sYYYYMM`` sort by date).

Blocking (file reads, RSA): called from threads.  No Twisted.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import secrets
import time

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from popgate.codec import header_section
from popgate.fileio import write_atomically

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
# RFC 6376 §5.4.1's recommendations, the MIME headers (From is added twice: over-signed).
SIGNED_HEADERS = (b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def dated_selector(now: float) -> str:
    """The default selector for a new key: ``sYYYYMM`` (``s202612``)."""
    return time.strftime("s%Y%m", time.gmtime(now))


def key_path(key_dir: str, domain: str, selector: str) -> str:
    return os.path.join(key_dir, f"{domain}.{selector}.key")


def keygen(key_dir: str, domain: str, selector: str, algorithm: str = "rsa") -> tuple[str, str]:
    """Write a new key (never over an existing one); -> (its path, the DNS TXT record)."""
    domain = domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a domain name: {domain!r}")
    if not _SELECTOR.match(selector):
        raise ValueError(f"not a selector (letters, digits, '-'): {selector!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    path = key_path(key_dir, domain, selector)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: choose another selector")
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        private = base64.b64encode(key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())) + b"\n"
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    write_atomically(path, private, 0o600)
    return path, txt_record(domain, selector, algorithm, public)


def txt_record(domain: str, selector: str, algorithm: str, public: bytes) -> str:
    value = f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode('ascii')}"
    # RFC 1035 §3.3.14: a TXT string holds at most 255 octets; a 2048-bit key is longer,
    # so it is published as several strings, which receivers join (RFC 6376 §3.6.2.2).
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def public_record(key_dir: str, domain: str, selector: str) -> str:
    """The TXT record of an existing key (``popgate dns records``)."""
    with open(key_path(key_dir, domain, selector), "rb") as f:
        data = f.read()
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data, password=None)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return txt_record(domain, selector, "rsa", public)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data))
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return txt_record(domain, selector, "ed25519", public)


def find_key(key_dir: str, domain: str, selector: str = "") -> tuple[str, bytes] | None:
    """(selector, key file bytes) for ``domain``: the configured selector's key, or the
    newest one when ``selector`` is ""; None when the domain has no key."""
    if selector:
        candidates = [selector]
    else:
        prefix, suffix = f"{domain}.", ".key"
        try:
            names = os.listdir(key_dir)
        except FileNotFoundError:
            return None
        candidates = sorted((n[len(prefix):-len(suffix)] for n in names
                             if n.startswith(prefix) and n.endswith(suffix)
                             and _SELECTOR.match(n[len(prefix):-len(suffix)])), reverse=True)
    for name in candidates:
        try:
            with open(key_path(key_dir, domain, name), "rb") as f:
                return name, f.read()
        except FileNotFoundError:
            continue
    return None


def _header_names(head: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\n")
            if line and not line[:1].isspace() and b":" in line]


def _from_domain(head: bytes) -> str | None:
    unfolded = re.sub(rb"\n[ \t]+", b" ", head)
    for line in unfolded.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"from":
            _, address = email.utils.parseaddr(value.decode("utf-8", "replace"))
            domain = address.rpartition("@")[2].lower().rstrip(".")
            return domain if _DOMAIN.match(domain) else None
    return None


def prepare(data: bytes, trace_octets: int, *, message_id: str, hostname: str, now: float,
            key_dir: str | None, selector: str = "", warn=lambda text: None) -> bytes:
    """``data`` (``trace_octets`` of our trace headers, then the content) with the
    hygiene headers and, when a key is found, a DKIM signature (module docstring).

    A message dkimpy cannot sign (malformed header lines) or an unreadable key leaves
    the message unsigned, with ``warn(text)``: refusing it would only make the client
    retry the same bytes."""
    trace, content = data[:trace_octets], data[trace_octets:]
    head = header_section(content)
    present = set(_header_names(head))
    added = b""
    if b"message-id" not in present:
        unique = f"{message_id}.{secrets.token_hex(4)}@{hostname}"
        added += f"Message-ID: <{unique}>\n".encode("ascii")
    if b"date" not in present:
        added += f"Date: {email.utils.formatdate(now, localtime=True)}\n".encode("ascii")
    message = trace + added + content
    present |= {b"message-id", b"date"}
    domain = _from_domain(head)
    found = find_key(key_dir, domain, selector) if key_dir and domain else None
    if found is None:
        return message
    name, key = found
    algorithm = b"rsa-sha256" if key.startswith(b"-----BEGIN") else b"ed25519-sha256"
    signed = [b"from", b"from"] + [h for h in SIGNED_HEADERS if h in present]
    try:
        signature = dkim.sign(message.replace(b"\n", b"\r\n"), name.encode("ascii"),
                              domain.encode("ascii"), key,
                              canonicalize=(b"relaxed", b"relaxed"),
                              signature_algorithm=algorithm, include_headers=signed)
    except (dkim.DKIMException, ValueError) as e:  # binascii.Error: a bad ed25519 key
        warn(f"{message_id}: not DKIM-signed ({domain}, selector {name}): {e}")
        return message
    return signature.replace(b"\r\n", b"\n") + message
