"""The main process's side of :mod:`popgate.workers`: start, watch, relay, stop.

Reactor thread only.  Bounds: one pipe per worker for its log lines, read as it comes
(:mod:`popgate.workers.logpipe`); a worker blocks on a full pipe rather than lose a line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from popgate.config import Config, WebConfig, dump
from popgate.workers.logpipe import LinePublisher
from popgate.workers.sockets import accept_one_at_a_time

log = Logger()

SHARED_LABELS = ("SMTP", "SMTPS", "LMTP")
FIRST_FD = 3  # the worker's inherited listening sockets start here
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
QUICK_FAILURE = 10.0  # a worker that ends sooner after its start failed to start
KILL_AFTER = 5.0  # seconds past the drain timeout before a stopping worker is killed


def shared_listeners(listeners) -> list:
    """The listener services whose sockets the workers accept on too (the configuration
    allows only plain sockets there: see ``config.SHAREABLE_ENDPOINTS``)."""
    return [listener for listener in listeners
            if listener.label in SHARED_LABELS and listener.port is not None]


def worker_arguments(number: int, parent: int, sockets: dict) -> list[str]:
    """``python -m popgate.workers`` and the sockets it gets (``sockets``: the worker's
    descriptor number -> the listener whose socket it is)."""
    args = [sys.executable, "-m", "popgate.workers", "--number", str(number),
            "--parent", str(parent)]
    for fd, listener in sockets.items():
        args += ["--socket", f"{fd}:{listener.label}:{listener.description}"]
    return args


def worker_environment() -> dict[str, str]:
    """This process's environment, without systemd's socket-passing variables (a worker
    gets its sockets as ``--socket`` descriptors, not from systemd)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}


def worker_configuration(config: Config) -> str:
    """The TOML a worker reads on its standard input: the effective configuration, less
    what a worker never uses and should not hold (the dashboard's token)."""
    return dump(dataclasses.replace(config, web=WebConfig()))


class WorkerPool(Service):
    """Runs ``config.server.workers - 1`` worker processes beside this one."""

    def __init__(self, reactor, config: Config, listeners):
        self._reactor = reactor
        self._config = config
        self._listeners = listeners
        self._workers: dict[int, WorkerProtocol] = {}
        self._restarts: dict[int, object] = {}  # number -> the pending callLater
        self._delays: dict[int, float] = {}
        self._stopping = False

    def startService(self) -> None:
        # After the listeners' privilegedStartService: their sockets are bound, and
        # twistd has dropped its privileges, which the workers inherit.
        super().startService()
        self._stopping = False
        self._shared = shared_listeners(self._listeners)
        for listener in self._shared:
            accept_one_at_a_time(listener.port)
        for number in range(1, self._config.server.workers):
            self._start(number)

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        worker = WorkerProtocol(self, number)
        sockets = dict(enumerate(self._shared, FIRST_FD))
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: 2}
        child_fds.update((fd, listener.port.fileno()) for fd, listener in sockets.items())
        args = worker_arguments(number, os.getpid(), sockets)
        try:
            self._reactor.spawnProcess(worker, sys.executable, args, env=worker_environment(),
                                       childFDs=child_fds)
        except OSError as e:  # e.g. no process or descriptor left: try again later
            log.error("cannot start popgate worker {number}: {error}; trying again in "
                      "{delay:g} s", number=number, error=e, delay=MAX_RESTART_DELAY)
            self._restarts[number] = self._reactor.callLater(MAX_RESTART_DELAY, self._start,
                                                             number)
            return
        worker.started_at = self._reactor.seconds()
        worker.transport.write(worker_configuration(self._config).encode("utf-8"))
        worker.transport.closeStdin()
        self._workers[number] = worker
        log.info("popgate worker {number} started (pid {pid})", number=number,
                 pid=worker.transport.pid)

    def ended(self, worker: WorkerProtocol, reason) -> None:
        """A worker's process ended: start another unless the server is stopping."""
        if self._workers.get(worker.number) is worker:
            del self._workers[worker.number]
        if self._stopping:
            return
        quick = self._reactor.seconds() - worker.started_at < QUICK_FAILURE
        previous = self._delays.get(worker.number, RESTART_DELAY / 2)
        delay = min(previous * 2, MAX_RESTART_DELAY) if quick else RESTART_DELAY
        self._delays[worker.number] = delay
        log.warn("popgate worker {number} ended ({how}); another starts in {delay:g} s",
                 number=worker.number, how=describe_end(reason.value), delay=delay)
        self._restarts[worker.number] = self._reactor.callLater(delay, self._start,
                                                                worker.number)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the users file and the certificate too."""
        self._signal_all("HUP")

    def stopService(self):
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        ended = [worker.ended for worker in self._workers.values()]
        self._signal_all("TERM")
        if not ended:
            return None
        kill = self._reactor.callLater(self._config.server.drain_timeout + KILL_AFTER,
                                       self._signal_all, "KILL")
        done = defer.DeferredList(ended)
        done.addBoth(lambda _: kill.cancel() if kill.active() else None)
        return done

    def _signal_all(self, name: str) -> None:
        for worker in list(self._workers.values()):
            with contextlib.suppress(error.ProcessExitedAlready):
                worker.transport.signalProcess(name)


class WorkerProtocol(protocol.ProcessProtocol):
    """One worker: publishes its log lines here, tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, number: int):
        self._pool = pool
        self.number = number
        self.started_at = 0.0
        self.ended: defer.Deferred = defer.Deferred()
        self._lines = LinePublisher(number)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._lines.feed(data)

    def processEnded(self, reason) -> None:
        self._pool.ended(self, reason)
        self.ended.callback(None)


def describe_end(ended) -> str:
    """``signal 9`` or ``exit status 1``, from a ProcessDone or ProcessTerminated."""
    if getattr(ended, "signal", None):
        return f"signal {ended.signal}"
    return f"exit status {getattr(ended, 'exitCode', None)}"
