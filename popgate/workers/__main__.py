"""``python -m popgate.workers``: one worker process (started by its main process only).

Reads the configuration (TOML) from standard input to its end, logs twisted.logger JSON
events on standard output, serves the listening sockets named by ``--socket
FD:LABEL:DESCRIPTION`` until SIGTERM (then drains like the main process) or until the
main process dies (then at once).  See :mod:`popgate.workers`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Get SIGKILL when the parent dies (Linux); False where that cannot be arranged."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the prctl
                os._exit(1)
            return True
    return False


def parse_socket(text: str) -> tuple[tuple[str, str], int]:
    fd, label, description = text.split(":", 2)
    return (label, description), int(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m popgate.workers")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--socket", action="append", type=parse_socket, default=[])
    args = parser.parse_args(argv)
    watched = not die_with_parent(args.parent)
    text = sys.stdin.buffer.read().decode("utf-8")

    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from popgate.config import loads
    from popgate.service import makeWorkerService

    out = open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out, recordSeparator="")],
                                     redirectStandardIO=False)
    config = loads(text, f"worker {args.number}")
    service = makeWorkerService(config, reactor, dict(args.socket), args.number)
    if watched:  # no PR_SET_PDEATHSIG here: look for the parent every second
        task.LoopingCall(_exit_if_orphaned, args.parent).start(1.0)
    failed = []
    reactor.callWhenRunning(_start, reactor, service, failed)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    sys.exit(1 if failed else 0)


def _start(reactor, service, failed: list) -> None:
    try:
        service.startService()
    except SystemExit:  # StartupFailed: its line is on stderr already
        failed.append(True)
        reactor.stop()


def _exit_if_orphaned(parent: int) -> None:
    if os.getppid() != parent:
        os._exit(1)


if __name__ == "__main__":
    main()
