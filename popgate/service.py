"""makeService: the one place that wires a Config into running parts.

It builds the user database, the Maildir store, the cred portal, the connection limiters,
the TLS creator and one listener service per configured endpoint, all under one
``MultiService``.  Building opens no listening socket and starts no thread (twistd may
fork after it); the data directory is created and stale ``tmp/`` files are removed when
the service starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys
import threading
from functools import partial

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import task, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from popgate.auth.account import AccountRealm
from popgate.auth.login import Authenticator
from popgate.auth.penalty import AuthPenalty, ChecksPerAddress
from popgate.auth.users import PasswordChecker, UserDB
from popgate.config import Config, dns_server, split_hostport
from popgate.events import EventBus
from popgate.limits import ConnectionLimiter, parse_networks
from popgate.lineproto import SessionRegistry
from popgate.loglimit import LogLimiter
from popgate.observe.log import SessionLog
from popgate.pop3.realm import MaildropRealm
from popgate.pop3.server import POP3Factory
from popgate.preflight import storage_problem
from popgate.proxy import TrustedProxyFactory
from popgate.relay import client as relay_client
from popgate.relay.client import Smarthost
from popgate.relay.queue import Queue
from popgate.relay.runner import QueueRunner
from popgate.smtp.delivery import Arrival, Deliverer, Recipient, Router, describe_postmaster
from popgate.smtp.server import SMTPFactory
from popgate.smtp.submission import SendingLimit, SubmissionFactory
from popgate.store.maildir import MaildirStore
from popgate.workers.pool import WorkerPool
from popgate.workers.sockets import AdoptedListener

log = Logger()


class StartupFailed(SystemExit, Exception):
    """Stop start-up with exit status 1; making one prints its one line on stderr.

    A SystemExit, so that ``twistd -n`` ends without a traceback; an Exception too, so that
    a daemonising twistd hands it to its parent, which waits for a word from the child
    (and would wait for ever on one that died without it), prints it and exits with 1.
    """

    def __init__(self, message: str):
        super().__init__(1)
        self.message = message
        print(message, file=sys.stderr)

    def __str__(self) -> str:
        return self.message


class AuthThreadPool(Service):
    """A small thread pool for password hashing, run at a lower CPU priority.

    Argon2 is meant to be expensive; a burst of logins must queue behind each other, not
    take the CPU away from the reactor thread that serves every open session.
    """

    def __init__(self, reactor, size: int = 2):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="popgate-auth")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self):
        super().stopService()
        # ThreadPool.stop joins the threads, which first run every check still queued
        # (Twisted's thread team does not drop pending work): not on the reactor, which
        # must go on answering what a drain lets finish.  twistd waits for the Deferred.
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._pool.stop)

    def run(self, f, *args):
        return threads.deferToThreadPool(self._reactor, self._pool, _at_low_priority, f, *args)

    def queued(self) -> int:
        """Password checks waiting for a thread (the auth_queue_length metric)."""
        return self._pool.q.qsize()


def _at_low_priority(f, *args):
    # On Linux each thread has its own nice value; lowering it again is a no-op.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    return f(*args)


class ListenerService(Service):
    """Listen on one endpoint string; log where, and stop listening on stop."""

    def __init__(self, reactor, description: str, factory, label: str):
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.port = None
        self._listen_called = False
        self._starting = False  # inside endpoint.listen(): failures are reported at once
        self._failure = None

    def privilegedStartService(self) -> None:
        # Before twistd drops privileges (--uid), so that ports below 1024 work.
        super().privilegedStartService()
        self._listen_called = True
        try:
            endpoint = serverFromString(self._reactor, self.description)
        except (KeyError, IndexError) as e:
            # systemd: endpoints look their socket up here, by name or index.
            raise StartupFailed(f"popgate: {self.label} cannot listen on {self.description}: "
                                f"systemd passed no such socket ({e}); check the .socket "
                                "units") from None
        self._failure = None
        self._starting = True
        endpoint.listen(self.factory).addCallbacks(self._listening, self._cannot_listen)
        self._starting = False
        if self._failure is not None:
            # Most endpoints fail at once (address in use, permission denied): say so in
            # one line and stop start-up with a non-zero exit status, no traceback.
            reason = self._failure.getErrorMessage()
            raise StartupFailed(f"popgate: {self.label} cannot listen on {self.description}: "
                                f"{reason}")

    def startService(self) -> None:
        if not self._listen_called:
            self.privilegedStartService()  # started without twistd (tests, embedding)
        super().startService()

    def _cannot_listen(self, failure) -> None:
        if self._starting:
            self._failure = failure
            return
        log.failure("popgate {label} cannot listen on {description}", failure,
                    label=self.label, description=self.description)
        self._reactor.stop()

    def _listening(self, port) -> None:
        self.port = port
        log.info("popgate {label} listening on {description} ({address})",
                 label=self.label, description=self.description, address=port.getHost())

    def stopService(self):
        super().stopService()
        self._listen_called = False
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class ReadyService(Service):
    """Log "popgate ready" once the reactor runs (signal handlers installed)."""

    def __init__(self, reactor, message: str = "popgate ready"):
        self._reactor = reactor
        self._message = message

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(log.info, self._message)


class StartupChecks(Service):
    """Before anything else starts, as the user the server runs as: stop with one line if
    the storage is unusable (what to chown), else log who receives postmaster@."""

    def __init__(self, config: Config, users: UserDB):
        self.config = config
        self.users = users

    def startService(self) -> None:
        super().startService()
        problem = storage_problem(self.config)
        if problem:
            raise StartupFailed(f"popgate: {problem}")
        log.info("{postmaster}", postmaster=describe_postmaster(self.config, self.users))


class StorageService(Service):
    """Create the data directory (0700), mark this process's ``tmp/`` files as its own
    (:meth:`~popgate.store.maildir.MaildirStore.claim_owner`, after twistd's fork) and
    clear stale ``tmp/`` files at start; load the users file, so that a file that breaks
    later is replaced by these users, not by nothing (see UserDB)."""

    def __init__(self, config: Config, store: MaildirStore, users: UserDB, sweep: bool = True):
        self.config = config
        self.store = store
        self.users = users
        self.sweep = sweep  # False in a worker: the main process sweeps for everyone

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.config.server.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.config.mail_root, mode=0o700, exist_ok=True)
        try:
            self.store.claim_owner()
        except OSError as e:  # e.g. no inode left: start anyway, and say what it costs
            log.error("cannot mark this process's tmp/ files as its own ({error}); those "
                      "it leaves behind will be removed after 36 hours", error=e)
        if self.sweep:
            _log_swept(self.store.clean_tmp())
        self.users.users()


TMP_SWEEP_INTERVAL = 300.0  # seconds between sweeps of stale tmp/ files while running


class TmpSweepService(Service):
    """Every few minutes, remove stale ``tmp/`` files (those of popgate processes that
    died, and foreign ones after 36 hours) in a thread, so that a server that keeps
    running does not wait for its next start to clean up after another node's crash."""

    def __init__(self, clock, store: MaildirStore, run_in_thread,
                 interval: float = TMP_SWEEP_INTERVAL):
        self._store = store
        self._run_in_thread = run_in_thread
        self._loop = task.LoopingCall(self._sweep)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _sweep(self):
        # The loop waits for this Deferred: sweeps never overlap.
        d = self._run_in_thread(self._store.clean_tmp)
        return d.addCallbacks(_log_swept, _sweep_failed)


def _log_swept(removed: int) -> None:
    if removed:
        log.info("removed {n} stale tmp/ files", n=removed)


def _sweep_failed(failure) -> None:
    if failure.check(OSError):  # a disk fault: one line, the next sweep tries again
        log.error("cannot sweep stale tmp/ files: {error}", error=failure.getErrorMessage())
    else:
        log.failure("cannot sweep stale tmp/ files", failure)


class DrainService(Service):
    """On stop (SIGTERM): drain every open session within ``timeout`` seconds; twistd
    waits for the Deferred before it stops the reactor (see :mod:`popgate.lineproto`)."""

    def __init__(self, sessions: SessionRegistry, timeout: float):
        self.sessions = sessions
        self.timeout = timeout

    def stopService(self):
        super().stopService()
        if len(self.sessions):
            log.info("draining {n} session(s), at most {timeout} s", n=len(self.sessions),
                     timeout=self.timeout)
        return self.sessions.drain(self.timeout)


class DelivererService(Service):
    """Owns the process's one :class:`Deliverer`: its spare files go when the server stops."""

    def __init__(self, deliverer: Deliverer):
        self.deliverer = deliverer

    def stopService(self) -> None:
        super().stopService()
        self.deliverer.close()


class ReloadService(Service):
    """SIGHUP (``systemctl reload``) re-reads the users file and the certificate, if any.

    The handler is installed with or without TLS: SIGHUP's default action would end the
    process, and systemd does not restart a service that a signal ended cleanly.  Both
    are also re-read by themselves when their files change; SIGHUP also catches an edit
    that kept the users file's inode, size and modification time.
    """

    def __init__(self, reactor, tls, users: UserDB):
        self._reactor = reactor
        self._tls = tls
        self._users = users
        self._previous = None
        self.also: list = []  # called after each reload (the workers get SIGHUP too)

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(
            signal.SIGHUP, lambda *_: self._reactor.callFromThread(self._reload))

    def _reload(self) -> None:
        log.info("SIGHUP: {n} users read from {path}", n=self._users.reload(),
                 path=self._users.path)
        if self._tls is None:
            log.info("SIGHUP: no TLS certificate to reload")
        else:
            self._tls.reload()
        for reload in self.also:
            reload()

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)


def makeService(config: Config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    users = UserDB(config.users_file)
    store = MaildirStore(config.mail_root, config.hostname, config.pop3.listing_cache)
    run_in_thread = partial(_defer_to_reactor_pool, reactor)
    tls = _tls_creator(config, reactor)
    trusted = parse_networks(config.limits.trusted_networks)

    top = MultiService()
    StartupChecks(config, users).setServiceParent(top)
    StorageService(config, store, users).setServiceParent(top)
    TmpSweepService(reactor, store, run_in_thread).setServiceParent(top)
    auth_threads = AuthThreadPool(reactor)
    auth_threads.setServiceParent(top)
    reload = ReloadService(reactor, tls, users)
    reload.setServiceParent(top)

    listen = partial(_listen, top, reactor,
                     proxies=parse_networks(config.limits.trusted_proxies))

    events = _session_events(config, reactor)
    sessions = SessionRegistry(reactor)
    deliverer, router = _smtp_side(top, listen, config, reactor, users=users, store=store,
                                   run_in_thread=run_in_thread, tls=tls, events=events,
                                   sessions=sessions, trusted=trusted)
    if config.server.workers > 1:
        pool = WorkerPool(reactor, config, [service for service in top
                                            if isinstance(service, ListenerService)])
        pool.setServiceParent(top)
        reload.also.append(pool.reload)

    checker = PasswordChecker(users, auth_threads.run)
    portal = Portal(MaildropRealm(users, store, run_in_thread), [checker])
    limits = config.limits
    penalty = AuthPenalty(reactor, limits.auth_delay, limits.auth_delay_max,
                          limits.penalty_window)
    checks = ChecksPerAddress()
    authenticator = Authenticator(portal, penalty, checks, reactor)
    pop3 = partial(POP3Factory, config=config, authenticator=authenticator, clock=reactor,
                   limiter=_limiter(config, trusted), events=events, tls=tls,
                   sessions=sessions)
    listen("POP3", config.pop3.listen, pop3())
    listen("POP3S", config.pop3.tls_listen, _implicit(pop3, tls))

    # Submission: the same users, checker, penalties and bound per address as POP3.
    queue = runner = None
    if config.relay.enabled:
        queue = Queue(config.queue_dir, node=config.hostname)
        runner = _queue_runner(config, reactor, queue, run_in_thread, deliverer, users,
                               partial(_is_own_listener, top, config.hostname))
        runner.setServiceParent(top)
    submission = partial(
        SubmissionFactory, config=config, router=router, deliverer=deliverer, clock=reactor,
        limiter=_limiter(config, trusted), events=events, tls=tls, sessions=sessions,
        authenticator=Authenticator(Portal(AccountRealm(users), [checker]), penalty, checks,
                                    reactor),
        sending_limit=SendingLimit(reactor, config.submission.max_messages_per_hour),
        run_in_thread=run_in_thread, queue=queue,
        on_queued=runner.wake if runner is not None else lambda _: None)
    listen("SUBMISSION", config.submission.listen, submission())
    listen("SUBMISSIONS", config.submission.tls_listen, _implicit(submission, tls))

    _observe(top, config, events, store, reactor, users, auth_threads)
    # Stopped before the listeners' services (a MultiService stops its children in
    # reverse order, in one go): the drain starts as listening stops.
    DrainService(sessions, config.server.drain_timeout).setServiceParent(top)
    ReadyService(reactor).setServiceParent(top)
    return top


def makeWorkerService(config: Config, reactor, sockets: dict[tuple[str, str], int],
                      number: int) -> MultiService:
    """A worker process (:mod:`popgate.workers`): SMTP and LMTP on the listening sockets
    its main process passed it (``(label, endpoint description) -> file descriptor``),
    with its own store owner, spare files, event bus and session log."""
    users = UserDB(config.users_file)
    store = MaildirStore(config.mail_root, config.hostname, config.pop3.listing_cache)
    tls = _tls_creator(config, reactor)

    top = MultiService()
    StorageService(config, store, users, sweep=False).setServiceParent(top)
    ReloadService(reactor, tls, users).setServiceParent(top)
    sessions = SessionRegistry(reactor)
    _smtp_side(top, partial(_adopt, top, reactor, sockets), config, reactor, users=users,
               store=store, run_in_thread=partial(_defer_to_reactor_pool, reactor), tls=tls,
               events=_session_events(config, reactor), sessions=sessions,
               trusted=parse_networks(config.limits.trusted_networks))
    DrainService(sessions, config.server.drain_timeout).setServiceParent(top)
    ReadyService(reactor, f"popgate worker {number} ready").setServiceParent(top)
    return top


def _session_events(config: Config, reactor) -> EventBus:
    """The process's event bus, with the session log and (``[log] trace``) the trace."""
    events = EventBus()
    SessionLog(reactor).subscribe(events)
    if config.log.trace:
        from popgate.observe.trace import ProtocolTrace

        ProtocolTrace().subscribe(events)
    return events


def _smtp_side(top: MultiService, listen, config: Config, reactor, *, users: UserDB,
               store: MaildirStore, run_in_thread, tls, events: EventBus,
               sessions: SessionRegistry, trusted) -> tuple[Deliverer, Router]:
    """The process's one Deliverer, its Router, and the SMTP, SMTPS and LMTP listeners:
    what the main process and every worker build alike (``listen`` binds or adopts).

    With several workers each process counts only its own sessions, so each gets its
    share of the connection caps, rounded up: together they admit at most the
    configured numbers plus ``workers - 1``, whichever process takes a connection.
    """
    deliverer = Deliverer(store, run_in_thread, hostname=config.hostname, now=reactor.seconds)
    DelivererService(deliverer).setServiceParent(top)
    router = Router(config, users)
    share = config.server.workers
    smtp = partial(SMTPFactory, config=config, router=router,
                   deliverer=deliverer, clock=reactor,
                   limiter=_limiter(config, trusted, share), events=events, tls=tls,
                   sessions=sessions)
    listen("SMTP", config.smtp.listen, smtp())
    listen("SMTPS", config.smtp.tls_listen, _implicit(smtp, tls))
    listen("LMTP", config.smtp.lmtp_listen,
           smtp(lmtp=True, limiter=_limiter(config, trusted, share)))
    return deliverer, router


def _observe(top: MultiService, config: Config, events: EventBus, store: MaildirStore,
             reactor, users: UserDB, auth_threads: AuthThreadPool) -> None:
    """The metrics and dashboard observers of the session events, and their listeners
    (the session log and the trace are :func:`_session_events`')."""
    if not (config.metrics.listen or config.web.listen):
        return
    from twisted.web.resource import Resource

    from popgate.observe.metrics import Metrics, MetricsPage
    from popgate.web.board import LabBoard
    from popgate.web.mailboxes import MailboxWatch
    from popgate.web.site import QuietSite, build_site

    watch = MailboxWatch(reactor, partial(_defer_to_reactor_pool, reactor), store.root,
                         lambda: [user.name for user in users.users()])
    watch.setServiceParent(top)
    metrics_page = None
    if config.metrics.listen:
        metrics = Metrics(auth_queue=auth_threads.queued, mailboxes=lambda: watch.latest)
        metrics.subscribe(events)
        metrics_page = MetricsPage(metrics)
        root = Resource()
        root.putChild(b"metrics", metrics_page)
        site = QuietSite(root)
        for description in config.metrics.listen:
            ListenerService(reactor, description, site, "metrics").setServiceParent(top)
    if config.web.listen:
        board = LabBoard(reactor, watch)
        board.subscribe(events)
        site = build_site(board, reactor, config.web.token, metrics_page)
        for description in config.web.listen:
            ListenerService(reactor, description, site, "web").setServiceParent(top)


def _queue_runner(config: Config, reactor, queue: Queue, run_in_thread, deliverer: Deliverer,
                  users: UserDB, is_own) -> QueueRunner:
    relay = config.relay

    def deliver_bounce(name: str, report: bytes):
        user = users.get(name)
        if user is None:
            raise LookupError(f"user {name} no longer exists")
        arrival = Arrival(sender="", recipients=(Recipient(name, (user,)),),
                          helo=config.hostname, client_ip=None, protocol="ESMTP")
        return deliverer.deliver(arrival, report)

    if relay.mode == "mx":
        send = _mx_sender(config, reactor, is_own)
    else:
        send = partial(relay_client.deliver, reactor, _smarthost(config))
    return QueueRunner(queue, send, reactor, run_in_thread, deliver_bounce,
                       hostname=config.hostname, smarthost=relay.smarthost,
                       max_queue_time=relay.max_queue_time)


def _mx_sender(config: Config, reactor, is_own):
    from twisted.names import client as names

    from popgate.relay.mx import MXSender

    relay = config.relay
    servers = [dns_server(text) for text in relay.dns_servers]
    # Without configured servers, resolv.conf's (re-read when it changes); no hosts file:
    # MX routing is the DNS's business.
    resolver = names.Resolver(resolv=None if servers else "/etc/resolv.conf",
                              servers=servers or None, reactor=reactor)
    return MXSender(reactor, resolver, relay_client.deliver, port=relay.mx_port,
                    tls="required" if relay.mx_tls == "required" else "opportunistic",
                    helo=config.hostname, is_own=is_own,
                    max_connections=relay.max_connections,
                    max_connections_per_domain=relay.max_connections_per_domain)


def _is_own_listener(top: MultiService, hostname: str, host: str, ip: str, port: int) -> bool:
    """Whether an MX (its name, an address, the MX port) is this server's own SMTP
    listener: a wildcard listener is reached through every loopback address."""
    if host.rstrip(".").lower() == hostname.lower():
        return True
    for service in top:
        if not (isinstance(service, ListenerService) and service.label == "SMTP"
                and service.port is not None):
            continue
        bound = service.port.getHost()
        if getattr(bound, "port", None) != port:
            continue
        if bound.host == ip or (bound.host in ("0.0.0.0", "::")
                                and ipaddress.ip_address(ip).is_loopback):
            return True
    return False


def _smarthost(config: Config) -> Smarthost:
    relay = config.relay
    host, port = split_hostport(relay.smarthost)
    password = b""
    if relay.smarthost_password_file:
        with open(relay.smarthost_password_file, "rb") as f:
            password = f.readline().rstrip(b"\r\n")
    trust_root = None
    if relay.smarthost_ca:
        with open(relay.smarthost_ca, "rb") as f:
            trust_root = f.read()
    return Smarthost(host, port, relay.smarthost_tls, trust_root, relay.smarthost_user,
                     password, helo=config.hostname)


def _defer_to_reactor_pool(reactor, f, *args, **kwargs):
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


def _limiter(config: Config, trusted, share: int = 1) -> ConnectionLimiter:
    """The connection caps, or one process's ``1/share`` of them (rounded up)."""
    limits = config.limits
    return ConnectionLimiter(-(-limits.max_sessions // share),
                             -(-limits.max_sessions_per_ip // share), trusted)


def _tls_creator(config: Config, reactor):
    if not config.tls.enabled:
        return None
    from popgate.tls import ReloadingServerTLS

    return ReloadingServerTLS(config.tls.certificate, config.tls.key, clock=reactor)


def _implicit(make_factory, tls):
    """A factory for an implicit-TLS listener (RFC 8314): TLS from the first byte."""
    if tls is None:
        return None
    from popgate.tls import wrap_implicit_tls

    return wrap_implicit_tls(make_factory(implicit_tls=True), tls)


def _listen(parent: MultiService, reactor, label: str, descriptions, factory, *,
            proxies) -> None:
    for description in descriptions:
        if description.startswith("haproxy:"):
            listener_factory = TrustedProxyFactory(factory, proxies, LogLimiter(reactor))
        else:
            listener_factory = factory
        ListenerService(reactor, description, listener_factory, label).setServiceParent(parent)


def _adopt(parent: MultiService, reactor, sockets: dict[tuple[str, str], int], label: str,
           descriptions, factory) -> None:
    """A worker's ``listen``: serve the sockets its main process passed for ``label``."""
    for description in descriptions:
        fd = sockets.get((label, description))
        if fd is not None:
            AdoptedListener(reactor, fd, factory, label).setServiceParent(parent)
