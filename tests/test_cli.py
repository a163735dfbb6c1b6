"""The popgate admin command, as an administrator types it."""

import argparse
import errno
import grp
import io
import os
import pwd
import re
import stat
import subprocess
import sys
import time

from cryptography import x509
from twisted.trial.unittest import SkipTest, TestCase

from popgate import cli, config
from popgate.auth import users
from popgate.auth.users import UserDB, verify_password
from tests.certs import make_test_pki
from tests.harness import child_env, read
from tests.test_config import SAMPLE


class CLITests(TestCase):
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        self.users_file = os.path.join(self.data, "users")

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(["--data-dir", self.data, *argv])
        return code, out.getvalue(), err.getvalue()

    def test_user_add_list_passwd_del(self):
        code, out, _ = self.run_cli("user", "add", "Alice@Example.org", "--password-stdin",
                                    "--scheme", "BLF-CRYPT", stdin="s3cret\n")
        self.assertEqual((code, out), (0, "added alice@example.org\n"))
        self.assertEqual(stat.S_IMODE(os.stat(self.users_file).st_mode), 0o600)
        user = UserDB(self.users_file).get("alice@example.org")
        self.assertTrue(user.password.startswith("{BLF-CRYPT}$2"))
        self.assertTrue(verify_password(b"s3cret", user.password))

        code, out, _ = self.run_cli("user", "list")
        self.assertEqual(out, "alice@example.org\tBLF-CRYPT\n")

        self.run_cli("user", "passwd", "alice@example.org", "--password-stdin",
                     "--scheme", "PLAIN", stdin="new\n")
        self.assertEqual(UserDB(self.users_file).get("alice@example.org").password, "{PLAIN}new")

        code, out, _ = self.run_cli("user", "del", "alice@example.org")
        self.assertEqual(code, 0)
        self.assertIsNone(UserDB(self.users_file).get("alice@example.org"))

    def test_default_scheme_is_argon2id(self):
        self.run_cli("user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
        stored = UserDB(self.users_file).get("bob@example.org").password
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"), stored)

    def test_plain_scheme_warns(self):
        code, _, err = self.run_cli("user", "add", "lab@example.org", "--password-stdin",
                                    "--scheme", "PLAIN", stdin="pw\n")
        self.assertEqual(code, 0)
        self.assertIn("warning: {PLAIN} stores the password in clear", err)

    def test_bad_names_refused_with_one_line(self):
        for name in ["../x@example.org", "a/b@example.org", "a+b@example.org", "noatsign",
                     "a@exa_mple.org", "x" * 65 + "@example.org"]:
            code, out, err = self.run_cli("user", "add", name, "--password-stdin",
                                          "--scheme", "PLAIN", stdin="pw\n")
            self.assertEqual(code, 1, name)
            self.assertTrue(err.startswith("popgate: "), err)
            self.assertEqual(err.count("\n"), 1, err)
        self.assertFalse(os.path.exists(self.users_file))

    def test_duplicate_and_unknown_users(self):
        self.run_cli("user", "add", "a@example.org", "--password-stdin", "--scheme", "PLAIN",
                     stdin="pw\n")
        code, _, err = self.run_cli("user", "add", "A@example.org", "--password-stdin",
                                    "--scheme", "PLAIN", stdin="pw\n")
        self.assertEqual((code, err), (1, "popgate: user a@example.org already exists\n"))
        code, _, err = self.run_cli("user", "del", "zed@example.org")
        self.assertEqual((code, err), (1, "popgate: no such user zed@example.org\n"))

    def test_full_disk_is_one_line(self):
        def full(path, data, mode=0o600, like=None):
            raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp-x")

        self.patch(users, "write_atomically", full)
        code, out, err = self.run_cli("user", "add", "alice@example.org",
                                      "--password-stdin", "--scheme", "PLAIN", stdin="pw\n")
        self.assertEqual(code, 1)
        self.assertEqual(err.splitlines()[-1],
                         f"popgate: No space left on device: {self.users_file}.tmp-x")
        self.assertNotIn("Traceback", err)

    def test_empty_password_refused(self):
        code, _, err = self.run_cli("user", "add", "a@example.org", "--password-stdin",
                                    stdin="\n")
        self.assertEqual((code, err), (1, "popgate: empty password refused\n"))

    def test_config_check_prints_effective_config(self):
        code, out, _ = self.run_cli("config", "check")
        self.assertEqual(code, 0)
        self.assertIn('listen = ["tcp:2525:interface=127.0.0.1"]', out)
        self.assertIn(f'data_dir = "{self.data}"', out)
        self.assertIn("max_sessions_per_ip = 20", out)

    def test_config_check_reports_bad_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[smtp]\nmax_errors = -1\n")
        code, out, err = self.run_cli("config", "check", "--config", path)
        self.assertEqual(code, 1)
        self.assertEqual(err, f"popgate: {path}: smtp.max_errors: must be greater than zero, "
                              "got -1\n")

    def test_tls_selfsigned(self):
        cert, key = self.mktemp(), self.mktemp()
        code, out, _ = self.run_cli("tls", "selfsigned", "--hostname", "mail.lab.test",
                                    "--cert", cert, "--key", key)
        self.assertEqual(code, 0)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        code, _, err = self.run_cli("tls", "selfsigned", "--hostname", "x", "--cert", cert,
                                    "--key", key)
        self.assertEqual(code, 1)
        self.assertIn("use --force", err)

    def test_dkim_keygen_and_dns_records(self):
        code, out, _ = self.run_cli("dkim", "keygen", "--domain", "Example.org")
        self.assertEqual(code, 0)
        selector = time.strftime("s%Y%m", time.gmtime())
        key = os.path.join(self.data, "dkim", f"example.org.{selector}.key")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        record = out.splitlines()[1]
        self.assertRegex(record, rf'^{selector}._domainkey.example.org. IN TXT '
                                 r'"v=DKIM1; k=rsa; p=MII[A-Za-z0-9+/]+" "[A-Za-z0-9+/=]+"$')
        code, out, _ = self.run_cli("dkim", "keygen", "--domain", "example.net",
                                    "--selector", "ed1", "--algorithm", "ed25519")
        self.assertEqual(code, 0)
        self.assertIn('ed1._domainkey.example.net. IN TXT "v=DKIM1; k=ed25519; p=', out)
        code, _, err = self.run_cli("dkim", "keygen", "--domain", "example.net",
                                    "--selector", "ed1")
        self.assertEqual((code, err.count("\n")), (1, 1))
        self.assertIn("exists: choose another selector", err)

        code, out, _ = self.run_cli("dns", "records", "--ip", "203.0.113.5")
        self.assertEqual(code, 0)
        self.assertIn(record, out, "the DKIM record, as keygen printed it")
        for line in ("example.org. IN MX 10 ", 'example.org. IN TXT "v=spf1 mx -all"',
                     '_dmarc.example.net. IN TXT "v=DMARC1; p=none;',
                     "5.113.0.203.in-addr.arpa. IN PTR ", "dig +short -x 203.0.113.5",
                     f"dig +short TXT {selector}._domainkey.example.org"):
            self.assertIn(line, out)


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


class HelpTests(TestCase):
    def test_every_command_and_option_has_help_with_its_default(self):
        checked = 0
        for parser in _all_parsers(cli._parser()):
            formatter = parser._get_formatter()
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                    continue
                if isinstance(action, argparse._SubParsersAction):
                    for choice in action._choices_actions:
                        self.assertTrue(choice.help, f"{parser.prog} {choice.dest}")
                    continue
                text = formatter._expand_help(action) if action.help else ""
                self.assertTrue(text, f"{parser.prog} {action.dest}: no help")
                if action.option_strings:
                    self.assertIn("default", text, f"{parser.prog} {action.dest}")
                checked += 1
        self.assertGreater(checked, 30)

    def test_help_runs_for_every_command(self):
        for argv in (["-h"], ["init", "-h"], ["user", "add", "-h"], ["config", "check", "-h"],
                     ["tls", "selfsigned", "-h"]):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            self.assertRaises(SystemExit, cli.main, argv)
            self.assertIn("usage: popgate", out.getvalue())


class NoTerminalTests(TestCase):
    """Without a terminal the commands that would ask say so in one line."""

    def run_popgate(self, *argv: str) -> subprocess.CompletedProcess:
        data = os.path.abspath(self.mktemp())
        return subprocess.run([sys.executable, "-m", "popgate.cli", "--data-dir", data, *argv],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, env=child_env(), cwd=os.path.dirname(data))

    def test_user_add_and_passwd_from_dev_null(self):
        for argv in (["user", "add", "alice@example.org"],
                     ["user", "passwd", "alice@example.org"]):
            result = self.run_popgate(*argv)
            if argv[1] == "passwd":
                self.assertEqual(result.stderr, "popgate: no such user alice@example.org\n")
                continue
            self.assertEqual(result.returncode, 1)
            self.assertEqual(result.stderr, "popgate: no terminal to ask for the password on; "
                                            "give it on standard input with --password-stdin\n")

    def test_init_without_user(self):
        result = self.run_popgate("init")
        self.assertEqual((result.returncode, result.stderr),
                         (1, "popgate: no terminal to ask for the first user on; "
                             "give --user NAME\n"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class CLIOperationsTests(CLITests):
    def test_init_end_of_input_at_the_prompt(self):
        self.patch(sys, "stdin", _Terminal(""))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdout", io.StringIO())
        code = cli.main(["--data-dir", self.data, "--config", os.path.abspath(self.mktemp()),
                         "init"])
        self.assertEqual((code, err.getvalue()),
                         (1, "popgate: no answer (end of input); nothing changed\n"))
        self.assertFalse(os.path.exists(self.data))

    def write(self, name: str, text: str) -> str:
        path = os.path.abspath(self.mktemp() + name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def make_pki(self):
        """A test PKI in a directory everyone may search (trial's temp parent is 0700)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(os.path.dirname(directory), 0o755)
        os.chmod(directory, 0o755)
        return make_test_pki(os.path.join(directory, "pki"))

    def test_config_example_prints_the_shipped_sample(self):
        code, out, _ = self.run_cli("config", "example")
        self.assertEqual(code, 0)
        with open(SAMPLE, encoding="utf-8") as f:
            self.assertEqual(out, f.read())

    def test_config_check_names_the_postmaster(self):
        self.run_cli("user", "add", "boss@example.org", "--password-stdin", "--scheme",
                     "PLAIN", stdin="pw\n")
        self.run_cli("user", "add", "alice@example.org", "--password-stdin", "--scheme",
                     "PLAIN", stdin="pw\n")
        code, out, err = self.run_cli("config", "check")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("\n# postmaster@<every local domain> goes to boss@example.org, the first "
                      f"user in {self.users_file},", out)

    def test_config_check_finds_what_start_up_would_not(self):
        self.run_cli("user", "add", "alice@example.org", "--password-stdin", "--scheme",
                     "PLAIN", stdin="pw\n")
        pki = self.make_pki()
        os.chmod(pki.key, 0o600)
        path = self.write(".toml", f"""
[smtp]
listen = ["tcp:2525:interface=127.0.0.1", "tcp:25:interface=192.0.2.1",
          "unix:/nonexistent/popgate/lmtp", "systemd:domain=INET6:name=smtp"]
[pop3]
listen = ["haproxy:tcp:1100:interface=198.51.100.7"]
[limits]
trusted_proxies = ["127.0.0.1"]
[tls]
certificate = "{pki.fullchain}"
key = "{pki.key}"
[aliases]
"info@example.org" = ["alice@example.org", "bob@example.org"]
"@example.org" = ["carol@example.org"]
""")
        code, out, err = self.run_cli("config", "check", "--config", path,
                                      "--server-user", "nobody")
        self.assertEqual(code, 1)
        owner = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        self.assertEqual(err.splitlines(), [
            "popgate: aliases.'info@example.org': alias target bob@example.org is not a user "
            "(mail for it would be skipped)",
            "popgate: aliases.'@example.org': catch-all target carol@example.org is not a "
            "user (mail for it would be skipped)",
            "popgate: smtp.listen: tcp:25:interface=192.0.2.1: 192.0.2.1 is not an address "
            "of this machine",
            "popgate: smtp.listen: unix:/nonexistent/popgate/lmtp: directory "
            "/nonexistent/popgate does not exist",
            "popgate: pop3.listen: haproxy:tcp:1100:interface=198.51.100.7: 198.51.100.7 is "
            "not an address of this machine",
            f"popgate: tls.key: {pki.key} (owner {owner}:{group}, mode 0600) is not readable "
            "by nobody, the user popgate runs as",
        ])
        self.assertIn("# file permissions checked for user nobody\n", out)

    def test_config_check_searches_the_directories_above(self):
        pki = self.make_pki()
        os.chmod(pki.key, 0o644)
        os.chmod(os.path.dirname(pki.key), 0o700)
        path = self.write(".toml", f'[tls]\ncertificate = "{pki.fullchain}"\n'
                                   f'key = "{pki.key}"\n')
        code, _, err = self.run_cli("config", "check", "--config", path,
                                    "--server-user", "nobody")
        self.assertEqual(code, 1)
        self.assertRegex(err, rf"^popgate: tls.certificate: {re.escape(os.path.dirname(pki.key))}"
                              r" \(owner \S+, mode 0700\) is not searchable by nobody")
        os.chmod(os.path.dirname(pki.key), 0o755)
        self.assertEqual(self.run_cli("config", "check", "--config", path,
                                      "--server-user", "nobody")[0], 0)

    def test_tls_selfsigned_san(self):
        cert, key = self.mktemp(), self.mktemp()
        code, out, _ = self.run_cli("tls", "selfsigned", "--hostname", "mail.lab.test",
                                    "--san", "pop.lab.test", "--san", "192.0.2.9",
                                    "--cert", cert, "--key", key)
        self.assertEqual(out, f"wrote {cert} and {key} for mail.lab.test, pop.lab.test, "
                              "192.0.2.9, localhost, 127.0.0.1\n")

    def test_init(self):
        config_path = os.path.abspath(self.mktemp())
        code, out, err = self.run_cli("--config", config_path, "init", "--user",
                                      "Boss@Example.org", "--hostname", "mail.example.org",
                                      "--password-stdin", "--scheme", "PLAIN",
                                      stdin="secret\n")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(f"wrote {config_path}\n"), out)
        self.assertIn(f"  popgate config check --config {config_path}\n", out)
        loaded = config.load(config_path)
        self.assertEqual((loaded.server.hostname, loaded.server.data_dir,
                          loaded.server.postmaster),
                         ("mail.example.org", self.data, "boss@example.org"))
        self.assertEqual(loaded.tls.certificate, os.path.join(self.data, "tls", "cert.pem"))
        self.assertTrue(verify_password(b"secret", UserDB(self.users_file)
                                        .get("boss@example.org").password))
        self.assertEqual(stat.S_IMODE(os.stat(self.data).st_mode), 0o700)
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        self.assertIn('\nhostname = "mail.example.org"\n', text)
        self.assertIn("\n# Host name used in the SMTP greeting", text)  # comments kept
        self.assertIn('\n#max_message_size = 26214400\n', text)
        sans = x509.load_pem_x509_certificate(read(loaded.tls.certificate)).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName),
                         ["mail.example.org", "localhost"])

        code, _, err = self.run_cli("--config", config_path, "init", "--user",
                                    "other@example.org", "--password-stdin", stdin="pw\n")
        self.assertEqual((code, err), (1, f"popgate: {config_path}: exists already; popgate "
                                          "init replaces nothing\n"))
        os.unlink(config_path)
        certificate = read(loaded.tls.certificate)
        code, _, err = self.run_cli("--config", config_path, "init", "--user",
                                    "other@example.org", "--password-stdin", stdin="pw\n")
        self.assertEqual((code, err), (1, f"popgate: {loaded.tls.certificate}: exists "
                                          "already; popgate init replaces nothing\n"))
        self.assertEqual(read(loaded.tls.certificate), certificate)
        self.assertFalse(os.path.exists(config_path))

    def test_init_unknown_owner(self):
        code, _, err = self.run_cli("--config", os.path.abspath(self.mktemp()), "init",
                                    "--user", "a@example.org", "--owner", "no-such-user-x",
                                    "--password-stdin", stdin="pw\n")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("popgate: no such user no-such-user-x; create it first: "
                                       "useradd --system"), err)
        self.assertFalse(os.path.exists(self.data))


class OwnershipTests(CLITests):
    """Run as root, ``popgate user add|del|passwd`` leave the file to the server's user."""

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            raise SkipTest("needs root: only root can give files to another user")
        self.nobody = pwd.getpwnam("nobody")

    def test_user_commands_keep_owner_group_and_mode(self):
        os.makedirs(self.data, mode=0o700)
        os.chown(self.data, self.nobody.pw_uid, self.nobody.pw_gid)
        self.run_cli("user", "add", "alice@example.org", "--password-stdin", "--scheme",
                     "PLAIN", stdin="pw\n")
        st = os.stat(self.users_file)
        # A new file takes its directory's owner and group.
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)),
                         (self.nobody.pw_uid, self.nobody.pw_gid, 0o600))
        os.chown(self.users_file, self.nobody.pw_uid, 0)
        os.chmod(self.users_file, 0o640)
        for argv in (["user", "add", "bob@example.org", "--password-stdin"],
                     ["user", "passwd", "bob@example.org", "--password-stdin"],
                     ["user", "del", "alice@example.org"]):
            code, _, err = self.run_cli(*argv, "--scheme", "PLAIN", stdin="pw\n") \
                if "--password-stdin" in argv else self.run_cli(*argv)
            self.assertEqual(code, 0, err)
            st = os.stat(self.users_file)
            self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)),
                             (self.nobody.pw_uid, 0, 0o640), argv)


class QueueCommandTests(TestCase):
    """popgate queue list | flush | remove, on the files the server's runner uses."""

    def setUp(self):
        from popgate.relay.queue import Envelope, Queue, QueuedRecipient

        self.data = os.path.abspath(self.mktemp())
        self.queue = Queue(os.path.join(self.data, "queue"))
        self.queue.prepare()
        envelope = Envelope("ABC123", "alice@example.org", "alice@example.org",
                            [QueuedRecipient("x@remote.test", "sent", "250 ok"),
                             QueuedRecipient("y@remote.test", "queued", "451 4.2.1 busy")],
                            created=time.time() - 7500, attempts=2,
                            last_error="451 4.2.1 busy")
        incoming = self.queue.new_message(envelope)
        incoming.write(b"Subject: x\n\nbody\n")
        incoming.commit()

    run_cli = CLITests.run_cli

    def test_list_shows_id_age_sender_recipients_attempts_and_last_error(self):
        code, out, err = self.run_cli("queue", "list")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines(), [
            "ID\tAGE\tSENDER\tRECIPIENTS\tATTEMPTS\tLAST ERROR",
            "ABC123\t2h05m\talice@example.org\tx@remote.test(sent),y@remote.test(queued)"
            "\t2\t451 4.2.1 busy"])
        self.assertEqual(err, "1 message queued\n")

    def test_flush_leaves_the_flag_the_runner_takes(self):
        code, out, _ = self.run_cli("queue", "flush")
        self.assertEqual(code, 0)
        self.assertTrue(self.queue.take_flush_request())

    def test_remove(self):
        self.assertEqual(self.run_cli("queue", "remove", "ABC123")[:2], (0, "removed ABC123\n"))
        self.assertEqual(self.queue.ids(), [])
        self.assertEqual(sorted(os.listdir(self.queue.directory)), ["lock", "tmp"])
        code, _, err = self.run_cli("queue", "remove", "ABC123")
        self.assertEqual((code, err), (1, "popgate: no queued message ABC123\n"))
        code, _, err = self.run_cli("queue", "remove", "../users")
        self.assertEqual((code, err), (1, "popgate: not a queue id: ../users\n"))
