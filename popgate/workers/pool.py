"""The main process's side of :mod:`popgate.workers`: start, watch, relay, stop.

Reactor thread only.  Bounds: one pipe per worker for its log lines, read as it comes
(a line longer than 1 MiB is cut: a worker's log lines are short).
"""

from __future__ import annotations

import contextlib
import os
import sys

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher

from popgate.config import Config, dump

log = Logger()

SHARED_LABELS = ("SMTP", "SMTPS", "LMTP")
MAX_LINE = 1 << 20
FIRST_FD = 3  # the worker's inherited listening sockets start here
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
QUICK_FAILURE = 10.0  # a worker that ends sooner after its start failed to start
KILL_AFTER = 5.0  # seconds past the drain timeout before a stopping worker is killed


def shared_listeners(listeners) -> list:
    """The listener services whose sockets the workers accept on too."""
    return [listener for listener in listeners
            if listener.label in SHARED_LABELS and listener.port is not None
            and not listener.description.startswith("haproxy:")]


def accept_one_at_a_time(port) -> None:
    """Make a shared listening port accept one connection per wake-up.

    Every process waiting on a shared socket is woken for each new connection; Twisted's
    port accepts up to 100 at once, so the first process awake took all eight of a
    client's simultaneous connections (measured: one process delivered all 2,000
    messages).  One accept per wake-up lets the other processes take the next ones, and
    a busy process, slower back to its poll, takes fewer.
    """
    read = port.doRead

    def doRead():
        port.numberAccepts = 1  # Twisted grows it after every full batch
        return read()

    port.doRead = doRead


def worker_arguments(number: int, parent: int, shared: list) -> list[str]:
    """``python -m popgate.workers`` and the sockets it gets (fd, label, description)."""
    args = [sys.executable, "-m", "popgate.workers", "--number", str(number),
            "--parent", str(parent)]
    for fd, listener in enumerate(shared, FIRST_FD):
        args += ["--socket", f"{fd}:{listener.label}:{listener.description}"]
    return args


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
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: 2}
        for fd, listener in enumerate(self._shared, FIRST_FD):
            child_fds[fd] = listener.port.fileno()
        args = worker_arguments(number, os.getpid(), self._shared)
        try:
            self._reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(),
                                       childFDs=child_fds)
        except OSError as e:  # e.g. no process or descriptor left: try again later
            log.error("cannot start popgate worker {number}: {error}; trying again in "
                      "{delay:g} s", number=number, error=e, delay=MAX_RESTART_DELAY)
            self._restarts[number] = self._reactor.callLater(MAX_RESTART_DELAY, self._start,
                                                             number)
            return
        worker.started_at = self._reactor.seconds()
        worker.transport.write(dump(self._config).encode("utf-8"))
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
        self._buffer = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
        for line in lines:
            publish_line(line, self.number)

    def processEnded(self, reason) -> None:
        self._pool.ended(self, reason)
        self.ended.callback(None)


def describe_end(ended) -> str:
    """``signal 9`` or ``exit status 1``, from a ProcessDone or ProcessTerminated."""
    if getattr(ended, "signal", None):
        return f"signal {ended.signal}"
    return f"exit status {getattr(ended, 'exitCode', None)}"


def publish_line(line: bytes, number: int) -> None:
    """Publish one of a worker's JSON log events in this process's log."""
    if not line.strip():
        return
    try:
        event = eventFromJSON(line.decode("utf-8"))
    except ValueError:  # not JSON (a stray print): keep it, as text
        log.info("worker {number}: {text}", number=number,
                 text=line.decode("utf-8", "replace"))
        return
    globalLogPublisher(event)
