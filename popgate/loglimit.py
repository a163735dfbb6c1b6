"""Rate limits for log lines: one line per distinct cause per interval, never a flood.

:func:`log_storage_error` is the one line for a mail-storage fault (a full disk, a
quota, an I/O error), shared by every protocol: an expected fault, logged once per cause
(its errno) per interval, never with a traceback.

Reactor thread only; time from an injected ``IReactorTime``; memory bounded (the table
is cleared past 10,000 keys).
"""

from __future__ import annotations

import errno

from twisted.logger import Logger

_log = Logger()
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class LogLimiter:
    """Allow a given log key at most once per ``interval`` seconds."""

    def __init__(self, clock, interval: float = 60.0):
        self._clock = clock
        self.interval = interval
        self._last: dict[object, float] = {}

    def allow(self, key: object) -> bool:
        now = self._clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = now
        return True


def log_storage_error(error: OSError, limiter: LogLimiter) -> bool:
    """Log ``error`` (once per errno per interval); True if the disk or quota is full."""
    if limiter.allow(("mail storage", error.errno)):
        _log.error("mail storage error: {error} (logged once per {interval:.0f} s while it "
                   "lasts)", error=error, interval=limiter.interval)
    return error.errno in DISK_FULL
