"""``popgate init``: a working installation in one command, and the files it ships.

:func:`sample_config` is the commented sample shipped in the package
(``popgate/data/popgate.toml``, every key with its default); :func:`customise` sets a few
keys in it and keeps every comment.  :func:`initialise` writes, in this order: the data
directory (0700), a self-signed certificate in ``<data_dir>/tls/``, the first user, the
configuration, and with ``systemd_dir`` the unit files (``popgate/data/systemd/``) with
this installation's paths.  With ``owner`` the data directory is given to the user the
server will run as.  It replaces nothing: an existing configuration, certificate, key,
unit file or user stops it before it writes anything.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import resources

from popgate import config as configuration
from popgate.auth.users import UserDB, UserError, UserFile
from popgate.config import ConfigError
from popgate.tls import make_selfsigned, selfsigned_names

# The names the socket units give their sockets, and where the configuration takes them.
SOCKETS = {
    "smtp.listen": ("smtp",),
    "submission.listen": ("submission",),  # 587, STARTTLS (RFC 6409)
    "submission.tls_listen": ("smtps",),  # 465, implicit TLS (RFC 8314 §3.3)
    "pop3.listen": ("pop3",),
    "pop3.tls_listen": ("pop3s",),
}
# What the shipped unit files say, replaced by this installation's values.
_UNIT_TWISTD = "/opt/popgate/bin/twistd"
_UNIT_CONFIG = "/etc/popgate/popgate.toml"
_UNIT_DATA_DIR = "/var/lib/popgate"
_UNIT_USER = "popgate"


def _data(*parts: str):
    return resources.files("popgate").joinpath("data", *parts)


def sample_config() -> str:
    return _data("popgate.toml").read_text(encoding="utf-8")


def unit_files() -> dict[str, str]:
    """Shipped systemd unit files: name -> text."""
    return {entry.name: entry.read_text(encoding="utf-8")
            for entry in sorted(_data("systemd").iterdir(), key=lambda e: e.name)
            if entry.name.endswith((".service", ".socket"))}


def customise(sample: str, values: dict[str, object]) -> str:
    """Set ``values`` (``"section.key"`` -> value) in the sample, in place of its
    commented default line; every comment stays."""
    remaining = dict(values)
    section = None
    lines = []
    for line in sample.splitlines():
        if m := re.match(r"\[(\w+)\]$", line):
            section = m.group(1)
        elif (m := re.match(r"#(\w+) = ", line)) and f"{section}.{m.group(1)}" in remaining:
            value = remaining.pop(f"{section}.{m.group(1)}")
            line = f"{m.group(1)} = {configuration.toml_value(value)}"
        lines.append(line)
    if remaining:
        raise KeyError(f"not in the sample configuration: {', '.join(remaining)}")
    return "\n".join(lines) + "\n"


@dataclass
class Plan:
    """What ``popgate init`` makes; paths absolute."""

    config_path: str
    data_dir: str
    hostname: str
    user: str
    password_hash: str
    owner: str | None = None  # the account the server runs as
    systemd_dir: str | None = None
    extra_names: tuple[str, ...] = ()
    written: list[str] = field(default_factory=list)

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.data_dir, "tls")

    @property
    def certificate(self) -> str:
        return os.path.join(self.tls_dir, "cert.pem")

    @property
    def key(self) -> str:
        return os.path.join(self.tls_dir, "key.pem")


def initialise(plan: Plan) -> None:
    """Make everything in ``plan``; raises ConfigError/OSError/UserError on a problem."""
    refuse_existing(plan)
    owner = pwd.getpwnam(plan.owner) if plan.owner else None
    os.makedirs(plan.data_dir, mode=0o700, exist_ok=True)
    os.makedirs(plan.tls_dir, mode=0o700, exist_ok=True)
    make_selfsigned(plan.hostname, plan.certificate, plan.key, extra_names=plan.extra_names)
    UserFile(os.path.join(plan.data_dir, "users")).add(plan.user, plan.password_hash)
    if owner is not None:
        _give(plan.data_dir, owner)
    _write_new(plan.config_path, customise(sample_config(), _settings(plan)), 0o644)
    plan.written.append(plan.config_path)
    configuration.load(plan.config_path)  # what was written must load
    if plan.systemd_dir:
        for name, text in unit_files().items():
            path = os.path.join(plan.systemd_dir, name)
            _write_new(path, _unit_text(text, plan), 0o644)
            plan.written.append(path)


def refuse_existing(plan: Plan) -> None:
    """Raise ConfigError or UserError if ``plan`` would replace anything."""
    paths = [plan.config_path, plan.certificate, plan.key]
    if plan.systemd_dir:
        paths += [os.path.join(plan.systemd_dir, name) for name in unit_files()]
    for path in paths:
        if os.path.exists(path):
            raise ConfigError(path, "", "exists already; popgate init replaces nothing")
    users_file = os.path.join(plan.data_dir, "users")
    if UserDB(users_file).get(plan.user) is not None:
        raise UserError(f"user {plan.user} already exists in {users_file}")


def _settings(plan: Plan) -> dict[str, object]:
    settings: dict[str, object] = {
        "server.hostname": plan.hostname,
        "server.data_dir": plan.data_dir,
        "server.postmaster": plan.user,
        "tls.certificate": plan.certificate,
        "tls.key": plan.key,
    }
    if plan.systemd_dir:
        for key, names in SOCKETS.items():
            settings[key] = [f"systemd:domain=INET6:name={name}" for name in names]
    return settings


def _unit_text(text: str, plan: Plan) -> str:
    return (text.replace(_UNIT_TWISTD, twistd_path())
            .replace(_UNIT_CONFIG, plan.config_path)
            .replace(_UNIT_DATA_DIR, plan.data_dir)
            .replace(f"User={_UNIT_USER}\n", f"User={plan.owner or _UNIT_USER}\n")
            .replace(f"Group={_UNIT_USER}\n", f"Group={_group_of(plan.owner)}\n"))


def _group_of(user: str | None) -> str:
    if not user:
        return _UNIT_USER
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def twistd_path() -> str:
    """This installation's twistd: beside the running interpreter (a venv), else PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    return beside if os.path.exists(beside) else (shutil.which("twistd") or beside)


def _write_new(path: str, text: str, mode: int) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w",
              encoding="utf-8") as f:
        f.write(text)


def _give(directory: str, owner: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(directory):
        os.chown(root, owner.pw_uid, owner.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), owner.pw_uid, owner.pw_gid,
                     follow_symlinks=False)


def next_steps(plan: Plan) -> str:
    names = ", ".join(selfsigned_names(plan.hostname, plan.extra_names))
    lines = [
        f"wrote {plan.config_path}",
        f"  data directory  {plan.data_dir} (mail, users file)"
        + (f", owned by {plan.owner}" if plan.owner else ""),
        f"  certificate     {plan.certificate} (self-signed for {names})",
        f"  first user      {plan.user}, who also receives postmaster@ mail",
    ]
    lines += [f"  systemd unit    {path}" for path in plan.written[1:]]
    lines += ["", "Next steps:", f"  popgate config check --config {plan.config_path}"]
    if plan.systemd_dir:
        sockets = " ".join(f"popgate-{n}.socket" for names in SOCKETS.values() for n in names)
        lines += [
            "  systemctl daemon-reload",
            f"  systemctl enable --now {sockets} popgate.service",
        ]
    else:
        lines += [
            f"  twistd -n popgate --config {plan.config_path}    # Ctrl-C stops it",
            f"  swaks --server 127.0.0.1:2525 --to {plan.user}   # send a test message",
            f"  curl --ssl-reqd --cacert {plan.certificate} --user {plan.user} "
            "pop3://localhost:1100/1",
            "  For the office network: set [smtp] listen and [pop3] listen to ports 25 and",
            "  110/995, or use socket activation (popgate init --systemd DIR);",
        ]
    lines += ["  then a real certificate, DNS and backups: see docs/deployment.md."]
    return "\n".join(lines) + "\n"
