"""``[log] format = "json"``: one JSON object per line, for journald and log shippers.

Each line is twisted.logger's JSON form of a log event (:func:`twisted.logger.eventAsJSON`:
every field, ``log_level``, ``log_namespace``, ``log_time``, a failure as a structure)
plus ``text``, the line the text format would show, so that a reader needs no Twisted
format strings.  No record separator: one event, one line (``json.loads`` per line).

The destination is twistd's: ``--logfile=-`` or ``-n`` without ``--logfile``: standard
output (systemd's journal); otherwise ``--logfile`` (default ``twistd.log``), rotated by
twistd's rules.  twistd takes the observer from the application's
:class:`~twisted.logger.ILogObserver` component (:class:`JSONLogging` sets it); an
explicit ``twistd --logger`` still wins.
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, eventAsJSON, formatEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, out):
        self._out = out

    def __call__(self, event: dict) -> None:
        self._out.write(eventAsJSON({**event, "text": formatEvent(event)}) + "\n")
        self._out.flush()


def json_observer(logfile: str | None, nodaemon: bool) -> JSONLinesObserver:
    """Where twistd would write its text log (see the module docstring)."""
    if logfile == "-" or (nodaemon and not logfile):
        return JSONLinesObserver(sys.stdout)
    return JSONLinesObserver(LogFile.fromFullPath(logfile or "twistd.log"))


class JSONLogging(MultiService):
    """Wraps popgate's service for twistd, so that twistd logs in JSON.

    twistd asks the application for an ILogObserver before it starts logging, and the
    application is within reach only when it adopts its service: here.
    """

    def __init__(self, service, observer: JSONLinesObserver):
        super().__init__()
        service.setServiceParent(self)
        self._observer = observer

    def setServiceParent(self, parent) -> None:
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:  # twistd's Application (a Componentized)
            set_component(ILogObserver, self._observer)
        super().setServiceParent(parent)
