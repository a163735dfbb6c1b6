"""Configuration: defaults, file, overrides, and one clear error per kind of bad file."""

import dataclasses
import os
import re
import tomllib

from twisted.trial.unittest import TestCase

from popgate import config
from tests.certs import make_test_pki

HERE = os.path.dirname(os.path.abspath(__file__))
BAD = os.path.join(HERE, "fixtures", "bad-config")
SAMPLE = os.path.join(os.path.dirname(HERE), "popgate", "data", "popgate.toml")

# fixture -> the message after "<file>: "
EXPECTED_ERRORS = {
    "syntax.toml": "TOML syntax error: Expected ']' at the end of a table declaration "
                   "(at line 1, column 6)",
    "unknown-key.toml": "smtp.max_mesage_size: unknown key",
    "unknown-section.toml": "smpt: unknown section",
    "wrong-type.toml": "smtp.max_message_size: expected an integer, got 'big'",
    "wrong-type-bool.toml": "pop3.apop: expected true or false, got 'yes'",
    "bad-endpoint.toml": "pop3.listen: bad endpoint 'bogus:110': Unknown endpoint type: 'bogus'",
    "bad-port.toml": "smtp.listen: bad endpoint 'tcp:notaport': invalid literal for int() "
                     "with base 10: 'notaport'",
    "missing-certificate.toml": "tls.certificate: /nonexistent/popgate/cert.pem: file not found",
    "cert-without-key.toml": "tls.key: tls.certificate and tls.key go together",
    "bad-bare-newline.toml": 'smtp.bare_newline: must be "normalize" or "reject"',
    "short-idle-timeout.toml": "pop3.idle_timeout: RFC 1939 §3 requires at least 600 seconds",
    "bad-alias-target.toml": "aliases.'info@example.org': invalid user '../root@example.org': "
                             "invalid local part '../root'",
    "bad-domain.toml": "server.domains: invalid domain 'exa mple.org'",
    "zero-limit.toml": "limits.max_sessions: must be greater than zero, got 0",
    "negative-listing-cache.toml": "pop3.listing_cache: must be zero (no cache) or more, got -1",
    "bad-network.toml": "limits.trusted_networks: '10.0.0.0/33' does not appear to be",
    "tls-listen-without-certificate.toml": "tls.certificate: required by the tls_listen endpoints",
    "haproxy-without-trusted-proxies.toml": "limits.trusted_proxies: haproxy: endpoints need "
                                            "the addresses of the proxies allowed",
    "web-without-token.toml": "web.token: required: a web.listen endpoint is not "
                              "loopback-only",
    "bad-log-format.toml": 'log.format: must be "text" or "json"',
}


class DefaultsTests(TestCase):
    def test_builtin_defaults(self):
        c = config.load()
        self.assertEqual(c.smtp.listen, ("tcp:2525:interface=127.0.0.1",))
        self.assertEqual(c.pop3.listen, ("tcp:1100:interface=127.0.0.1",))
        self.assertEqual(c.server.data_dir, os.path.abspath("popgate-data"))
        self.assertEqual(c.users_file, os.path.join(os.path.abspath("popgate-data"), "users"))
        self.assertEqual(c.source, "<defaults>")
        self.assertFalse(c.tls.enabled)

    def test_config_is_frozen(self):
        c = config.load()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            c.smtp.max_recipients = 5

    def test_sample_file_lists_every_key_with_its_default(self):
        """The shipped sample: each key appears once, commented, with the built-in default."""
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()
        section, listed = None, {}
        for line in text.splitlines():
            if m := re.match(r"\[(\w+)\]$", line):
                section = m.group(1)
            elif m := re.match(r"#(\w+) = (.*)$", line):
                listed[f"{section}.{m.group(1)}"] = tomllib.loads(f"v = {m.group(2)}")["v"]
        defaults = config.Config()
        for name in config._SECTIONS:
            for field in dataclasses.fields(getattr(defaults, name)):
                key = f"{name}.{field.name}"
                self.assertIn(key, listed, f"{key} missing from popgate/data/popgate.toml")
                default = getattr(getattr(defaults, name), field.name)
                value = listed.pop(key)
                self.assertEqual(tuple(value) if isinstance(value, list) else value, default, key)
        self.assertEqual(listed, {}, "keys in popgate/data/popgate.toml that do not exist")

    def test_sample_file_loads(self):
        self.assertEqual(config.load(SAMPLE).smtp, config.SMTPConfig())


class PrecedenceTests(TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_file_overrides_defaults_and_overrides_win(self):
        path = self.write('[smtp]\nlisten = ["tcp:2626"]\nmax_recipients = 7\n'
                          '[server]\ndata_dir = "/srv/mail"\n')
        c = config.load(path, {"smtp.listen": ["tcp:2727"]})
        self.assertEqual(c.smtp.listen, ("tcp:2727",))
        self.assertEqual(c.smtp.max_recipients, 7)
        self.assertEqual(c.server.data_dir, "/srv/mail")
        self.assertEqual(c.source, path)

    def test_single_string_endpoint_becomes_a_list(self):
        c = config.load(self.write('[pop3]\nlisten = "tcp:1111"\n'))
        self.assertEqual(c.pop3.listen, ("tcp:1111",))

    def test_integer_accepted_for_float(self):
        c = config.load(self.write("[smtp]\ncommand_timeout = 30\n"))
        self.assertEqual(c.smtp.command_timeout, 30.0)

    def test_aliases_normalised(self):
        c = config.load(self.write('[aliases]\n"Info@Example.ORG" = "alice@example.org"\n'
                                   '"@Example.org" = ["bob@example.org"]\n'))
        self.assertEqual(dict(c.aliases), {"info@example.org": ("alice@example.org",),
                                           "@example.org": ("bob@example.org",)})

    def test_dump_round_trips(self):
        c = config.load(self.write('[aliases]\n"info@example.org" = "alice@example.org"\n'))
        again = config.load(self.write(config.dump(c)))
        self.assertEqual(dataclasses.replace(again, source=c.source), c)

    def test_loads_takes_what_dump_gives(self):
        """How a worker process gets its main process's configuration."""
        c = config.load(self.write('[server]\nworkers = 3\n[aliases]\n'
                                   '"info@example.org" = "alice@example.org"\n'),
                        {"server.hostname": 'odd "host"\\\x7f\t\n'})
        again = config.loads(config.dump(c), "worker 1")
        self.assertEqual(dataclasses.replace(again, source=c.source), c)
        self.assertEqual(again.source, "worker 1")
        e = self.assertRaises(config.ConfigError, config.loads, "[server", "worker 1")
        self.assertTrue(str(e).startswith("worker 1: TOML syntax error"), str(e))

    def test_workers(self):
        self.assertEqual(config.load(None).server.workers, 1)
        self.assertEqual(config.load(None, {"server.workers": 2}).server.workers, 2)
        busy = ("server.workers: the dashboard and the metrics see only the main process: "
                "use workers = 1 with [web] or [metrics]")
        loopback = ["tcp:0:interface=127.0.0.1"]
        cases = [
            ({"server.workers": 0}, "server.workers: must be 1 to 64, got 0"),
            ({"server.workers": 65}, "server.workers: must be 1 to 64, got 65"),
            ({"server.workers": 2, "web.listen": loopback}, busy),
            ({"server.workers": 2, "metrics.listen": loopback}, busy),
            ({"server.workers": 2, "smtp.listen": [], "smtp.lmtp_listen": []},
             "server.workers: no SMTP, SMTPS or LMTP listener for the workers to share"),
            ({"server.workers": 2, "smtp.listen": ["haproxy:tcp:25"],
              "limits.trusted_proxies": ["127.0.0.1"]},
             "server.workers: workers share only tcp, tcp6, unix, systemd listeners, not "
             "'haproxy:tcp:25'"),
        ]
        for overrides, message in cases:
            e = self.assertRaises(config.ConfigError, config.load, None, overrides)
            self.assertEqual(str(e), "<defaults>: " + message)

    def test_certificate_paths_checked_and_made_absolute(self):
        ca, chain, key = make_test_pki(self.mktemp())
        c = config.load(self.write(f'[tls]\ncertificate = "{chain}"\nkey = "{key}"\n'))
        self.assertTrue(c.tls.enabled)
        self.assertEqual(c.tls.certificate, os.path.abspath(chain))

    def test_mismatched_key_named_in_the_error(self):
        _, chain, _ = make_test_pki(self.mktemp())
        _, _, other_key = make_test_pki(self.mktemp())
        path = self.write(f'[tls]\ncertificate = "{chain}"\nkey = "{other_key}"\n')
        e = self.assertRaises(config.ConfigError, config.load, path)
        self.assertIn("tls.certificate", str(e))
        self.assertIn("does not match", str(e))

    def test_missing_file(self):
        e = self.assertRaises(config.ConfigError, config.load, "/nonexistent/popgate.toml")
        self.assertEqual(str(e), "/nonexistent/popgate.toml: No such file or directory")


class LabKeysTests(TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_web_token_not_needed_on_loopback_only(self):
        c = config.load(self.write('[web]\nlisten = ["tcp:8025:interface=127.0.0.1", '
                                   '"tcp6:8025:interface=\\\\:\\\\:1", "unix:/run/lab"]\n'))
        self.assertEqual(c.web.token, "")
        c = config.load(self.write('[web]\nlisten = ["tcp:8025"]\ntoken = "t"\n'))
        self.assertEqual(c.web.listen, ("tcp:8025",))

    def test_loopback_endpoints(self):
        for description, loopback in [("tcp:8025:interface=127.0.0.1", True),
                                      ("tcp:8025:interface=127.1.2.3", True),
                                      ("tcp6:8025:interface=\\:\\:1", True),
                                      ("unix:/run/popgate/lab", True),
                                      ("tcp:8025", False),
                                      ("tcp:8025:interface=0.0.0.0", False),
                                      ("tcp6:8025:interface=\\:\\:", False),
                                      ("ssl:8025:interface=127.0.0.1", False)]:
            self.assertEqual(config.is_loopback_endpoint(description), loopback, description)

    def test_trace_option(self):
        from popgate.tap import Options

        options = Options()
        options.parseOptions(["--trace"])
        self.assertTrue(options.config.log.trace)
        options = Options()
        options.parseOptions([])
        self.assertFalse(options.config.log.trace)


class BadConfigTests(TestCase):
    def test_every_fixture_has_an_expected_message(self):
        self.assertEqual(sorted(os.listdir(BAD)), sorted(EXPECTED_ERRORS))

    def test_each_bad_file_names_file_key_and_reason(self):
        for name, expected in EXPECTED_ERRORS.items():
            path = os.path.join(BAD, name)
            e = self.assertRaises(config.ConfigError, config.load, path)
            message = str(e)
            self.assertTrue(message.startswith(f"{path}: {expected}"), f"{name}: {message}")
            self.assertNotIn("\n", message)


class SubmissionAndRelayConfigTests(TestCase):
    def test_defaults(self):
        c = config.load()
        self.assertEqual(c.submission.listen, ("tcp:5870:interface=127.0.0.1",))
        self.assertEqual((c.submission.max_messages_per_hour, c.submission.show_auth_user),
                         (200, False))
        self.assertEqual((c.relay.mode, c.relay.enabled, c.relay.max_queue_time),
                         ("none", False, 432000.0))

    def test_relay_refusals(self):
        cases = {
            (("relay.mode", "direct"),): 'relay.mode: must be "none", "smarthost" or "mx"',
            (("relay.mx_tls", "none"),): 'relay.mx_tls: must be "opportunistic" or "required"',
            (("relay.mx_port", 0),): "relay.mx_port: must be a port number, got 0",
            (("relay.max_connections_per_domain", 0),):
                "relay.max_connections_per_domain: must be at least 1, got 0",
            (("relay.mode", "smarthost"), ("relay.smarthost", "relay.example")):
                'relay.smarthost: expected "host:port", got \'relay.example\'',
            (("relay.mode", "smarthost"), ("relay.smarthost", "relay.example:587"),
             ("relay.smarthost_tls", "none")):
                'relay.smarthost_tls: "none" is only allowed for a loopback smarthost',
            (("relay.smarthost_user", "u"),):
                "relay.smarthost_password_file: relay.smarthost_user and "
                "relay.smarthost_password_file go together",
            (("relay.smarthost_tls", "maybe"),):
                'relay.smarthost_tls: must be "required", "opportunistic" or "none"',
            (("submission.max_messages_per_hour", 0),):
                "submission.max_messages_per_hour: must be greater than zero, got 0",
        }
        for overrides, message in cases.items():
            e = self.assertRaises(config.ConfigError, config.load, None, dict(overrides))
            self.assertEqual(str(e), "<defaults>: " + message)

    def test_a_loopback_smarthost_may_go_without_tls(self):
        c = config.load(None, {"relay.mode": "smarthost", "relay.smarthost": "[::1]:25",
                               "relay.smarthost_tls": "none"})
        self.assertEqual(config.split_hostport(c.relay.smarthost), ("::1", 25))
