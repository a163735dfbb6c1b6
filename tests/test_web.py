"""The lab dashboard's parts: the Maildir survey, the mailbox watch, the board kept from
events, and the web site (real HTTP on port 0): token rule, JSON, event stream, assets."""

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from popgate.events import EventBus, SessionInfo
from popgate.store.survey import survey
from popgate.web.board import LabBoard
from popgate.web.mailboxes import MailboxWatch
from popgate.web.site import _Stream, build_site
from tests import fakes


def make_maildir(root, user, tmp=(), new=(), cur=()):
    local, _, domain = user.partition("@")
    path = os.path.join(root, domain, local, "Maildir")
    for sub, files in (("tmp", tmp), ("new", new), ("cur", cur)):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        for name, content in files:
            with open(os.path.join(path, sub, name), "wb") as f:
                f.write(content)
    return path


class SurveyTests(TestCase):
    def test_directories_sizes_and_kinds(self):
        root = self.mktemp()
        make_maildir(root, "alice@example.org",
                     tmp=[("1700000003.M1P1Q3R1.mx", b""), ("1700000004.M1P1Q4R1.mx", b"abc")],
                     new=[("1700000001.M1P1Q1R1.mx,S=10,W=12", b"x" * 10)],
                     cur=[("1700000000.M1P1Q0R1.mx,S=5,W=6:2,S", b"y" * 5),
                          ("foreign-file", b"a\nb\n")])
        (box,) = survey(root)
        self.assertEqual(box.user, "alice@example.org")
        self.assertEqual(box.counts, (2, 1, 2))
        self.assertEqual([f.kind for f in box.tmp], ["empty", "writing"])
        self.assertEqual(box.tmp[1].octets, 3)
        self.assertEqual((box.new[0].stored, box.new[0].octets, box.new[0].uidl),
                         (10, 12, "1700000001.M1P1Q1R1.mx"))
        self.assertEqual(box.cur[0].uidl, "1700000000.M1P1Q0R1.mx")
        self.assertEqual(box.cur[1].octets, 4)  # no W=: the file's size
        self.assertEqual((box.messages, box.octets), (3, 12 + 6 + 4))

    def test_named_users_first_even_without_a_maildir_and_bounds(self):
        root = self.mktemp()
        make_maildir(root, "zed@example.org",
                     new=[(f"17000000{n:02}.M1P1Q{n}R1.mx,S=1,W=1", b"x") for n in range(5)])
        boxes = survey(root, ["bob@example.org"], max_files=2)
        self.assertEqual([(b.user, b.exists) for b in boxes],
                         [("bob@example.org", False), ("zed@example.org", True)])
        self.assertEqual(boxes[1].counts, (0, 5, 0))
        self.assertEqual([f.name[:10] for f in boxes[1].new], ["1700000003", "1700000004"])
        self.assertEqual(len(survey(root, ["bob@example.org"], max_users=1)), 1)

    def test_changes_nothing(self):
        root = self.mktemp()
        self.assertEqual(survey(root, ["bob@example.org"])[0].counts, (0, 0, 0))
        self.assertFalse(os.path.exists(root))


class MailboxWatchTests(TestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.clock = Clock()
        self.run = fakes.Deferring()
        self.watch = MailboxWatch(self.clock, self.run, self.root, lambda: ["bob@example.org"],
                                  interval=2.0, settle=0.05)
        self.heard = []
        self.watch.listen(self.heard.append)
        self.watch.startService()
        self.addCleanup(self.watch.stopService)

    def test_surveys_at_start_periodically_and_soon_after_a_change(self):
        self.clock.advance(0)
        self.run.run_next()
        self.assertEqual([b.user for b in self.heard[0]], ["bob@example.org"])
        self.clock.advance(2.0)
        self.run.run_next()
        self.assertEqual(len(self.heard), 1)  # unchanged: nobody is told
        make_maildir(self.root, "bob@example.org", new=[("1.M1P1Q1R1.mx,S=1,W=1", b"x")])
        self.watch.refresh_soon()
        self.clock.advance(0.05)
        self.run.run_next()
        self.assertEqual(self.heard[-1][0].counts, (0, 1, 0))

    def test_fresh_waits_for_a_survey_begun_after_it(self):
        self.clock.advance(0)  # a survey runs, begun before the request
        d = self.watch.fresh()
        self.run.run_next()
        self.assertNoResult(d)
        make_maildir(self.root, "bob@example.org", new=[("1.M1P1Q1R1.mx,S=1,W=1", b"x")])
        self.clock.advance(0.05)
        self.run.run_next()
        self.assertEqual(self.successResultOf(d)[0].counts, (0, 1, 0))

    def test_one_survey_at_a_time(self):
        self.clock.advance(0)
        self.watch.refresh_soon()
        self.clock.advance(0.05)  # the first is still running: this one waits for it
        self.assertEqual(len(self.run.calls), 1)
        self.run.run_next()
        self.clock.advance(0.05)
        self.assertEqual(len(self.run.calls), 1)


def publish_pop3_session(events: EventBus) -> SessionInfo:
    info = SessionInfo(events.new_session_id(), "POP3", "127.0.0.1:40002")
    events.publish("connected", info, tls=False)
    events.publish("state", info, state="AUTHORIZATION")
    events.publish("command", info, line="USER alice@example.org")
    events.publish("reply", info, line="+OK", lines=1)
    events.publish("command", info, line="PASS not-masked-by-a-buggy-protocol")
    events.publish("login", info, user="alice@example.org", mechanism="USER", result="ok")
    events.publish("state", info, state="TRANSACTION")
    events.publish("message", info, action="deleted", number=2, uidl="U2", octets=10)
    return info


class BoardTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = EventBus()
        self.board = LabBoard(self.clock, transcript_lines=4, recent=2)
        self.board.subscribe(self.events)

    def test_pop3_session_state_marks_and_masked_transcript(self):
        info = publish_pop3_session(self.events)
        (shown,) = self.board.sessions_json()["open"]
        self.assertEqual(shown["id"], info.id)
        self.assertEqual((shown["user"], shown["state"]), ("alice@example.org", "TRANSACTION"))
        self.assertEqual(shown["marked"], {"U2": 2})
        self.assertEqual([line for _, _, line in shown["transcript"]],
                         ["USER alice@example.org", "+OK", "PASS ********"])
        self.events.publish("message", info, action="undeleted")
        self.assertEqual(self.board.sessions_json()["open"][0]["marked"], {})

    def test_smtp_targets_then_delivery_then_recent(self):
        info = SessionInfo(self.events.new_session_id(), "SMTP", "127.0.0.1:40003")
        self.events.publish("connected", info, tls=False)
        self.events.publish("command", info, line="RCPT TO:<Alice+news@Example.org>")
        self.assertEqual(self.board.open[info.id]["targets"], ["alice@example.org"])
        self.events.publish("message", info, action="delivered", id="Q1", sender="b@c",
                            recipients=("alice+news@example.org",),
                            users=("alice@example.org",), octets=100, list_octets=104, tls=False)
        self.events.publish("closed", info, reason="QUIT", user=None, duration=1.5, messages=1)
        self.assertEqual(self.board.sessions_json()["open"], [])
        (recent,) = self.board.sessions_json()["recent"]
        self.assertEqual(recent["delivered"][0]["list_octets"], 104)
        self.assertEqual(recent["closed"]["messages"], 1)

    def test_bounds(self):
        for _ in range(3):
            info = publish_pop3_session(self.events)
            self.events.publish("closed", info, reason="QUIT", user=None, duration=0.0)
        recent = self.board.sessions_json()["recent"]
        self.assertEqual(len(recent), 2)
        self.assertEqual(len(recent[0]["transcript"]), 3)
        self.assertEqual(recent[0]["dropped"], 0)
        info = publish_pop3_session(self.events)
        for n in range(3):
            self.events.publish("command", info, line=f"NOOP {n}")
        self.assertEqual(self.board.open[info.id]["dropped"], 2)

    def test_stream_gets_snapshot_then_coalesced_changes_and_flows(self):
        chunks = []
        remove = self.board.add_stream(chunks.append)
        self.assertTrue(chunks[0].startswith(b"event: snapshot\ndata: {"))
        info = publish_pop3_session(self.events)
        self.assertEqual(len(chunks), 1)  # nothing until the flush interval
        self.clock.advance(0.2)
        self.assertEqual(len(chunks), 2)
        self.assertEqual(chunks[1].count(b"event: session\n"), 1)
        self.events.publish("message", info, action="retrieved", number=1, uidl="U1", octets=5)
        self.assertIn(b"event: flow\n", chunks[2])
        self.assertEqual(json.loads(chunks[2].split(b"data: ")[1])["kind"], "pull")
        remove()
        self.clock.advance(1)
        self.assertEqual(len(chunks), 3)


class _Request:
    """What an event stream uses of a twisted.web request."""

    def __init__(self):
        self.written = []
        self.finished = defer.Deferred()
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return self.finished


class StreamTests(TestCase):
    def test_a_browser_that_does_not_read_gets_a_snapshot_when_it_does(self):
        clock, events = Clock(), EventBus()
        board = LabBoard(clock)
        board.subscribe(events)
        request = _Request()
        _Stream(board, clock, request)
        self.assertEqual(len(request.written), 1)  # the first snapshot
        request.producer.pauseProducing()
        publish_pop3_session(events)
        clock.advance(20)  # changes, and a heartbeat: all dropped
        self.assertEqual(len(request.written), 1)
        request.producer.resumeProducing()
        self.assertEqual(len(request.written), 2)
        self.assertIn(b'"state":"TRANSACTION"', request.written[1])
        self.assertTrue(request.written[1].startswith(b"event: snapshot\n"))
        request.finished.callback(None)
        self.assertEqual(board.streams, 0)
        self.assertEqual(clock.getDelayedCalls(), [])


class SiteTests(TestCase):
    def serve(self, token=""):
        events = EventBus()
        board = LabBoard(reactor)
        board.subscribe(events)
        port = reactor.listenTCP(0, build_site(board, reactor, token), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        return events

    @defer.inlineCallbacks
    def get(self, path, headers=None):
        agent = Agent(reactor)
        response = yield agent.request(b"GET", (self.base + path).encode(),
                                       Headers(headers or {}))
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_page_and_assets_are_served_by_popgate_itself(self):
        self.serve()
        response, page = yield self.get("/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"SMTP clients", page)
        for path in ("/static/lab.css", "/static/lab.js"):
            response, asset = yield self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertNotIn(b"https://", asset)  # offline: no CDN, no web font
            self.assertNotIn(b"http://", asset)
        self.assertNotIn(b"http", page.replace(b'http-equiv', b''))

    @defer.inlineCallbacks
    def test_api_sessions_json(self):
        events = self.serve()
        publish_pop3_session(events)
        response, body = yield self.get("/api/sessions")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        sessions = json.loads(body)
        self.assertEqual(sessions["open"][0]["state"], "TRANSACTION")
        self.assertNotIn(b"not-masked", body)
        response, body = yield self.get("/api/mailboxes")
        self.assertEqual(json.loads(body), {"mailboxes": []})

    @defer.inlineCallbacks
    def test_token_needed_on_every_path(self):
        self.serve(token="s3cret-token")
        for path in ("/", "/static/lab.js", "/events", "/api/sessions", "/api/mailboxes"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 401, path)
        response, _ = yield self.get("/api/sessions?token=wrong")
        self.assertEqual(response.code, 401)
        response, _ = yield self.get("/api/sessions",
                                     {b"authorization": [b"Bearer s3cret-token"]})
        self.assertEqual(response.code, 200)
        response, _ = yield self.get("/?token=s3cret-token")
        self.assertEqual(response.code, 200)
        (cookie,) = response.headers.getRawHeaders(b"set-cookie")
        self.assertIn(b"HttpOnly", cookie)
        response, _ = yield self.get("/api/mailboxes",
                                     {b"cookie": [cookie.split(b";")[0]]})
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_a_failed_answer_logs_no_token(self):
        """The token may be in the URL (?token=): an error's log line names the path only."""

        class FailingWatch:
            latest = []

            def listen(self, listener):
                pass

            def fresh(self):
                return defer.fail(RuntimeError("survey broke"))

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        board = LabBoard(reactor, FailingWatch())
        port = reactor.listenTCP(0, build_site(board, reactor, "s3cret-token"),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        response, _ = yield self.get("/api/mailboxes?token=s3cret-token")
        self.assertEqual(response.code, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        text = "".join(formatEvent(e) + repr(e) for e in logged)
        self.assertIn("/api/mailboxes", text)
        self.assertNotIn("s3cret-token", text)

    @defer.inlineCallbacks
    def test_event_stream(self):
        events = self.serve()
        agent = Agent(reactor)
        response = yield agent.request(b"GET", (self.base + "/events").encode())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/event-stream"])
        received = defer.Deferred()
        chunks = []

        from twisted.internet.protocol import Protocol

        class Collect(Protocol):
            def dataReceived(self, data):
                chunks.append(data)
                if b"event: session" in b"".join(chunks) and not received.called:
                    received.callback(None)

        collector = Collect()
        response.deliverBody(collector)
        publish_pop3_session(events)
        yield received.addTimeout(5, reactor)
        collector.transport.stopProducing()
        text = b"".join(chunks)
        self.assertIn(b"event: snapshot", text)
        self.assertIn(b'"state":"TRANSACTION"', text)
