"""The popgate admin command, as an administrator types it."""

import errno
import io
import os
import stat
import sys

from twisted.trial.unittest import TestCase

from popgate import cli
from popgate.auth import users
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

    def test_full_disk_is_one_line(self):
        def full(path, data, mode=0o600):
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
