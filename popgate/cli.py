"""The ``popgate`` admin command: first run, users, configuration, certificates.

    popgate init [--user NAME] [--hostname H] [--owner USER] [--systemd DIR] ...
    popgate [--config FILE] [--data-dir DIR] user add NAME [--scheme S] [--password-stdin]
    popgate user del NAME | user passwd NAME [--password-stdin] | user list
    popgate config check [--server-user USER] | config example
    popgate tls selfsigned --hostname NAME [--san NAME]... [--cert FILE] [--key FILE]
    popgate queue list | queue flush | queue remove ID

The queue commands work on ``<data_dir>/queue/`` while the server runs: ``flush`` leaves
a flag file that the server's queue runner takes within its scan interval (10 s) and
then tries every message at once; ``remove`` deletes a message's files under the queue
lock (no bounce is sent).

It edits the same passwd-file the server reads (the server sees changes without a
restart), keeping its owner, group and mode.  Errors are one line on stderr and exit
status 1 (2 for usage errors); ``popgate -h`` and ``popgate COMMAND -h`` show every
option with its default.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import time

from popgate import __version__, firstrun, preflight
from popgate import config as configuration
from popgate.addresses import AddressError, normalise_user
from popgate.auth.users import (
    DEFAULT_SCHEME,
    SCHEMES,
    UserDB,
    UserError,
    UserFile,
    hash_password,
    split_scheme,
)
from popgate.relay.queue import Queue
from popgate.smtp.delivery import describe_postmaster


class AdminError(Exception):
    """A failure to report as one line."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (AdminError, configuration.ConfigError, UserError, AddressError) as e:
        print(f"popgate: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only or unreadable file: one line
        where = f": {e.filename}" if e.filename else ""
        print(f"popgate: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except EOFError:  # Ctrl-D at a prompt
        print("popgate: no answer (end of input); nothing changed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" unless the help already says it; flags default to off."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.default is False:
            return text + " (default: off)"
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML configuration file (default: none, built-in defaults; "
                             "for init: the file to write, default ./popgate.toml)")
    common.add_argument("--data-dir", "-d", default=argparse.SUPPRESS, metavar="DIR",
                        help="data directory: mail, users file, queue (default: the "
                             f"configuration's, else {configuration.DEFAULT_DATA_DIR})")
    sub = {"parents": [common], "formatter_class": _HelpFormatter}

    parser = argparse.ArgumentParser(prog="popgate", description="popgate administration",
                                     **sub)
    parser.add_argument("--version", action="version", version=f"popgate {__version__}")
    groups = parser.add_subparsers(title="commands")

    init = groups.add_parser("init", help="first run: configuration, data directory, "
                             "self-signed certificate and first user", **sub)
    init.add_argument("--user", metavar="NAME", help="the first user, local@domain, who also "
                      "receives postmaster@ mail (default: asked on a terminal)")
    init.add_argument("--hostname", default=socket.gethostname(),
                      help="the server's name, in greetings and the certificate; best the "
                           "name the MX record points to")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="another name or address for the certificate, repeatable "
                           "(default: none; localhost and 127.0.0.1 are always in)")
    init.add_argument("--owner", metavar="USER",
                      help="the user the server runs as, given the data directory "
                           "(default: you; popgate with --systemd)")
    init.add_argument("--systemd", metavar="DIR",
                      help="also write the systemd units, with this installation's paths, "
                           "to DIR (e.g. /etc/systemd/system), and listen on their sockets "
                           "(default: no units)")
    _password_options(init)
    init.set_defaults(run=_init)

    user = groups.add_parser("user", help="manage users", **sub).add_subparsers(
        title="user commands")
    add = user.add_parser("add", help="add a user", **sub)
    add.add_argument("name", help="local@domain")
    _password_options(add)
    add.set_defaults(run=_user_add)
    delete = user.add_parser("del", help="delete a user (mail is kept)", **sub)
    delete.add_argument("name", help="local@domain")
    delete.set_defaults(run=_user_del)
    passwd = user.add_parser("passwd", help="change a user's password", **sub)
    passwd.add_argument("name", help="local@domain")
    _password_options(passwd)
    passwd.set_defaults(run=_user_passwd)
    listing = user.add_parser("list", help="list users and their password schemes", **sub)
    listing.set_defaults(run=_user_list)

    conf = groups.add_parser("config", help="configuration", **sub).add_subparsers(
        title="config commands")
    check = conf.add_parser("check", help="validate and print the effective configuration, "
                            "who gets postmaster@, and problems start-up would not catch",
                            **sub)
    check.add_argument("--server-user", metavar="USER",
                       help="the user popgate runs as, for file permissions (default: the "
                            "owner of the data directory, else you)")
    check.set_defaults(run=_config_check)
    example = conf.add_parser("example", help="print the sample configuration: every key, "
                              "commented, with its default", **sub)
    example.set_defaults(run=_config_example)

    queue = groups.add_parser("queue", help="the outbound queue", **sub).add_subparsers(
        title="queue commands")
    queue_list = queue.add_parser("list", help="list queued messages: id, age, sender, "
                                  "recipients, attempts, last error", **sub)
    queue_list.set_defaults(run=_queue_list)
    flush = queue.add_parser("flush", help="retry every message now (within 10 s)", **sub)
    flush.set_defaults(run=_queue_flush)
    remove = queue.add_parser("remove", help="remove a message (no bounce is sent)", **sub)
    remove.add_argument("id", help="the message's queue id, as queue list shows it")
    remove.set_defaults(run=_queue_remove)

    dkim = groups.add_parser("dkim", help="DKIM signing keys", **sub).add_subparsers(
        title="dkim commands")
    keygen = dkim.add_parser("keygen", help="write a signing key for a domain and print "
                             "the DNS TXT record to publish", **sub)
    keygen.add_argument("--domain", required=True, help="the From domain it signs (required)")
    keygen.add_argument("--selector", default="", help="default: [dkim] selector, else "
                        "sYYYYMM (this month)")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa: rsa-sha256, 2048 bits; ed25519: ed25519-sha256 (RFC 8463)")
    keygen.set_defaults(run=_dkim_keygen)

    dns = groups.add_parser("dns", help="DNS records to publish", **sub).add_subparsers(
        title="dns commands")
    records = dns.add_parser("records", help="print the MX, A, PTR, SPF, DKIM and DMARC "
                             "records for the mail domains, and dig commands to check them",
                             **sub)
    records.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                         help="a mail domain, repeatable (default: server.domains and the "
                              "domains that have a DKIM key)")
    records.add_argument("--ip", default="", metavar="ADDRESS",
                         help="this server's public address (default: a placeholder)")
    records.set_defaults(run=_dns_records)

    tls = groups.add_parser("tls", help="certificates", **sub).add_subparsers(
        title="tls commands")
    selfsigned = tls.add_parser("selfsigned", help="write a self-signed certificate "
                                "(for the host name, localhost and 127.0.0.1)", **sub)
    selfsigned.add_argument("--hostname", required=True, help="the server's name (required)")
    selfsigned.add_argument("--san", action="append", default=[], metavar="NAME",
                            help="another name or address, repeatable (default: none)")
    selfsigned.add_argument("--cert", default="popgate-cert.pem", help="certificate file")
    selfsigned.add_argument("--key", default="popgate-key.pem", help="private key file")
    selfsigned.add_argument("--days", type=int, default=365, help="validity in days")
    selfsigned.add_argument("--force", action="store_true", help="replace existing files")
    selfsigned.set_defaults(run=_tls_selfsigned)
    return parser


def _password_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                        help="password hash scheme")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input instead of asking "
                             "on the terminal")


def _load(args) -> configuration.Config:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["server.data_dir"] = args.data_dir
    return configuration.load(getattr(args, "config", None), overrides)


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        raise AdminError("no terminal to ask for the password on; "
                           "give it on standard input with --password-stdin")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise AdminError("passwords do not match")
    if not password:
        raise AdminError("empty password refused")
    if args.scheme == "PLAIN":
        print("popgate: warning: {PLAIN} stores the password in clear; "
              "use it only for APOP labs", file=sys.stderr)
    return password


def _user_add(args) -> None:
    config = _load(args)
    name = normalise_user(args.name)  # before asking for a password
    if UserDB(config.users_file).get(name):
        raise UserError(f"user {name} already exists")
    password = _read_password(args)
    user = UserFile(config.users_file).add(name, hash_password(password, args.scheme))
    print(f"added {user.name}")


def _user_del(args) -> None:
    config = _load(args)
    UserFile(config.users_file).delete(args.name)
    print(f"deleted {args.name.lower()} (its Maildir is kept)")


def _user_passwd(args) -> None:
    config = _load(args)
    if not UserDB(config.users_file).get(normalise_user(args.name)):
        raise UserError(f"no such user {args.name.lower()}")
    password = _read_password(args)
    UserFile(config.users_file).set_password(args.name, hash_password(password, args.scheme))
    print(f"password changed for {args.name.lower()}")


def _user_list(args) -> None:
    config = _load(args)
    for user in UserDB(config.users_file).users():
        print(f"{user.name}\t{split_scheme(user.password)[0]}")


def _config_check(args) -> int:
    config = _load(args)
    account = _server_account(args, config)
    sys.stdout.write(configuration.dump(config))
    print(f"\n# {describe_postmaster(config, UserDB(config.users_file))}")
    print(f"# file permissions checked for user {account.name}")
    problems = preflight.config_problems(config, account)
    for problem in problems:
        print(f"popgate: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _server_account(args, config) -> preflight.Account:
    try:
        if args.server_user:
            return preflight.Account.named(args.server_user)
    except KeyError:
        raise AdminError(f"no such user {args.server_user}") from None
    if os.path.exists(config.server.data_dir):
        return preflight.Account.owner_of(config.server.data_dir)
    return preflight.Account.current()


def _config_example(args) -> None:
    sys.stdout.write(firstrun.sample_config())


def _init(args) -> None:
    config_path = os.path.abspath(getattr(args, "config", None) or "popgate.toml")
    data_dir = os.path.abspath(getattr(args, "data_dir", None)
                               or configuration.DEFAULT_DATA_DIR)
    name = args.user
    if name is None:
        if not sys.stdin.isatty():
            raise AdminError("no terminal to ask for the first user on; give --user NAME")
        name = input("First user (local@domain, also gets postmaster@ mail): ").strip()
    name = normalise_user(name)
    owner = args.owner or ("popgate" if args.systemd else None)
    if owner:
        try:
            preflight.Account.named(owner)
        except KeyError:
            raise AdminError(f"no such user {owner}; create it first: useradd --system "
                               f"--home-dir {data_dir} --shell /usr/sbin/nologin {owner}"
                               ) from None
    plan = firstrun.Plan(config_path=config_path, data_dir=data_dir, hostname=args.hostname,
                         user=name, password_hash="", owner=owner,
                         systemd_dir=args.systemd and os.path.abspath(args.systemd),
                         extra_names=tuple(args.san))
    firstrun.refuse_existing(plan)  # before asking for a password
    plan.password_hash = hash_password(_read_password(args), args.scheme)
    firstrun.initialise(plan)
    sys.stdout.write(firstrun.next_steps(plan))


def _queue(args) -> Queue:
    return Queue(_load(args).queue_dir)


def _age(seconds: float) -> str:
    minutes = int(max(seconds, 0) // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"


def _queue_list(args) -> None:
    """One tab-separated line per message: id, age, sender, recipients (with their
    state), attempts, last error."""
    now = time.time()
    envelopes = list(_queue(args).envelopes())
    print("ID\tAGE\tSENDER\tRECIPIENTS\tATTEMPTS\tLAST ERROR")
    for e in envelopes:
        recipients = ",".join(f"{r.address}({r.state})" for r in e.recipients)
        print(f"{e.id}\t{_age(now - e.created)}\t{e.sender}\t{recipients}\t{e.attempts}\t"
              f"{e.last_error or '-'}")
    print(f"{len(envelopes)} message{'' if len(envelopes) == 1 else 's'} queued",
          file=sys.stderr)


def _queue_flush(args) -> None:
    try:
        _queue(args).request_flush()
    except OSError as e:
        raise AdminError(f"cannot request a flush: {e}") from None
    print("flush requested: the server tries every queued message within 10 seconds")


def _queue_remove(args) -> None:
    if "/" in args.id or args.id.startswith("."):
        raise AdminError(f"not a queue id: {args.id}")
    try:
        removed = _queue(args).remove(args.id)
    except OSError as e:
        raise AdminError(f"cannot remove {args.id}: {e}") from None
    if not removed:
        raise AdminError(f"no queued message {args.id}")
    print(f"removed {args.id}")


def _dkim_keygen(args) -> None:
    from popgate.relay import sign

    config = _load(args)
    selector = args.selector or config.dkim.selector or sign.dated_selector(time.time())
    try:
        path, record = sign.keygen(config.dkim_key_dir, args.domain, selector, args.algorithm)
    except (ValueError, FileExistsError) as e:
        raise AdminError(str(e)) from None
    print(f"wrote {path}; publish this DNS record, then mail from {args.domain.lower()} "
          "is signed:")
    print(record)


def _dns_records(args) -> None:
    from popgate.relay import dnsrecords

    config = _load(args)
    print(dnsrecords.describe(config, args.domain, args.ip), end="")


def _tls_selfsigned(args) -> None:
    from popgate.tls import make_selfsigned, selfsigned_names

    existing = [p for p in (args.cert, args.key) if os.path.exists(p)]
    if existing and not args.force:
        raise AdminError(f"{existing[0]} exists; use --force to replace it")
    make_selfsigned(args.hostname, args.cert, args.key, days=args.days,
                    extra_names=tuple(args.san))
    names = ", ".join(selfsigned_names(args.hostname, args.san))
    print(f"wrote {args.cert} and {args.key} for {names}")


if __name__ == "__main__":
    sys.exit(main())
