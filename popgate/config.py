"""popgate's configuration: built-in defaults, then a TOML file, then command-line overrides.

:func:`load` reads the file (if any), merges the overrides, validates every key once and
returns a frozen :class:`Config`.  Any problem raises :class:`ConfigError`, whose message
is one line naming the file, the key and the reason, e.g.::

    /etc/popgate/popgate.toml: smtp.max_message_size: expected an integer, got 'big'

Relative paths are resolved against the current directory at load time, so that a later
``chdir`` (twistd daemon mode) does not change their meaning.  Loading reads the file and
checks that named certificate files are usable; it opens nothing else and starts nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from popgate.addresses import AddressError, normalise_domain, normalise_user

DEFAULT_SMTP = "tcp:2525:interface=127.0.0.1"
DEFAULT_POP3 = "tcp:1100:interface=127.0.0.1"
DEFAULT_SUBMISSION = "tcp:5870:interface=127.0.0.1"  # quick start; 587 in production
RELAY_MODES = ("none", "smarthost", "mx")
MX_TLS = ("opportunistic", "required")
SMARTHOST_TLS = ("required", "opportunistic", "none")
DEFAULT_DATA_DIR = "./popgate-data"


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line to show the operator."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = ""  # "" = this machine's host name
    data_dir: str = DEFAULT_DATA_DIR
    users_file: str = ""  # "" = <data_dir>/users
    domains: tuple[str, ...] = ()  # extra local domains; every user's domain is local anyway
    postmaster: str = ""  # the user who receives postmaster@<every local domain>
    drain_timeout: float = 5.0  # on SIGTERM: seconds for commits and UPDATEs in flight
    workers: int = 1  # processes accepting SMTP/LMTP (popgate.workers); 1 = this one only


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[str, ...] = (DEFAULT_SMTP,)
    tls_listen: tuple[str, ...] = ()  # implicit TLS ("submissions"/SMTPS, RFC 8314)
    lmtp_listen: tuple[str, ...] = ()  # LMTP (RFC 2033), e.g. "unix:/run/popgate/lmtp"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 10
    bare_newline: str = "normalize"  # or "reject"
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7
    data_timeout: float = 180.0  # RFC 5321 §4.5.3.2.5, per data block
    max_session_time: float = 3600.0


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[str, ...] = (DEFAULT_POP3,)
    tls_listen: tuple[str, ...] = ()  # implicit TLS (POP3S, RFC 8314)
    apop: bool = False
    auth_timeout: float = 60.0
    idle_timeout: float = 600.0  # RFC 1939 §3: at least 10 minutes
    max_session_time: float = 7200.0
    listing_cache: int = 50_000  # messages, all mailboxes (popgate.store.maildir.ListingBudget)


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""  # PEM full chain, leaf first
    key: str = ""  # PEM private key
    allow_plaintext_auth: bool = False  # off-loopback, without TLS

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = 1000
    max_sessions_per_ip: int = 20
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Peers allowed to send a PROXY protocol header on haproxy: listeners (see popgate/proxy.py).
    trusted_proxies: tuple[str, ...] = ()
    auth_delay: float = 2.0
    auth_delay_max: float = 15.0
    auth_max_failures: int = 3
    penalty_window: float = 300.0


@dataclass(frozen=True)
class LogConfig:
    trace: bool = False  # every command and reply as C:/S: lines (secrets masked)
    format: str = "text"  # or "json": one twisted.logger JSON object per line


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, ...] = ()  # Prometheus text at /metrics, e.g. "tcp:9187:interface=::1"


@dataclass(frozen=True)
class WebConfig:
    listen: tuple[str, ...] = ()  # the lab dashboard, e.g. "tcp:8025:interface=127.0.0.1"
    token: str = ""  # required unless every listener is loopback; then every request needs it


@dataclass(frozen=True)
class SubmissionConfig:
    """Authenticated submission (RFC 6409): STARTTLS listeners and implicit-TLS ones."""

    listen: tuple[str, ...] = (DEFAULT_SUBMISSION,)
    tls_listen: tuple[str, ...] = ()  # implicit TLS ("submissions", RFC 8314), usually 465
    max_messages_per_hour: int = 200  # per user, recipients counted
    show_auth_user: bool = False  # name the authenticated user in Received:


@dataclass(frozen=True)
class RelayConfig:
    """Outbound mail: the queue and the smarthost it is relayed through."""

    mode: str = "none"  # "none": no relay at all; "smarthost"; "mx" (direct delivery)
    smarthost: str = ""  # "host:port"
    smarthost_tls: str = "required"  # "required" | "opportunistic" | "none" (loopback only)
    smarthost_ca: str = ""  # PEM CA file for a private CA; "" = the system's trust store
    smarthost_user: str = ""
    smarthost_password_file: str = ""  # first line is the password
    max_queue_time: float = 5 * 24 * 3600.0  # seconds before a message bounces
    # mode = "mx": DNS servers ("host" or "host:port"; () = the system resolver), the
    # port MX hosts listen on, the bounds on connections, and TLS to MX hosts.
    dns_servers: tuple[str, ...] = ()
    mx_port: int = 25
    max_connections_per_domain: int = 2
    max_connections: int = 20
    mx_tls: str = "opportunistic"  # "opportunistic" | "required"

    @property
    def enabled(self) -> bool:
        return self.mode in ("smarthost", "mx")


@dataclass(frozen=True)
class DKIMConfig:
    """DKIM signing of submitted mail (RFC 6376): keys ``<key_dir>/<domain>.<selector>.key``."""

    key_dir: str = ""  # "" = <data_dir>/dkim
    selector: str = ""  # "" = the newest key of each domain (keygen names it sYYYYMM)


def split_hostport(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:25"``) -> ``("host", port)``; the config checked the form."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def dns_server(text: str) -> tuple[str, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::53"``, ``"[::1]:5353"`` ->
    ``(address, port)``; port 53 by default."""
    if text.startswith("[") or text.count(":") == 1:
        host, _, port = text.rpartition(":")
        if host and port.isdigit() and not host.endswith(":"):
            return host.strip("[]"), int(port)
    return text.strip("[]"), 53


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    # "alias@domain" or "@domain" (catch-all) -> local users
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = "<defaults>"
    # The name this server gives itself (greetings, Received:, Maildir file names):
    # server.hostname, or the machine's host name looked up once, when the Config is made.
    hostname: str = ""

    def __post_init__(self) -> None:
        if not self.hostname:
            object.__setattr__(self, "hostname", self.server.hostname or socket.gethostname())

    @property
    def mail_root(self) -> str:
        return os.path.join(self.server.data_dir, "mail")

    @property
    def users_file(self) -> str:
        return self.server.users_file or os.path.join(self.server.data_dir, "users")

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.server.data_dir, "queue")

    @property
    def dkim_key_dir(self) -> str:
        return self.dkim.key_dir or os.path.join(self.server.data_dir, "dkim")


_SECTIONS = {
    "server": ServerConfig,
    "smtp": SMTPConfig,
    "pop3": POP3Config,
    "tls": TLSConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "web": WebConfig,
    "submission": SubmissionConfig,
    "relay": RelayConfig,
    "dkim": DKIMConfig,
}


def load(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the effective Config: defaults < file at ``path`` < ``overrides``.

    ``overrides`` maps dotted keys (``"smtp.listen"``) to values, as the command line gives.
    """
    return _from_raw(_read_toml(path) if path else {}, path or "<defaults>", overrides)


def loads(text: str, source: str) -> Config:
    """Build a Config from TOML text, e.g. :func:`dump`'s (how a worker gets its parent's)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"TOML syntax error: {e}") from None
    return _from_raw(raw, source)


def _from_raw(raw: dict[str, Any], source: str,
              overrides: Mapping[str, Any] | None = None) -> Config:
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    sections = {}
    for name, table in raw.items():
        if name == "aliases":
            continue
        if name not in _SECTIONS:
            raise ConfigError(source, name, "unknown section")
        if not isinstance(table, dict):
            raise ConfigError(source, name, "must be a table")
        sections[name] = _build_section(source, name, _SECTIONS[name], table)
    aliases = _build_aliases(source, raw.get("aliases", {}))
    config = Config(**sections, aliases=aliases, source=source)
    return _resolve_paths(_validate(config))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "", e.strerror or str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start})") from None


def _build_section(source: str, name: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(source, f"{name}.{key}", "unknown key")
        values[key] = _coerce(source, f"{name}.{key}", hints[key], value)
    return cls(**values)


def _coerce(source: str, key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the annotation; ints are accepted where floats are."""
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, f"expected a list of strings, got {value!r}")
        return tuple(value)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(source, key, f"expected {expected[hint]}, got {value!r}")
    return float(value) if hint is float else value


def _build_aliases(source: str, table: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise ConfigError(source, "aliases", "must be a table")
    aliases = {}
    for alias, targets in table.items():
        key = f"aliases.{alias!r}"
        try:
            if alias.startswith("@"):
                name = "@" + normalise_domain(alias[1:])
            else:
                name = normalise_user(alias)
        except AddressError as e:
            raise ConfigError(source, key, f"invalid alias: {e}") from None
        targets = _coerce(source, key, tuple[str, ...], targets)
        if not targets:
            raise ConfigError(source, key, "an alias needs at least one user")
        aliases[name] = tuple(_user(source, key, t) for t in targets)
    return aliases


def _user(source: str, key: str, name: str) -> str:
    try:
        return normalise_user(name)
    except AddressError as e:
        raise ConfigError(source, key, f"invalid user {name!r}: {e}") from None


def _validate(config: Config) -> Config:
    src = config.source
    s, smtp, pop3, tls, limits = (
        config.server, config.smtp, config.pop3, config.tls, config.limits)
    for d in s.domains:
        try:
            normalise_domain(d)
        except AddressError as e:
            raise ConfigError(src, "server.domains", str(e)) from None
    if s.postmaster:
        _user(src, "server.postmaster", s.postmaster)
    for key, endpoints in [("smtp.listen", smtp.listen), ("smtp.tls_listen", smtp.tls_listen),
                           ("smtp.lmtp_listen", smtp.lmtp_listen), ("pop3.listen", pop3.listen),
                           ("pop3.tls_listen", pop3.tls_listen),
                           ("metrics.listen", config.metrics.listen),
                           ("web.listen", config.web.listen),
                           ("submission.listen", config.submission.listen),
                           ("submission.tls_listen", config.submission.tls_listen)]:
        for description in endpoints:
            _check_endpoint(src, key, description)
    if smtp.bare_newline not in ("normalize", "reject"):
        raise ConfigError(src, "smtp.bare_newline", "must be \"normalize\" or \"reject\"")
    for key, value in _positive_numbers(config):
        if value <= 0:
            raise ConfigError(src, key, f"must be greater than zero, got {value}")
    if pop3.listing_cache < 0:
        raise ConfigError(src, "pop3.listing_cache",
                          f"must be zero (no cache) or more, got {pop3.listing_cache}")
    if pop3.idle_timeout < 600:
        raise ConfigError(src, "pop3.idle_timeout",
                          "RFC 1939 §3 requires at least 600 seconds")
    if limits.auth_delay_max < limits.auth_delay:
        raise ConfigError(src, "limits.auth_delay_max", "must not be less than limits.auth_delay")
    for key in ("trusted_networks", "trusted_proxies"):
        for net in getattr(limits, key):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ConfigError(src, f"limits.{key}", str(e)) from None
    all_endpoints = (*smtp.listen, *smtp.tls_listen, *smtp.lmtp_listen, *pop3.listen,
                     *pop3.tls_listen, *config.submission.listen, *config.submission.tls_listen)
    if any(e.startswith("haproxy:") for e in all_endpoints) and not limits.trusted_proxies:
        raise ConfigError(src, "limits.trusted_proxies", "haproxy: endpoints need the "
                          "addresses of the proxies allowed to send PROXY headers")
    _check_tls(src, tls, smtp.tls_listen or pop3.tls_listen or config.submission.tls_listen)
    _check_submission_and_relay(src, config.submission, config.relay)
    _check_workers(src, config)
    if config.log.format not in ("text", "json"):
        raise ConfigError(src, "log.format", 'must be "text" or "json"')
    if config.web.listen and not config.web.token and not all(
            is_loopback_endpoint(e) for e in config.web.listen):
        raise ConfigError(src, "web.token", "required: a web.listen endpoint is not "
                          "loopback-only (the dashboard shows users and their mail)")
    return config


# Twisted endpoint syntax escapes the colons of an IPv6 address: interface=\:\:1
_INTERFACE = re.compile(r"(?<!\\):interface=((?:\\:|[^:])+)")


def is_loopback_endpoint(description: str) -> bool:
    """True for a TCP endpoint bound to a loopback address, or a UNIX socket (reachable
    only from this machine, like loopback).  A TCP endpoint without ``interface=``
    listens on every address, so it is not."""
    kind = description.split(":", 1)[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    found = _INTERFACE.search(description)
    if found is None:
        return False
    try:
        return ipaddress.ip_address(found.group(1).replace("\\:", ":")).is_loopback
    except ValueError:
        return False


def _check_submission_and_relay(src: str, submission: SubmissionConfig,
                                relay: RelayConfig) -> None:
    if submission.max_messages_per_hour <= 0:
        raise ConfigError(src, "submission.max_messages_per_hour",
                          f"must be greater than zero, got {submission.max_messages_per_hour}")
    if relay.mode not in RELAY_MODES:
        raise ConfigError(src, "relay.mode", 'must be "none", "smarthost" or "mx"')
    if relay.mx_tls not in MX_TLS:
        raise ConfigError(src, "relay.mx_tls", 'must be "opportunistic" or "required"')
    if not 0 < relay.mx_port < 65536:
        raise ConfigError(src, "relay.mx_port", f"must be a port number, got {relay.mx_port}")
    for key in ("max_connections_per_domain", "max_connections"):
        if getattr(relay, key) < 1:
            raise ConfigError(src, f"relay.{key}", f"must be at least 1, got "
                                                   f"{getattr(relay, key)}")
    if relay.smarthost_tls not in SMARTHOST_TLS:
        raise ConfigError(src, "relay.smarthost_tls",
                          'must be "required", "opportunistic" or "none"')
    if relay.max_queue_time <= 0:
        raise ConfigError(src, "relay.max_queue_time",
                          f"must be greater than zero, got {relay.max_queue_time}")
    if bool(relay.smarthost_user) != bool(relay.smarthost_password_file):
        raise ConfigError(src, "relay.smarthost_password_file",
                          "relay.smarthost_user and relay.smarthost_password_file go together")
    for server in relay.dns_servers:
        host, port = dns_server(server)
        if not host or not 0 < port < 65536:
            raise ConfigError(src, "relay.dns_servers", f"bad DNS server {server!r}")
    if relay.mode != "smarthost":
        return
    host, colon, port = relay.smarthost.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(src, "relay.smarthost", f'expected "host:port", got {relay.smarthost!r}')
    if relay.smarthost_tls == "none" and not _is_loopback_name(split_hostport(relay.smarthost)[0]):
        raise ConfigError(src, "relay.smarthost_tls",
                          '"none" is only allowed for a loopback smarthost')
    for key in ("smarthost_ca", "smarthost_password_file"):
        path = getattr(relay, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(src, f"relay.{key}", f"cannot read {path}")


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_WORKERS = 64
SHAREABLE_ENDPOINTS = ("tcp", "tcp6", "unix", "systemd")


def _check_workers(source: str, config: Config) -> None:
    workers = config.server.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(source, "server.workers", f"must be 1 to {MAX_WORKERS}, got {workers}")
    if workers == 1:
        return
    if config.metrics.listen or config.web.listen:
        # The workers' sessions would be missing from both: say so rather than show less.
        raise ConfigError(source, "server.workers", "the dashboard and the metrics see "
                          "only the main process: use workers = 1 with [web] or [metrics]")
    smtp = config.smtp
    shared = (*smtp.listen, *smtp.tls_listen, *smtp.lmtp_listen)
    if not shared:
        raise ConfigError(source, "server.workers", "no SMTP, SMTPS or LMTP listener for "
                          "the workers to share")
    for description in shared:
        # Wrapping endpoints (haproxy:, ssl:) would reach a worker as a bare socket.
        if description.split(":", 1)[0] not in SHAREABLE_ENDPOINTS:
            raise ConfigError(source, "server.workers", f"workers share only "
                              f"{', '.join(SHAREABLE_ENDPOINTS)} listeners, not "
                              f"{description!r}")


def _positive_numbers(config: Config):
    for section in ("smtp", "pop3", "limits"):
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "listing_cache":
                continue  # 0 is allowed: no cache
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield f"{section}.{f.name}", value


def _check_endpoint(source: str, key: str, description: str) -> None:
    """Parse an endpoint string the way twistd will, without listening."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if description.startswith("systemd:"):
        # Only resolvable under systemd (LISTEN_FDS); check the form, not the inheritance.
        if "index=" not in description and "name=" not in description:
            raise ConfigError(source, key, f"{description!r}: systemd endpoints need "
                                           "index= or name=")
        return
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        raise ConfigError(source, key, f"bad endpoint {description!r}: {e}") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ConfigError(source, key, f"bad endpoint {description!r}: port out of range")


def _check_tls(source: str, tls: TLSConfig, needs_certificate: bool) -> None:
    if bool(tls.certificate) != bool(tls.key):
        missing = "tls.key" if tls.certificate else "tls.certificate"
        raise ConfigError(source, missing, "tls.certificate and tls.key go together")
    if needs_certificate and not tls.certificate:
        raise ConfigError(source, "tls.certificate", "required by the tls_listen endpoints")
    if tls.certificate:
        from popgate.tls import TLSConfigError, check_certificate_files

        try:
            check_certificate_files(tls.certificate, tls.key)
        except TLSConfigError as e:
            raise ConfigError(source, "tls.certificate", str(e)) from None


def _resolve_paths(config: Config) -> Config:
    server = dataclasses.replace(
        config.server,
        data_dir=os.path.abspath(config.server.data_dir),
        users_file=os.path.abspath(config.server.users_file) if config.server.users_file else "",
    )
    tls = config.tls
    if tls.certificate:
        tls = dataclasses.replace(tls, certificate=os.path.abspath(tls.certificate),
                                  key=os.path.abspath(tls.key))
    relay = config.relay
    for key in ("smarthost_ca", "smarthost_password_file"):
        if getattr(relay, key):
            relay = dataclasses.replace(relay, **{key: os.path.abspath(getattr(relay, key))})
    dkim = config.dkim
    if dkim.key_dir:
        dkim = dataclasses.replace(dkim, key_dir=os.path.abspath(dkim.key_dir))
    return dataclasses.replace(config, server=server, tls=tls, relay=relay, dkim=dkim)


def dump(config: Config) -> str:
    """Render the effective configuration as TOML (for ``popgate config check``)."""
    lines = [f"# effective configuration from {config.source}"]
    for name in _SECTIONS:
        section = getattr(config, name)
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {toml_value(getattr(section, f.name))}")
    lines.append("\n[aliases]")
    for alias, targets in config.aliases.items():
        lines.append(f"{toml_value(alias)} = {toml_value(targets)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + "".join(_toml_char(c) for c in str(value)) + '"'


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters
    escaped (TOML allows none of them bare), so that :func:`loads` reads back the value."""
    if c in '"\\':
        return "\\" + c
    if c < " " or c == "\x7f":
        return f"\\u{ord(c):04x}"
    return c

