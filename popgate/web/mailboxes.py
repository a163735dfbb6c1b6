"""MailboxWatch: the latest survey of every Maildir, refreshed in a thread.

A survey (:func:`popgate.store.survey.survey`) runs every ``interval`` seconds, and
soon (``settle`` seconds, so that a burst of events costs one survey) after
:meth:`MailboxWatch.refresh_soon`, which the dashboard calls when an event says a
Maildir changed.  At most one survey runs at a time; a request that arrives meanwhile
starts one more when it ends.  Listeners hear of a survey only when it differs from the
previous one.  The user names come from the user database, read on the reactor thread
(where every RCPT TO reads it too); the directories are read in the thread.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from popgate.store.survey import MaildirSurvey, survey

log = Logger()


class MailboxWatch(Service):
    def __init__(self, clock, run_in_thread, root: str, user_names: Callable[[], list[str]],
                 interval: float = 2.0, settle: float = 0.05):
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._root = root
        self._user_names = user_names
        self._interval = interval
        self._settle = settle
        self.latest: list[MaildirSurvey] = []
        self._listeners: list[Callable[[list[MaildirSurvey]], None]] = []
        self._timer = None
        self._running = False
        self._again = False
        self._failed_once = False
        self._waiting: list[defer.Deferred] = []  # for a survey that has not begun yet

    def listen(self, listener: Callable[[list[MaildirSurvey]], None]) -> None:
        self._listeners.append(listener)

    def startService(self) -> None:
        super().startService()
        self.refresh_soon(0)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def fresh(self) -> defer.Deferred:
        """Fires with a survey begun after this call (for a JSON request: what is on
        disk now, not up to ``interval`` seconds ago)."""
        if not self.running:
            return defer.succeed(self.latest)
        d = defer.Deferred()
        self._waiting.append(d)
        if self._running:
            self._again = True
        else:
            self.refresh_soon(0)
        return d

    def refresh_soon(self, delay: float | None = None) -> None:
        if not self.running:
            return
        delay = self._settle if delay is None else delay
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self._clock.seconds() <= delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._refresh)

    def _refresh(self) -> None:
        self._timer = None
        if self._running:
            self._again = True
            return
        self._running = True
        served, self._waiting = self._waiting, []
        try:
            names = list(self._user_names())
        except OSError as e:  # the users file unreadable: show the Maildirs found
            names = []
            self._log_once(e)
        d = self._run_in_thread(survey, self._root, names)
        d.addCallbacks(self._surveyed, self._survey_failed)
        d.addBoth(self._done, served)

    def _surveyed(self, result: list[MaildirSurvey]) -> None:
        if result != self.latest:
            self.latest = result
            for listener in tuple(self._listeners):
                listener(result)

    def _survey_failed(self, failure) -> None:
        self._log_once(failure.value)

    def _log_once(self, error) -> None:
        if not self._failed_once:
            self._failed_once = True
            log.warn("lab dashboard: cannot survey the Maildirs: {error}", error=error)

    def _done(self, _ignored, served: list[defer.Deferred]) -> None:
        self._running = False
        for waiting in served:
            waiting.callback(self.latest)
        if not self.running:
            return
        if self._again:
            self._again = False
            self.refresh_soon()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._refresh)
