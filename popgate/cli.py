"""The ``popgate`` admin command: users, configuration check, lab certificates.

    popgate [--config FILE] [--data-dir DIR] user add NAME [--scheme S] [--password-stdin]
    popgate user del NAME | user passwd NAME [--password-stdin] | user list
    popgate config check
    popgate tls selfsigned --hostname NAME [--cert FILE] [--key FILE]
    popgate queue list | queue flush | queue remove ID

The queue commands work on ``<data_dir>/queue/`` while the server runs: ``flush`` leaves
a flag file that the server's queue runner takes within its scan interval (10 s) and
then tries every message at once; ``remove`` deletes a message's files under the queue
lock (no bounce is sent).

It edits the same passwd-file the server reads (the server sees changes without a
restart).  Errors are one line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time

from popgate import __version__
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


class CommandError(Exception):
    """A failure to report as one line."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except (CommandError, configuration.ConfigError, UserError, AddressError) as e:
        print(f"popgate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="TOML configuration file")
    common.add_argument("--data-dir", "-d", default=argparse.SUPPRESS,
                        help="data directory (default ./popgate-data)")

    parser = argparse.ArgumentParser(prog="popgate", parents=[common],
                                     description="popgate administration")
    parser.add_argument("--version", action="version", version=f"popgate {__version__}")
    groups = parser.add_subparsers(title="commands")

    user = groups.add_parser("user", help="manage users").add_subparsers(title="user commands")
    add = user.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name", help="local@domain")
    add.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME)
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input")
    add.set_defaults(run=_user_add)
    delete = user.add_parser("del", parents=[common], help="delete a user (mail is kept)")
    delete.add_argument("name")
    delete.set_defaults(run=_user_del)
    passwd = user.add_parser("passwd", parents=[common], help="change a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME)
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(run=_user_passwd)
    listing = user.add_parser("list", parents=[common], help="list users")
    listing.set_defaults(run=_user_list)

    conf = groups.add_parser("config", help="configuration").add_subparsers(title="config")
    check = conf.add_parser("check", parents=[common],
                            help="validate and print the effective configuration")
    check.set_defaults(run=_config_check)

    queue = groups.add_parser("queue", help="the outbound queue").add_subparsers(
        title="queue commands")
    queue_list = queue.add_parser("list", parents=[common], help="list queued messages")
    queue_list.set_defaults(run=_queue_list)
    flush = queue.add_parser("flush", parents=[common], help="retry every message now")
    flush.set_defaults(run=_queue_flush)
    remove = queue.add_parser("remove", parents=[common], help="remove a message (no bounce)")
    remove.add_argument("id")
    remove.set_defaults(run=_queue_remove)

    tls = groups.add_parser("tls", help="certificates").add_subparsers(title="tls commands")
    selfsigned = tls.add_parser("selfsigned", parents=[common],
                                help="write a self-signed certificate for a lab")
    selfsigned.add_argument("--hostname", required=True)
    selfsigned.add_argument("--cert", default="popgate-cert.pem")
    selfsigned.add_argument("--key", default="popgate-key.pem")
    selfsigned.add_argument("--days", type=int, default=365)
    selfsigned.add_argument("--force", action="store_true", help="replace existing files")
    selfsigned.set_defaults(run=_tls_selfsigned)
    return parser


def _load(args) -> configuration.Config:
    overrides = {}
    if getattr(args, "data_dir", None):
        overrides["server.data_dir"] = args.data_dir
    return configuration.load(getattr(args, "config", None), overrides)


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password refused")
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


def _config_check(args) -> None:
    config = _load(args)
    sys.stdout.write(configuration.dump(config))
    if not config.server.postmaster:
        print("# note: server.postmaster is unset: postmaster@<domain> is delivered only "
              "where a user postmaster@<domain> exists", file=sys.stderr)


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
        raise CommandError(f"cannot request a flush: {e}") from None
    print("flush requested: the server tries every queued message within 10 seconds")


def _queue_remove(args) -> None:
    if "/" in args.id or args.id.startswith("."):
        raise CommandError(f"not a queue id: {args.id}")
    try:
        removed = _queue(args).remove(args.id)
    except OSError as e:
        raise CommandError(f"cannot remove {args.id}: {e}") from None
    if not removed:
        raise CommandError(f"no queued message {args.id}")
    print(f"removed {args.id}")


def _tls_selfsigned(args) -> None:
    from popgate.tls import make_selfsigned

    existing = [p for p in (args.cert, args.key) if os.path.exists(p)]
    if existing and not args.force:
        raise CommandError(f"{existing[0]} exists; use --force to replace it")
    make_selfsigned(args.hostname, args.cert, args.key, days=args.days)
    print(f"wrote {args.cert} and {args.key} for {args.hostname}")


if __name__ == "__main__":
    sys.exit(main())
