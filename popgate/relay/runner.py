"""The queue runner: relays queued messages, retries, bounces.

Where a message goes is the injected ``send(sender, recipients, message)``: one session
with the smarthost (:func:`popgate.relay.client.deliver`), or, with ``relay.mode =
"mx"``, :class:`popgate.relay.mx.MXSender`, one session per recipient domain with its MX
hosts (a domain that fails answers ``4xx``/``5xx`` for its own recipients, so what
follows holds per recipient either way).

A message is *attempted* when it is queued (:meth:`QueueRunner.wake`), and then whenever
a scan of the queue (every :data:`SCAN_INTERVAL` seconds, or at once after ``popgate
queue flush`` left its flag file) finds it due.  One attempt is one smarthost session for
the recipients still ``queued``; at most ``concurrency`` attempts run at once, the others
wait their turn in memory.  After an attempt each recipient is

* ``sent`` on a 2xx: recorded in the envelope at once, so it is never sent again, even
  after a crash or ``kill -9`` (a crash *before* that record means the recipient gets the
  message again: at least once, never zero times);
* ``failed`` on a 5xx, or when ``max_queue_time`` has run out (status 4.4.7);
* still ``queued`` on a 4xx or when the session failed (no connection, TLS, timeout):
  tried again after :data:`BACKOFF` (1, 5, 15 minutes, then hourly).

When no recipient is left queued, a delivery status notification for the failed ones
(:mod:`popgate.relay.dsn`) goes to the submitting user's Maildir through the injected
``deliver_bounce(user, message) -> Deferred``, and the message's files are removed.

Concurrency: reactor thread; queue files are read and written through ``run_in_thread``.
Several nodes may share the queue directory: an attempt holds the message's ``flock``
(:meth:`~popgate.relay.queue.Queue.try_lock`), and a message another runner holds is
skipped until its next scan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from popgate.relay import dsn
from popgate.relay.client import SmarthostError
from popgate.relay.queue import FAILED, SENT, Envelope, Queue

BACKOFF = (60.0, 300.0, 900.0, 3600.0)  # after the 1st, 2nd, 3rd, later attempts
SCAN_INTERVAL = 10.0
STOP_GRACE = 10.0  # seconds a stopping server waits for the smarthost sessions under way

log = Logger()


def retry_delay(attempts: int) -> float:
    return BACKOFF[min(attempts, len(BACKOFF)) - 1]


class QueueRunner(Service):
    """See the module docstring.  ``send(sender, recipients, message)`` is one smarthost
    session (:func:`popgate.relay.client.deliver` with its settings bound)."""

    def __init__(self, queue: Queue, send: Callable[..., defer.Deferred], clock,
                 run_in_thread: Callable[..., defer.Deferred],
                 deliver_bounce: Callable[[str, bytes], defer.Deferred], *, hostname: str,
                 smarthost: str, max_queue_time: float, concurrency: int = 4,
                 scan_interval: float = SCAN_INTERVAL):
        self.queue = queue
        self.send = send
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.deliver_bounce = deliver_bounce
        self.hostname = hostname
        self.smarthost = smarthost
        self.max_queue_time = max_queue_time
        self.concurrency = concurrency
        self.scan_interval = scan_interval
        self._busy: set[str] = set()  # ids being attempted
        self._waiting: deque[str] = deque()  # ids due, waiting for a free slot
        self._scanning = False
        self._loop: task.LoopingCall | None = None
        self.idle: defer.Deferred | None = None  # for tests: fires when nothing is busy
        self._drains: list[defer.Deferred] = []  # stopService waiting for _busy to empty

    def startService(self) -> None:
        super().startService()
        removed = self.queue.clean_tmp()  # blocking, once, at start (like StorageService)
        if removed:
            log.info("removed {n} unfinished queue files", n=removed)
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self.clock
        self._loop.start(self.scan_interval, now=True).addErrback(
            lambda f: log.failure("queue runner stopped", f))

    def stopService(self) -> defer.Deferred | None:
        """Start nothing new; give the sessions under way up to :data:`STOP_GRACE`
        seconds to end, so that what the smarthost accepted is recorded (a session cut
        short only means the message is sent again after the restart)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self._busy:
            return None
        drained: defer.Deferred = defer.Deferred()
        self._drains.append(drained)
        return drained.addTimeout(STOP_GRACE, self.clock, onTimeoutCancel=lambda *_: None)

    # -- finding work ----------------------------------------------------------------------

    def wake(self, message_id: str) -> None:
        """A message was just queued: attempt it now (or as soon as a slot is free)."""
        self._enqueue(message_id)

    def scan(self) -> defer.Deferred | None:
        """Look for due messages (all of them after ``popgate queue flush``)."""
        if self._scanning or not self.running:
            return None
        self._scanning = True
        d = self.run_in_thread(_due, self.queue, self.clock.seconds())
        d.addCallback(lambda ids: [self._enqueue(i) for i in ids])
        d.addErrback(lambda f: log.failure("cannot scan the queue", f))
        d.addBoth(self._scanned)
        return d

    def _scanned(self, _) -> None:
        self._scanning = False

    def _enqueue(self, message_id: str) -> None:
        if message_id in self._busy or message_id in self._waiting:
            return
        self._waiting.append(message_id)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._busy) < self.concurrency and self.running:
            message_id = self._waiting.popleft()
            self._busy.add(message_id)
            d = defer.ensureDeferred(self._attempt(message_id))
            d.addErrback(lambda f, i=message_id: log.failure("{id}: relay failed", f, id=i))
            d.addBoth(self._attempted, message_id)

    def _attempted(self, _, message_id: str) -> None:
        self._busy.discard(message_id)
        if not self._busy:
            drains, self._drains = self._drains, []
            for drained in drains:
                if not drained.called:
                    drained.callback(None)
        self._start_waiting()
        if not self._busy and not self._waiting and self.idle is not None:
            idle, self.idle = self.idle, None
            idle.callback(None)

    # -- one attempt -------------------------------------------------------------------

    async def _attempt(self, message_id: str) -> None:
        lock = await self.run_in_thread(self.queue.try_lock, message_id)
        if lock is None:
            return  # another node's runner is relaying it
        try:
            await self._attempt_locked(message_id)
        finally:
            self.queue.unlock(lock)

    async def _attempt_locked(self, message_id: str) -> None:
        loaded = await self.run_in_thread(_load, self.queue, message_id)
        if loaded is None:
            return  # sent meanwhile, or removed by the operator
        envelope, message = loaded
        pending = [r.address for r in envelope.pending()]
        if pending:
            try:
                results = await self.send(envelope.sender, pending, message)
            except SmarthostError as e:
                envelope.last_error = str(e)
            except Exception as e:  # noqa: BLE001 - a bug: logged, and retried like the rest
                log.failure("{id}: relay attempt failed", Failure(), id=envelope.id)
                envelope.last_error = f"internal error: {e!r}"
            else:
                self._record(envelope, results)
        now = self.clock.seconds()
        envelope.attempts += 1
        if envelope.pending() and now - envelope.created >= self.max_queue_time:
            self._expire(envelope)
        if envelope.pending():
            envelope.next_try = now + retry_delay(envelope.attempts)
            log.info("{id}: deferred ({pending} recipients), next try in {delay:.0f}s: "
                     "{error}", id=envelope.id, pending=len(envelope.pending()),
                     delay=envelope.next_try - now, error=envelope.last_error)
            await self.run_in_thread(self.queue.save, envelope)
            return
        # Record who got it before anything else: a crash from here on resends nothing.
        if not await self.run_in_thread(self.queue.save, envelope):
            return  # removed by the operator meanwhile
        if envelope.failed():
            await self._bounce(envelope, message)
        await self.run_in_thread(self.queue.remove, envelope.id)
        log.info("{id}: done: {sent} sent, {failed} failed", id=envelope.id,
                 sent=sum(r.state == SENT for r in envelope.recipients),
                 failed=len(envelope.failed()))

    def _record(self, envelope: Envelope, results: dict[str, tuple[int, str]]) -> None:
        errors = []
        for recipient in envelope.pending():
            code, reply = results.get(recipient.address, (451, "451 4.4.0 no answer"))
            recipient.reply = reply
            if code // 100 == 2:
                recipient.state = SENT
            elif code // 100 == 5:
                recipient.state = FAILED
            else:
                errors.append(reply)
        envelope.last_error = errors[0] if errors else ""

    def _expire(self, envelope: Envelope) -> None:
        for recipient in envelope.pending():
            recipient.state = FAILED
            last = recipient.reply or envelope.last_error or "no answer"
            recipient.reply = (f"{dsn.EXPIRED} delivery time expired after "
                               f"{envelope.attempts} attempts; last error: {last}")

    async def _bounce(self, envelope: Envelope, message: bytes) -> None:
        if not envelope.sender:
            return  # a bounce never bounces
        report = dsn.bounce(envelope, message, hostname=self.hostname,
                            smarthost=self.smarthost, now=self.clock.seconds())
        try:
            await self.deliver_bounce(envelope.user, report)
        except (LookupError, OSError) as e:  # the user is gone, their Maildir unwritable
            log.error("{id}: bounce to {user} dropped: {error}", id=envelope.id,
                      user=envelope.user, error=e)
        except Exception:  # noqa: BLE001 - the bounce is dropped, never queued
            log.failure("{id}: cannot deliver the bounce to {user}", Failure(),
                        id=envelope.id, user=envelope.user)


def _due(queue: Queue, now: float) -> list[str]:
    """In a thread: ids of the messages due now (every one after a flush request)."""
    queue.remove_orphans(now)
    flush = queue.take_flush_request()
    return [e.id for e in queue.envelopes() if flush or e.next_try <= now]


def _load(queue: Queue, message_id: str) -> tuple[Envelope, bytes] | None:
    envelope = queue.load(message_id)
    if envelope is None:
        return None
    try:
        return envelope, queue.read_message(message_id)
    except FileNotFoundError:
        return None
