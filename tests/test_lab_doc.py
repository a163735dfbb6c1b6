"""docs/lab.md, run as written: every command of the worksheet, in order, against the
server its own configuration starts.

The worksheet marks its blocks with HTML comments (invisible once rendered):
``<!-- lab: file NAME -->`` writes the next block to NAME; ``<!-- lab: server -->`` starts
the next block's command in the background (the server; stopped at the end);
``<!-- lab: expect REGEX -->`` after a block: that block's output must match
(``re.search``, multi-line).  Every other ``sh`` block runs with ``bash -e``.  The only
change made to the text: the ports 2525, 1100, 5870 and 8025 become port 0 in the
configuration (tests never use fixed ports) and the ports the server reports elsewhere.
"""

from __future__ import annotations

import os
import re
import signal
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.harness import REPO, child_env, deferred_sleep, read, require_tool, run_client

LAB = os.path.join(REPO, "docs", "lab.md")
_BLOCK = re.compile(r"(?:<!-- lab: (?P<mark>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```\n"
                    r"(?:<!-- lab: expect (?P<expect>.*?) -->\n)?", re.DOTALL)
_PORTS = {"2525": "SMTP", "1100": "POP3", "8025": "web", "5870": "SUBMISSION"}
_PORT_WORD = re.compile(r"\b(2525|1100|8025|5870)\b")
_LISTENING = re.compile(r"popgate (\w+) listening on \S+ \(\w+Address\(type='TCP', "
                        r"host='[^']*', port=(\d+)")


def blocks(text: str):
    """(mark, language, body, expected pattern) for each fenced block, in order."""
    for m in _BLOCK.finditer(text):
        yield m.group("mark") or "", m.group("lang"), m.group("body"), m.group("expect")


class LabWorksheetTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_every_command_runs_as_written(self):
        for tool in ("swaks", "curl"):
            require_tool(tool)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.env = child_env(PATH=os.path.dirname(sys.executable) + os.pathsep +
                             os.environ.get("PATH", ""))
        self.ports: dict[str, str] = {}
        ran = 0
        with open(LAB, encoding="utf-8") as f:
            worksheet = f.read()
        for mark, lang, body, expect in blocks(worksheet):
            if mark.startswith("file "):
                self.write(mark[5:], body)
                continue
            if mark == "server":
                yield self.start_server(body)
                continue
            self.assertEqual(lang, "sh", f"a block the test cannot run:\n{body}")
            output = yield self.run_block(body)
            ran += 1
            if expect:
                self.assertRegex(output, re.compile(expect, re.MULTILINE),
                                 f"{body}\nprinted:\n{output}")
        self.assertGreaterEqual(ran, 10)

    def write(self, name: str, body: str) -> None:
        if name.endswith(".toml"):
            body = _PORT_WORD.sub("0", body)
        with open(os.path.join(self.directory, name), "w", encoding="utf-8") as f:
            f.write(body)

    def localise(self, command: str) -> str:
        return _PORT_WORD.sub(lambda m: self.ports[_PORTS[m.group(1)]], command)

    @defer.inlineCallbacks
    def start_server(self, body: str):
        args = body.strip().split()
        executable = os.path.join(os.path.dirname(sys.executable), args[0])
        server = _Server()
        transport = reactor.spawnProcess(server, executable, args, env=self.env,
                                         path=self.directory)
        self.addCleanup(self.stop, transport, server)
        log = os.path.join(self.directory, "lab.log")
        for _ in range(300):
            text = read(log).decode("utf-8", "replace") if os.path.exists(log) else ""
            if "popgate ready" in text:
                break
            yield deferred_sleep(0.1)
        else:
            self.fail(f"the lab server did not start:\n{text}")
        self.ports = {label: port for label, port in _LISTENING.findall(text)}

    @staticmethod
    def stop(transport, server):
        if not server.ended.called:
            transport.signalProcess(signal.SIGTERM)
        return server.ended

    @defer.inlineCallbacks
    def run_block(self, body: str):
        out, err, code = yield run_client(["bash", "-e", "-c", self.localise(body)],
                                          env=self.env, path=self.directory)
        output = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, f"{body}\nprinted:\n{output}{err.decode('utf-8', 'replace')}")
        return output


class _Server(protocol.ProcessProtocol):
    """The lab's server process: its log goes to lab.log; we only wait for its end."""

    def __init__(self):
        self.ended = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
