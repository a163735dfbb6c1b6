"""Rate limits for log lines: one line per distinct cause per interval, never a flood.

Reactor thread only; time from an injected ``IReactorTime``; memory bounded (the table
is cleared past 10,000 keys).
"""

from __future__ import annotations


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
