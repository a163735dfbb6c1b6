"""The popgate admin command, as an administrator types it."""

import io
import os
import stat
import sys
import time

from twisted.trial.unittest import TestCase

from popgate import cli
from popgate.auth.users import UserDB, verify_password


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
