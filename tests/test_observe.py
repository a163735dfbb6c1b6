"""The event observers on their own: the protocol trace and the metrics, fed by events
published on an EventBus as the protocols publish them."""

import io
import json
import os
import sys

from twisted.application.service import Application, IServiceCollection, MultiService
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import TestCase

from popgate.events import EventBus, SessionInfo
from popgate.observe.jsonlog import JSONLinesObserver, JSONLogging, json_observer
from popgate.observe.metrics import MAX_REASONS, Metrics
from popgate.observe.redact import SecretMask
from popgate.observe.trace import ProtocolTrace
from popgate.store.survey import MaildirSurvey


def session(events: EventBus, protocol="POP3", client="127.0.0.1:40001") -> SessionInfo:
    return SessionInfo(events.new_session_id(), protocol, client)


class TraceTests(TestCase):
    def setUp(self):
        self.events = EventBus()
        self.logged = []
        ProtocolTrace(Logger(observer=self.logged.append)).subscribe(self.events)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.logged]

    def dialogue(self, info, *steps):
        for kind, line in steps:
            self.events.publish(kind, info, line=line, lines=1)

    def test_commands_and_replies_with_session_id_and_client(self):
        info = session(self.events)
        self.dialogue(info, ("reply", "+OK popgate ready."), ("command", "STAT"),
                      ("reply", "+OK 2 320"))
        self.assertEqual(self.lines(), [
            f"{info.id} POP3 127.0.0.1:40001 S: +OK popgate ready.",
            f"{info.id} POP3 127.0.0.1:40001 C: STAT",
            f"{info.id} POP3 127.0.0.1:40001 S: +OK 2 320",
        ])
        self.assertEqual(self.logged[1]["direction"], "C")
        self.assertEqual(self.logged[1]["session"], info.id)

    def test_bodies_are_summarised_and_multiline_replies_counted(self):
        info = session(self.events)
        self.events.publish("reply", info, line="+OK 642 octets", lines=14,
                            summary="642 octets, Subject: hello")
        self.assertEqual(self.lines(), [
            f"{info.id} POP3 127.0.0.1:40001 S: +OK 642 octets "
            "[body: 642 octets, Subject: hello] (+13 lines)"])

    def test_message_data_is_one_line_with_its_sizes(self):
        info = session(self.events, "SMTP")
        self.dialogue(info, ("command", "DATA"), ("reply", "354 End data"))
        self.events.publish("message", info, action="delivered", id="Q1", sender="a@b.test",
                            recipients=("c@d.test",), users=("c@d.test",), octets=460,
                            list_octets=474, tls=None, summary="Subject: hi")
        self.events.publish("message", info, action="retrieved", number=1, uidl="u", octets=9)
        self.assertEqual(self.lines()[-1], f"{info.id} SMTP 127.0.0.1:40001 C: [message data: "
                                           "460 octets stored, 474 as LIST reports them; "
                                           "Subject: hi]")
        self.assertEqual(len(self.lines()), 3)

    def test_secrets_masked_even_if_a_protocol_forgot(self):
        """The protocols mask before they publish; the trace masks again, so that a
        forgotten path still shows nothing."""
        pop3, smtp = session(self.events), session(self.events, "SMTP")
        self.dialogue(pop3, ("command", "PASS hunter2 with spaces"),
                      ("command", "APOP alice@example.org c4c9334bac560ecc979e58001b3e22fb"),
                      ("command", "AUTH PLAIN AGFsaWNlAGh1bnRlcjI="),
                      ("command", "AUTH PLAIN"), ("reply", "+ "),
                      ("command", "AGFsaWNlAGh1bnRlcjI="), ("command", "STAT"))
        self.dialogue(smtp, ("command", "AUTH LOGIN"), ("reply", "334 VXNlcm5hbWU6"),
                      ("command", "YWxpY2U="), ("reply", "334 UGFzc3dvcmQ6"),
                      ("command", "aHVudGVyMg=="), ("reply", "235 2.7.0 ok"),
                      ("command", "AUTH PLAIN"), ("reply", "334 "), ("command", "*"))
        text = "\n".join(self.lines())
        for secret in ("hunter2", "c4c9334bac", "AGFsaWNl", "YWxpY2U=", "aHVudGVyMg=="):
            self.assertNotIn(secret, text)
        self.assertIn("C: PASS ********", text)
        self.assertIn("C: APOP alice@example.org ********", text)
        self.assertIn("C: AUTH PLAIN ********", text)
        self.assertIn("C: STAT", text)
        self.assertIn("C: *", text)  # a cancelled exchange is shown as it is

    def test_closed_session_forgets_a_pending_challenge(self):
        mask = SecretMask()
        mask.reply("S1", "+ ")
        mask.closed("S1")
        self.assertEqual(mask.command("S1", "STAT"), "STAT")


class MetricsTests(TestCase):
    def setUp(self):
        self.events = EventBus()
        self.boxes = []
        self.metrics = Metrics(auth_queue=lambda: 3, mailboxes=lambda: self.boxes,
                               max_users=2)
        self.metrics.subscribe(self.events)

    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_scripted_smtp_and_pop3_sessions(self):
        smtp = session(self.events, "SMTP")
        self.events.publish("connected", smtp, tls=False)
        for octets in (100, 250):
            self.events.publish("message", smtp, action="delivered", id="X", sender="a@b",
                                recipients=("alice@example.org",), users=("alice@example.org",),
                                octets=octets, list_octets=octets + 5, tls=False,
                                latency=0.004)
        self.events.publish("refused", smtp, reason="<x@y>: unknown user",
                            reply="550 5.1.1 <x@y>: unknown user")
        self.events.publish("refused", smtp, reason="too many sessions",
                            reply="421 4.7.0 mx.test Error: too many sessions")
        pop3 = session(self.events)
        self.events.publish("connected", pop3, tls=False)
        self.assertEqual(self.value("popgate_sessions_open", protocol="SMTP"), 1)
        self.events.publish("closed", smtp, reason="QUIT", user=None, duration=0.1, messages=2)
        self.events.publish("login", pop3, user="alice@example.org", mechanism="USER",
                            result="failed")
        self.events.publish("login", pop3, user="alice@example.org", mechanism="USER",
                            result="ok")
        for action in ("retrieved", "retrieved", "topped", "deleted"):
            self.events.publish("message", pop3, action=action, number=1, uidl="u", octets=9)
        self.assertEqual(self.value("popgate_sessions_total", protocol="SMTP"), 1)
        self.assertEqual(self.value("popgate_sessions_open", protocol="SMTP"), 0)
        self.assertEqual(self.value("popgate_sessions_open", protocol="POP3"), 1)
        self.assertEqual(self.value("popgate_messages_delivered_total", protocol="SMTP"), 2)
        self.assertEqual(self.value("popgate_delivered_octets_total", protocol="SMTP"), 350)
        self.assertEqual(self.value("popgate_delivery_seconds_count"), 2)
        self.assertEqual(self.value("popgate_delivery_seconds_bucket", le="0.005"), 2)
        self.assertEqual(self.value("popgate_delivery_seconds_bucket", le="0.0025"), 0)
        self.assertEqual(self.value("popgate_refusals_total", protocol="SMTP",
                                    reason="550 5.1.1"), 1)
        self.assertEqual(self.value("popgate_refusals_total", protocol="SMTP",
                                    reason="421 4.7.0"), 1)
        self.assertEqual(self.value("popgate_logins_total", protocol="POP3", result="ok"), 1)
        self.assertEqual(self.value("popgate_logins_total", protocol="POP3", result="failed"), 1)
        self.assertEqual(self.value("popgate_pop3_commands_total", command="RETR"), 2)
        self.assertEqual(self.value("popgate_pop3_commands_total", command="TOP"), 1)
        self.assertEqual(self.value("popgate_pop3_commands_total", command="DELE"), 1)
        self.assertEqual(self.value("popgate_auth_queue_length"), 3)

    def test_a_close_without_connect_does_not_go_negative(self):
        info = session(self.events)
        self.events.publish("closed", info, reason="refused", user=None, duration=0.0)
        self.assertIsNone(self.value("popgate_sessions_open", protocol="POP3"))

    def test_refusal_reasons_are_bounded(self):
        info = session(self.events)
        for n in range(MAX_REASONS + 5):
            self.events.publish("refused", info, reason=f"reason {n}",
                                reply="-ERR [IN-USE] busy")
        self.assertEqual(self.value("popgate_refusals_total", protocol="POP3",
                                    reason="other"), 5)

    def test_mailbox_gauges_bounded_biggest_first(self):
        def box(user, messages, octets):
            return MaildirSurvey(user, True, (), (), (), (0, messages, 0), messages, octets)

        self.boxes = [box("a@x.test", 1, 10), box("b@x.test", 2, 500), box("c@x.test", 3, 30),
                      box("d@x.test", 4, 20)]
        self.assertEqual(self.value("popgate_mailbox_octets", user="b@x.test"), 500)
        self.assertEqual(self.value("popgate_mailbox_messages", user="c@x.test"), 3)
        self.assertIsNone(self.value("popgate_mailbox_octets", user="a@x.test"))
        self.assertEqual(self.value("popgate_mailbox_messages", user="(others)"), 5)
        self.assertEqual(self.value("popgate_mailbox_octets", user="(others)"), 30)


class JSONLogTests(TestCase):
    def test_one_json_object_per_line_with_the_text(self):
        out = io.StringIO()
        log = Logger(namespace="popgate.test", observer=JSONLinesObserver(out))
        log.info("{session} delivered {octets} octets", session="S1", octets=5)
        log.warn("braces {{in}} text: {what}", what="a\nb")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["text"], "S1 delivered 5 octets")
        self.assertEqual((first["session"], first["octets"]), ("S1", 5))
        self.assertEqual(first["log_level"]["name"], "info")
        self.assertEqual(second["text"], "braces {in} text: a\nb")

    def test_destination_follows_twistd(self):
        self.assertIs(json_observer("-", True)._out, sys.stdout)
        self.assertIs(json_observer(None, True)._out, sys.stdout)
        path = os.path.abspath(self.mktemp())
        observer = json_observer(path, False)
        self.addCleanup(observer._out.close)
        self.assertEqual(observer._out.path, path)

    def test_twistd_application_gets_the_observer(self):
        application = Application("popgate")
        observer = JSONLinesObserver(io.StringIO())
        inner = MultiService()
        JSONLogging(inner, observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        (wrapper,) = list(IServiceCollection(application))
        self.assertEqual(list(wrapper), [inner])
