"""The ``twistd popgate`` command line: options in, a service out.

Precedence is defaults < ``--config`` file < these options.  A configuration error ends
the command with one line on stderr and exit status 1 (no usage dump, no traceback).
"""

from __future__ import annotations

import sys

from twisted.python import usage

from popgate import config as configuration
from popgate.service import makeService as _makeService


class Options(usage.Options):
    synopsis = ("[--config FILE] [--smtp ENDPOINT]... [--pop3 ENDPOINT]... "
                "[--submission ENDPOINT]... [--data-dir DIR] [--trace]")
    optFlags = [
        ["trace", None, "Log every command and reply as C:/S: lines ([log] trace = true)."],
    ]
    optParameters = [
        ["config", "c", None, "TOML configuration file; `popgate config example` prints a "
                              "commented sample, `popgate init` writes one."],
        ["data-dir", "d", None, "Data directory (mail, users); default ./popgate-data."],
    ]

    def __init__(self):
        super().__init__()
        self["smtp"] = []
        self["pop3"] = []
        self["submission"] = []

    def opt_smtp(self, endpoint: str) -> None:
        """SMTP listener endpoint (repeatable), e.g. tcp:2525:interface=127.0.0.1."""
        self["smtp"].append(endpoint)

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener endpoint (repeatable), e.g. tcp:1100:interface=127.0.0.1."""
        self["pop3"].append(endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """Submission listener endpoint (repeatable), e.g. tcp:587 (STARTTLS + AUTH)."""
        self["submission"].append(endpoint)

    def overrides(self) -> dict[str, object]:
        overrides: dict[str, object] = {}
        if self["smtp"]:
            overrides["smtp.listen"] = list(self["smtp"])
        if self["pop3"]:
            overrides["pop3.listen"] = list(self["pop3"])
        if self["submission"]:
            overrides["submission.listen"] = list(self["submission"])
        if self["data-dir"]:
            overrides["server.data_dir"] = self["data-dir"]
        if self["trace"]:
            overrides["log.trace"] = True
        return overrides

    def postOptions(self) -> None:
        try:
            self.config = configuration.load(self["config"], self.overrides())
        except configuration.ConfigError as e:
            # twistd would print the whole usage text before a UsageError; one line is kinder.
            print(f"popgate: {e}", file=sys.stderr)
            raise SystemExit(1) from None


def makeService(options: Options):
    service = _makeService(options.config)
    twistd = getattr(options, "parent", None)  # twistd's own options (--logfile, -n)
    if options.config.log.format == "json" and twistd is not None:
        from popgate.observe.jsonlog import JSONLogging, json_observer

        service = JSONLogging(service, json_observer(twistd.get("logfile"),
                                                     twistd.get("nodaemon", False)))
    return service
