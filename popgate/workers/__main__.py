"""``python -m popgate.workers``: one worker process (started by its main process only).

Reads the configuration (TOML) from standard input to its end, logs twisted.logger JSON
events on standard output (a pipe to the main process; anything else printed goes to
standard error), serves the listening sockets named by ``--socket FD:LABEL:DESCRIPTION``
until SIGTERM (then drains like the main process) or until the main process dies (then
at once).  Exit status 1 if it cannot start.  See :mod:`popgate.workers`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def exit_if_orphaned(parent: int) -> None:
    if os.getppid() != parent:
        os._exit(1)


def die_with_parent(parent: int) -> bool:
    """Get SIGKILL when the parent dies (Linux); False where that cannot be arranged."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            exit_if_orphaned(parent)  # it may have died before the prctl
            return True
    return False


def parse_socket(text: str) -> tuple[tuple[str, str], int]:
    fd, label, description = text.split(":", 2)
    return (label, description), int(fd)


def main(argv: list[str] | None = None) -> None:
    # Until the reload handler is installed, SIGHUP's default action would end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m popgate.workers")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--socket", action="append", type=parse_socket, default=[])
    args = parser.parse_args(argv)
    watched = not die_with_parent(args.parent)
    log_pipe = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # a stray print must not land in the log pipe

    from twisted.internet import reactor, task
    from twisted.logger import Logger, globalLogBeginner

    from popgate.workers.logpipe import json_lines_observer

    globalLogBeginner.beginLoggingTo([json_lines_observer(log_pipe)],
                                     redirectStandardIO=False)
    log = Logger(namespace="popgate.workers")
    sockets = dict(args.socket)
    service = None
    try:
        service = _build(sys.stdin.buffer.read().decode("utf-8"), args.number, sockets)
    except Exception:
        log.failure("popgate worker {number} cannot start", number=args.number)
        sys.exit(1)
    finally:
        _close_unused(sockets, service)
    if watched:  # no PR_SET_PDEATHSIG here: look for the parent every second
        task.LoopingCall(exit_if_orphaned, args.parent).start(1.0)
    failed: list[bool] = []
    stop = _stopper(reactor)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: reactor.callFromThread(stop))
    reactor.callWhenRunning(_start, reactor, service, failed, log, args.number)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run(installSignalHandlers=False)
    sys.exit(1 if failed else 0)


def _build(text: str, number: int, sockets: dict[tuple[str, str], int]):
    from twisted.internet import reactor

    from popgate.config import loads
    from popgate.service import makeWorkerService

    return makeWorkerService(loads(text, f"worker {number}"), reactor, sockets, number)


def _close_unused(sockets: dict[tuple[str, str], int], service) -> None:
    """Close the inherited sockets no listener took (each listener closes its own)."""
    from popgate.workers.sockets import AdoptedListener

    taken = {child.fd for child in service or () if isinstance(child, AdoptedListener)}
    for fd in set(sockets.values()) - taken:
        os.close(fd)


def _stopper(reactor):
    """``reactor.stop`` once: systemd and the main process may both send SIGTERM."""
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if reactor.running and not stopping:
            stopping = True
            reactor.stop()

    return stop


def _start(reactor, service, failed: list, log, number: int) -> None:
    try:
        service.startService()
    except BaseException:  # noqa: BLE001 - whatever it is, this worker cannot serve
        log.failure("popgate worker {number} cannot start", number=number)
        failed.append(True)
        reactor.stop()


if __name__ == "__main__":
    main()
