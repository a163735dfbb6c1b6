"""A worker's log events on a pipe to its main process, and back (:mod:`popgate.workers`).

Format: one twisted.logger JSON event per line (``eventAsJSON``, no record separator).
A failure's exception does not survive JSON (it becomes ``{"unpersistable": true}``), so
the worker sends its traceback as text in the line instead.  The main process publishes
each event in its own log, unchanged, so its observer formats every process's lines.
A line that is not a JSON object is kept as text; a line over ``MAX_LINE`` octets is
dropped with a warning.
"""

from __future__ import annotations

from twisted.logger import Logger, eventFromJSON, globalLogPublisher, jsonFileLogObserver

log = Logger()

MAX_LINE = 1 << 20


def json_lines_observer(out):
    """The worker's log observer: JSON lines on ``out``, tracebacks as text."""
    write = jsonFileLogObserver(out, recordSeparator="")

    def observe(event: dict) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            event = {key: value for key, value in event.items() if key != "log_failure"}
            event["log_format"] = (event.get("log_format") or "") + "\n{log_traceback}"
            event["log_traceback"] = failure.getTraceback()
        write(event)

    return observe


class LinePublisher:
    """Splits a worker's pipe into lines and publishes each one's event here."""

    def __init__(self, number: int):
        self.number = number
        self._buffer = b""
        self._skipping = False  # inside a line that was too long

    def feed(self, data: bytes) -> None:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return
            data, self._skipping = data[end + 1:], False
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE:
            self._buffer, self._skipping = b"", True
            log.warn("popgate worker {number}: a log line over {max} octets was dropped",
                     number=self.number, max=MAX_LINE)
        for line in lines:
            self.publish(line)

    def publish(self, line: bytes) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", "replace")
        try:
            event = eventFromJSON(text)
        except Exception:  # noqa: BLE001 - not an event: keep the line as text
            event = None
        if not isinstance(event, dict):
            log.info("popgate worker {number}: {text}", number=self.number, text=text)
            return
        globalLogPublisher(event)
