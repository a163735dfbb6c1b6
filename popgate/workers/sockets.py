"""Listening sockets shared by the main process and its workers (:mod:`popgate.workers`).

The main process binds each socket; every process accepts on it.  Two things Twisted does
by default are wrong for a shared socket, and are changed here:

- a port accepts up to 100 connections per wake-up, so the first process awake took all
  of a client's simultaneous connections: shared ports accept one per wake-up;
- a UNIX port sets its file's mode when it starts listening, and shuts the socket down
  and removes its file when it stops: a worker's copy must do none of these (the main
  process owns the socket and the file).

Reactor thread only.
"""

from __future__ import annotations

import os
import socket
import stat

from twisted.application.service import Service
from twisted.internet import tcp, unix


def accept_one_at_a_time(port) -> None:
    """Make a shared listening port accept one connection per wake-up.

    Every process waiting on a shared socket is woken for each new connection.  With
    Twisted's batch of up to 100, one process delivered all 2,000 messages of a client's
    eight simultaneous connections (measured); one accept per wake-up lets the others
    take the next ones, and a busy process, slower back to its poll, takes fewer.
    """
    read = port.doRead

    def doRead():
        port.numberAccepts = 1  # Twisted grows it again after every full batch
        return read()

    port.doRead = doRead


class SharedUNIXPort(unix.Port):
    """A worker's copy of the main process's UNIX listening socket: when it stops it
    neither shuts the socket down (which would stop every process accepting on it:
    Twisted's TCP port skips that for an adopted socket, its UNIX port does not) nor
    removes the socket file (the main process does)."""

    _shouldShutdown = False

    def connectionLost(self, reason):
        if self.lockFile is not None:
            self.lockFile.unlock()
        tcp.Port.connectionLost(self, reason)


def adopt(reactor, fd: int, factory):
    """Listen on an inherited listening socket ``fd`` (a copy is made; ``fd`` stays open)."""
    with socket.socket(fileno=os.dup(fd)) as probe:
        probe.setblocking(False)  # adopting requires it (the main process's is already)
        family, name = probe.family, probe.getsockname()
    if family != socket.AF_UNIX:
        port = reactor.adoptStreamPort(fd, family, factory)
    else:
        port = SharedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
        if name and not name.startswith("\0"):  # a file, not the abstract namespace
            # startListening sets the file's mode: keep the one the main process gave it.
            port.mode = stat.S_IMODE(os.stat(name).st_mode)
        port.startListening()
    accept_one_at_a_time(port)
    return port


class AdoptedListener(Service):
    """Accept on a listening socket inherited from the main process (a worker's
    ``ListenerService``); stop accepting on stop.  The socket stays open in the main
    process and its other workers."""

    def __init__(self, reactor, fd: int, factory, label: str):
        self._reactor = reactor
        self.fd = fd
        self.factory = factory
        self.label = label
        self.port = None

    def startService(self) -> None:
        super().startService()
        try:
            self.port = adopt(self._reactor, self.fd, self.factory)
        finally:
            os.close(self.fd)  # the port has its own copy

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
