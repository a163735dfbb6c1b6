"""Tests for popgate.auth.users: password schemes, the passwd-file, the cred checker."""

import hashlib
import os
import stat

import bcrypt
from twisted.cred import error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.trial import unittest

from popgate.addresses import AddressError
from popgate.auth import users
from popgate.auth.users import (
    APOPCredentials,
    PasswordChecker,
    User,
    UserDB,
    UserError,
    UserFile,
    UsersUnavailable,
    hash_password,
    parse_line,
    split_scheme,
    verify_password,
)

_real_gensalt = bcrypt.gensalt


def cheap_bcrypt(password: bytes) -> str:
    """A BLF-CRYPT stored hash at the lowest cost, to keep the suite fast."""
    return "{BLF-CRYPT}" + bcrypt.hashpw(password, _real_gensalt(4)).decode("ascii")


def run_inline(f, *args):
    return defer.maybeDeferred(f, *args)


def logged_warnings(events) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") is not None
            and e["log_level"].name == "warn"]


class SchemeTests(unittest.TestCase):
    def test_argon2id(self):
        stored = hash_password("correct horse")
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"), stored)
        self.assertNotIn("correct horse", stored)
        self.assertTrue(verify_password(b"correct horse", stored))
        self.assertFalse(verify_password(b"correct horsf", stored))

    def test_argon2id_made_by_argon2_cffi_with_four_lanes(self):
        """Hashes made elsewhere (argon2-cffi's default p=4, a Dovecot users file) verify."""
        stored = ("{ARGON2ID}$argon2id$v=19$m=8192,t=1,p=4$wDfZkptTny11V+q1dAVqkg"
                  "$tsi/6B67MGjhyLAH3ca5rCZMzuN8DynGOhuNOQPFujs")
        self.assertTrue(verify_password(b"correct horse", stored))
        self.assertFalse(verify_password(b"correct horsf", stored))

    def test_older_argon2i_variant_verifies(self):
        stored = ("{ARGON2ID}$argon2i$v=19$m=8192,t=1,p=1$vtPQO+0XpqhMBN8aKpdGWg"
                  "$VHkDfp3SAvumrbRU9oYSenPRejTbn9TRRhWXaCf4A0o")
        self.assertTrue(verify_password(b"pw", stored))
        self.assertFalse(verify_password(b"px", stored))

    def test_argon2id_too_long_for_libsodium_is_refused_and_logged(self):
        stored = ("{ARGON2ID}$argon2id$v=19$m=8192,t=1,p=1$fQmyZSAHX71wrcfOKGqRIA$uclW7IEA0Xz"
                  "khFP2b/N5X4WxJvLM2BVBiFaVLRDzPRkoadJs2sOvceVwGsuWI2V9XMSbKNW1Y9EcN5KQ2eSEgg")
        with capturedLogs() as events:
            self.assertIs(verify_password(b"correct horse", stored), False)
        self.assertTrue(any("set that password again" in w for w in logged_warnings(events)))

    def test_blf_crypt(self):
        self.patch(bcrypt, "gensalt", lambda: _real_gensalt(4))
        stored = hash_password("s3cret", "BLF-CRYPT")
        self.assertTrue(stored.startswith("{BLF-CRYPT}$2"), stored)
        self.assertTrue(verify_password(b"s3cret", stored))
        self.assertFalse(verify_password(b"s3cres", stored))
        self.assertFalse(verify_password(b"", stored))

    def test_blf_crypt_dovecot_2y_prefix(self):
        """Dovecot's doveadm pw writes $2y$ bcrypt hashes; they must verify."""
        stored = cheap_bcrypt(b"pw").replace("$2b$", "$2y$")
        self.assertTrue(verify_password(b"pw", stored))
        self.assertFalse(verify_password(b"px", stored))

    def test_blf_crypt_72_byte_limit(self):
        self.patch(bcrypt, "gensalt", lambda: _real_gensalt(4))
        stored = hash_password("x" * 72, "BLF-CRYPT")
        self.assertTrue(verify_password(b"x" * 72, stored))
        with self.assertRaises(UserError) as caught:
            hash_password("x" * 73, "BLF-CRYPT")
        self.assertIn("72 bytes", str(caught.exception))
        # The limit is in bytes: 37 two-byte characters are 74 bytes.
        self.assertRaises(UserError, hash_password, "\u00e9" * 37, "BLF-CRYPT")
        # A longer password never matches (bcrypt would ignore or refuse the excess), and
        # it is the user's mistake, not a damaged hash: nothing alarming is logged.
        with capturedLogs() as events:
            self.assertFalse(verify_password(b"x" * 73, stored))
            self.assertFalse(verify_password(b"x" * 72 + b"y", stored))
        self.assertEqual(logged_warnings(events), [])

    def test_plain(self):
        stored = hash_password("pa$$ w\u00f6rd", "PLAIN")
        self.assertEqual(stored, "{PLAIN}pa$$ w\u00f6rd")
        self.assertTrue(verify_password("pa$$ w\u00f6rd".encode(), stored))
        self.assertFalse(verify_password(b"pa$$ word", stored))
        self.assertFalse(verify_password(b"pa$$ w\xc3\xb6rd ", stored))

    def test_clear_alias(self):
        self.assertTrue(verify_password(b"secret", "{CLEAR}secret"))
        self.assertFalse(verify_password(b"Secret", "{CLEAR}secret"))
        self.assertEqual(split_scheme("{CLEAR}x"), ("PLAIN", "x"))

    def test_scheme_name_case_insensitive(self):
        self.assertTrue(verify_password(b"secret", "{plain}secret"))
        self.assertEqual(split_scheme("{blf-crypt}$2b$"), ("BLF-CRYPT", "$2b$"))

    def test_empty_stored_password_never_matches(self):
        """A line with no password is a disabled account, not an empty password."""
        self.assertFalse(verify_password(b"", "{PLAIN}"))
        self.assertFalse(verify_password(b"", ""))
        self.assertFalse(verify_password(b"x", ""))

    def test_unknown_scheme(self):
        with capturedLogs() as events:
            self.assertFalse(verify_password(b"secret", "{SHA512-CRYPT}$6$abc$def"))
            self.assertFalse(verify_password(b"secret", "{MD5}secret"))
        self.assertTrue(any("SHA512-CRYPT" in w for w in logged_warnings(events)))

    def test_hash_unknown_scheme_refused(self):
        with self.assertRaises(UserError) as caught:
            hash_password("x", "MD5")
        self.assertIn("unknown password scheme 'MD5'", str(caught.exception))
        self.assertIn("ARGON2ID", str(caught.exception))

    def test_malformed_hashes_are_false_not_errors(self):
        malformed = [
            "{ARGON2ID}",
            "{ARGON2ID}garbage",
            "{ARGON2ID}$argon2id$",
            "{ARGON2ID}\u00fc\u00fc\u00fc",
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$",
            "{ARGON2ID}\0",
            "{BLF-CRYPT}",
            "{BLF-CRYPT}garbage",
            "{BLF-CRYPT}$2b$12$short",
            "{BLF-CRYPT}\u00fc\u00fc\u00fc",
        ]
        with capturedLogs() as events:
            for stored in malformed:
                self.assertIs(verify_password(b"password", stored), False, stored)
        self.assertTrue(any("malformed ARGON2ID" in w for w in logged_warnings(events)))
        self.assertTrue(any("malformed BLF-CRYPT" in w for w in logged_warnings(events)))


class ParseLineTests(unittest.TestCase):
    def test_fields(self):
        user = parse_line("Alice@Example.org:{PLAIN}pw:1000:1000::/home/alice::userdb_x=1")
        self.assertEqual(user, User("alice@example.org", "{PLAIN}pw",
                                    "1000:1000::/home/alice::userdb_x=1"))
        self.assertEqual(user.local, "alice")
        self.assertEqual(user.domain, "example.org")
        self.assertEqual(user.line(),
                         "alice@example.org:{PLAIN}pw:1000:1000::/home/alice::userdb_x=1")

    def test_comments_and_blank(self):
        self.assertIsNone(parse_line(""))
        self.assertIsNone(parse_line("   "))
        self.assertIsNone(parse_line("# alice@example.org:{PLAIN}pw"))
        self.assertIsNone(parse_line("  # indented comment"))

    def test_bad_name(self):
        self.assertRaises(AddressError, parse_line, "../x@a.b:{PLAIN}pw")


class UserFileTests(unittest.TestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "users")
        self.file = UserFile(self.path)

    def write(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)

    def read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def assertNoTempFiles(self):
        self.assertEqual(sorted(os.listdir(self.directory)), ["users", "users.lock"])

    def test_add_creates_file_0600(self):
        user = self.file.add("Alice@Example.org", "{PLAIN}pw")
        self.assertEqual(user.name, "alice@example.org")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}pw\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertNoTempFiles()

    def test_add_creates_missing_directory(self):
        path = os.path.join(self.mktemp(), "sub", "users")
        UserFile(path).add("alice@example.org", "{PLAIN}pw")
        self.assertEqual(UserDB(path).get("alice@example.org").password, "{PLAIN}pw")

    def test_rewrite_keeps_owner_and_group_mode_but_never_others(self):
        self.write("bob@example.org:{PLAIN}x\n")
        os.chmod(self.path, 0o644)
        self.file.add("alice@example.org", "{PLAIN}pw")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        os.chmod(self.path, 0o660)
        self.file.delete("alice@example.org")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)

    def test_add_bad_name_refused(self):
        self.assertRaises(AddressError, self.file.add, "../x@a.b", "{PLAIN}pw")
        self.assertFalse(os.path.exists(self.path))

    def test_duplicate_add_refused(self):
        self.file.add("alice@example.org", "{PLAIN}one")
        with self.assertRaises(UserError) as caught:
            self.file.add("ALICE@example.org", "{PLAIN}two")
        self.assertEqual(str(caught.exception), "user alice@example.org already exists")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}one\n")
        self.assertNoTempFiles()

    def test_trailing_fields_comments_and_blank_lines_kept(self):
        original = (
            "# popgate users\n"
            "\n"
            "alice@example.org:{PLAIN}old:1000:1000::/home/alice::userdb_quota_rule=*:10M\n"
            "  # an indented comment\n"
            "bob@example.org:{PLAIN}bob:1001:1001\n"
            "\n"
        )
        self.write(original)
        self.file.add("carol@example.org", "{PLAIN}carol")
        self.assertEqual(self.read(), original + "carol@example.org:{PLAIN}carol\n")

        self.file.set_password("Alice@Example.org", "{PLAIN}new")
        after_passwd = original.replace("{PLAIN}old:", "{PLAIN}new:")
        self.assertEqual(self.read(), after_passwd + "carol@example.org:{PLAIN}carol\n")

        self.file.delete("bob@example.org")
        self.assertEqual(
            self.read(),
            after_passwd.replace("bob@example.org:{PLAIN}bob:1001:1001\n", "")
            + "carol@example.org:{PLAIN}carol\n")
        self.assertNoTempFiles()

    def test_unusual_characters_in_fields_survive_a_rewrite(self):
        """Only a newline ends a line: a form feed or U+2028 inside a field does not."""
        line = "alice@example.org:{PLAIN}pw:::Alice\u2028Smith\x0c\x85:/home/alice"
        self.write(line + "\n")
        self.file.add("bob@example.org", "{PLAIN}x")
        self.assertEqual(self.read(), line + "\nbob@example.org:{PLAIN}x\n")
        self.assertEqual(UserDB(self.path).get("alice@example.org").extra,
                         "::Alice\u2028Smith\x0c\x85:/home/alice")

    def test_file_without_final_newline(self):
        self.write("alice@example.org:{PLAIN}a")
        self.file.add("bob@example.org", "{PLAIN}b")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\nbob@example.org:{PLAIN}b\n")

    def test_password_that_would_break_the_line_refused(self):
        self.write("alice@example.org:{PLAIN}a\n")
        for bad in ["{PLAIN}pa:ss", "{PLAIN}x\nmallory@example.org:{PLAIN}y", "{PLAIN}x\ry"]:
            with self.assertRaises(UserError) as caught:
                self.file.add("bob@example.org", bad)
            self.assertIn("':'", str(caught.exception))
            self.assertRaises(UserError, self.file.set_password, "alice@example.org", bad)
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\n")

    def test_passwd_unknown_user(self):
        self.write("alice@example.org:{PLAIN}a\n")
        with self.assertRaises(UserError) as caught:
            self.file.set_password("bob@example.org", "{PLAIN}b")
        self.assertEqual(str(caught.exception), "no such user bob@example.org")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\n")

    def test_delete_unknown_user(self):
        self.write("alice@example.org:{PLAIN}a\n")
        with self.assertRaises(UserError) as caught:
            self.file.delete("Bob@example.org")
        self.assertEqual(str(caught.exception), "no such user bob@example.org")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\n")

    def test_delete_on_missing_file(self):
        self.assertRaises(UserError, self.file.delete, "bob@example.org")

    def test_delete_case_insensitive(self):
        self.write("Alice@Example.org:{PLAIN}a\nbob@example.org:{PLAIN}b\n")
        self.file.delete("ALICE@EXAMPLE.ORG")
        self.assertEqual(self.read(), "bob@example.org:{PLAIN}b\n")

    def test_bad_lines_kept_and_not_matched(self):
        self.write("../x@a.b:{PLAIN}x\nalice@example.org:{PLAIN}a\n")
        self.file.delete("alice@example.org")
        self.assertEqual(self.read(), "../x@a.b:{PLAIN}x\n")

    def test_failed_write_keeps_old_file(self):
        self.write("alice@example.org:{PLAIN}a\n")
        os.chmod(self.path, 0o600)

        def broken_fsync(fd):
            raise OSError(5, "Input/output error")

        self.patch(os, "fsync", broken_fsync)
        self.assertRaises(OSError, self.file.add, "bob@example.org", "{PLAIN}b")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\n")
        self.assertNoTempFiles()

    def test_failed_rename_keeps_old_file(self):
        self.write("alice@example.org:{PLAIN}a\n")

        def broken_replace(src, dst):
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", broken_replace)
        self.assertRaises(OSError, self.file.delete, "alice@example.org")
        self.assertEqual(self.read(), "alice@example.org:{PLAIN}a\n")
        self.assertNoTempFiles()

    def test_write_is_a_rename(self):
        """Readers that opened the old file keep reading the old contents (no truncation)."""
        self.write("alice@example.org:{PLAIN}a\n")
        with open(self.path, encoding="utf-8") as reader:
            self.file.add("bob@example.org", "{PLAIN}b")
            self.assertEqual(reader.read(), "alice@example.org:{PLAIN}a\n")


class UserDBTests(unittest.TestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "users")
        self.clock = Clock()
        self.db = UserDB(self.path, clock=self.clock.seconds)

    def test_missing_file(self):
        self.assertIsNone(self.db.get("alice@example.org"))
        self.assertEqual(self.db.domains(), frozenset())
        self.assertEqual(self.db.users(), [])

    def test_lookup_case_insensitive(self):
        UserFile(self.path).add("alice@example.org", "{PLAIN}a")
        self.assertEqual(self.db.get("ALICE@Example.ORG").name, "alice@example.org")

    def test_sees_changes_without_restart(self):
        writer = UserFile(self.path)
        self.assertIsNone(self.db.get("alice@example.org"))
        # A new user or domain is a miss in the cached table: seen at once.
        writer.add("alice@example.org", "{PLAIN}a")
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}a")
        self.assertEqual(self.db.domains(), frozenset({"example.org"}))
        writer.add("bob@other.example", "{PLAIN}bb")
        self.assertTrue(self.db.has_domain("other.example"))
        self.assertEqual(self.db.domains(), frozenset({"example.org", "other.example"}))
        # Changes to known users are seen within a second.
        writer.set_password("alice@example.org", "{PLAIN}a-changed")
        self.clock.advance(1)
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}a-changed")
        writer.delete("alice@example.org")
        self.clock.advance(1)
        self.assertIsNone(self.db.get("alice@example.org"))
        self.assertEqual([u.name for u in self.db.users()], ["bob@other.example"])
        self.assertEqual(self.db.domains(), frozenset({"other.example"}))
        self.assertFalse(self.db.has_domain("example.org"))

    def test_file_looked_at_at_most_once_a_second(self):
        """A hit does not stat the file again within a second (one per RCPT showed in
        profiles); a changed password is served stale for at most that second."""
        writer = UserFile(self.path)
        writer.add("alice@example.org", "{PLAIN}a")
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}a")
        stats = []
        real_stat = os.stat
        self.patch(users.os, "stat", lambda path: stats.append(path) or real_stat(path))
        writer.set_password("alice@example.org", "{PLAIN}b")
        stats.clear()
        self.clock.advance(0.9)
        for _ in range(3):
            self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}a")
            self.assertTrue(self.db.has_domain("example.org"))
        self.assertEqual(stats, [])
        self.clock.advance(0.1)
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}b")
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}b")
        self.assertEqual(stats, [self.path])

    def test_miss_looks_again_at_once(self):
        UserFile(self.path).add("alice@example.org", "{PLAIN}a")
        self.assertIsNotNone(self.db.get("alice@example.org"))
        stats = []
        real_stat = os.stat
        self.patch(users.os, "stat", lambda path: stats.append(path) or real_stat(path))
        self.assertIsNone(self.db.get("nobody@example.org"))
        self.assertFalse(self.db.has_domain("other.example"))
        self.assertEqual(stats, [self.path, self.path])

    def test_file_briefly_missing_keeps_users_then_rereads(self):
        """A users file that vanishes (an editor's rename, a restore) must not make every
        recipient unknown: the last table stays, with one warning, until it is back."""
        UserFile(self.path).add("alice@example.org", "{PLAIN}a")
        self.assertIsNotNone(self.db.get("alice@example.org"))
        os.unlink(self.path)
        warnings = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        for _ in range(3):
            self.clock.advance(1)
            self.assertIsNotNone(self.db.get("alice@example.org"))
        self.assertEqual(len([e for e in warnings if "disappeared" in formatEvent(e)]), 1)
        UserFile(self.path).add("bob@example.org", "{PLAIN}b")
        self.clock.advance(1)
        self.assertIsNone(self.db.get("alice@example.org"))
        self.assertIsNotNone(self.db.get("bob@example.org"))

    def test_no_file_yet_means_no_users(self):
        self.assertIsNone(self.db.get("alice@example.org"))

    def test_users_sorted(self):
        with open(self.path, "w") as f:
            f.write("carol@example.org:{PLAIN}c\nalice@example.org:{PLAIN}a\n")
        self.assertEqual([u.name for u in self.db.users()],
                         ["alice@example.org", "carol@example.org"])

    def test_bad_names_skipped_with_warning(self):
        with open(self.path, "w") as f:
            f.write("# comment\n"
                    "../x@a.b:{PLAIN}x\n"
                    "alice@example.org:{PLAIN}a\n"
                    "bob+tag@example.org:{PLAIN}b\n"
                    "a/b@example.org:{PLAIN}c\n")
        with capturedLogs() as events:
            self.assertEqual([u.name for u in self.db.users()], ["alice@example.org"])
        found = logged_warnings(events)
        self.assertEqual(len(found), 3, found)
        self.assertIn(f"{self.path}:2: ignoring bad user name", found[0])
        self.assertIn("'../x'", found[0])
        self.assertIn(f"{self.path}:4:", found[1])
        self.assertIn(f"{self.path}:5:", found[2])
        self.assertIsNone(self.db.get("../x@a.b"))

    def test_crlf_file(self):
        with open(self.path, "wb") as f:
            f.write(b"alice@example.org:{PLAIN}a\r\nbob@example.org:{PLAIN}b:1000\r\n")
        self.assertEqual(self.db.get("alice@example.org").password, "{PLAIN}a")
        self.assertEqual(self.db.get("bob@example.org").extra, "1000")


class PasswordCheckerTests(unittest.TestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "users")
        with open(self.path, "w") as f:
            f.write("alice@example.org:{PLAIN}alice-pw:1000:1000\n"
                    f"bob@example.org:{cheap_bcrypt(b'bob-pw')}\n"
                    "nopass@example.org\n"
                    "empty@example.org:{PLAIN}\n")
        self.thread_calls = []
        self.verifications = []
        real_verify = users.verify_password

        def counting_verify(password, stored):
            self.verifications.append(users.split_scheme(stored)[0])
            return real_verify(password, stored)

        self.patch(users, "verify_password", counting_verify)

        def run_in_thread(f, *args):
            self.thread_calls.append(f)
            return defer.maybeDeferred(f, *args)

        self.checker = PasswordChecker(UserDB(self.path), run_in_thread)

    def login(self, username, password):
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def assertRefused(self, d):
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_right_password(self):
        self.assertEqual(self.successResultOf(self.login(b"alice@example.org", b"alice-pw")),
                         "alice@example.org")
        self.assertEqual(self.successResultOf(self.login(b"bob@example.org", b"bob-pw")),
                         "bob@example.org")
        self.assertEqual(self.verifications, ["PLAIN", "BLF-CRYPT"])
        self.assertEqual(len(self.thread_calls), 2)

    def test_username_case_insensitive(self):
        self.assertEqual(self.successResultOf(self.login(b"Alice@EXAMPLE.org", b"alice-pw")),
                         "alice@example.org")

    def test_str_credentials(self):
        self.assertEqual(self.successResultOf(self.login("alice@example.org", "alice-pw")),
                         "alice@example.org")

    def test_wrong_password(self):
        self.assertRefused(self.login(b"alice@example.org", b"alice-PW"))
        self.assertRefused(self.login(b"bob@example.org", b"alice-pw"))
        self.assertRefused(self.login(b"alice@example.org", b""))

    def test_password_is_case_sensitive(self):
        self.assertRefused(self.login(b"bob@example.org", b"BOB-PW"))

    def test_unknown_user_costs_a_verification(self):
        """An unknown user runs one real (dummy) verification in the thread, like a wrong
        password does, so the two cannot be told apart by timing."""
        self.assertRefused(self.login(b"alice@example.org", b"wrong"))
        wrong_threads, wrong_verifications = len(self.thread_calls), len(self.verifications)
        self.assertEqual((wrong_threads, wrong_verifications), (1, 1))
        del self.thread_calls[:], self.verifications[:]

        self.assertRefused(self.login(b"nobody@example.org", b"wrong"))
        self.assertEqual(len(self.thread_calls), wrong_threads)
        self.assertEqual(len(self.verifications), wrong_verifications)
        # The dummy is a real hash of the default scheme, not a shortcut.
        self.assertEqual(self.verifications, [users.DEFAULT_SCHEME])

        # Invalid names (that can never be users) take the same path.
        del self.thread_calls[:], self.verifications[:]
        self.assertRefused(self.login(b"../etc/passwd", b"x"))
        self.assertRefused(self.login(b"\xff\xfe@example.org", b"x"))
        self.assertEqual(len(self.thread_calls), 2)
        self.assertEqual(self.verifications, [users.DEFAULT_SCHEME] * 2)

    def test_dummy_hash_made_in_the_thread(self):
        """The dummy hash (an argon2 hash, ~0.1 s) is not computed on the reactor thread."""
        deferred_work = []

        def queue(f, *args):
            deferred_work.append((f, args))
            return defer.Deferred()

        checker = PasswordChecker(UserDB(self.path), queue)
        hashed = []
        real_hash = users.hash_password
        self.patch(users, "hash_password", lambda *a: hashed.append(a) or real_hash(*a))
        d = checker.requestAvatarId(UsernamePassword(b"nobody@example.org", b"x"))
        self.assertEqual(hashed, [])  # nothing slow happened on the calling thread
        self.assertNoResult(d)
        f, args = deferred_work[0]
        self.assertIs(f(*args), False)
        self.assertEqual(len(hashed), 1)

    def test_unknown_user_never_accepted(self):
        """Even if the dummy verification succeeded, an unknown user gets no avatar."""
        self.patch(users, "verify_password", lambda password, stored: True)
        self.assertRefused(self.login(b"nobody@example.org", b"anything"))
        self.assertEqual(self.successResultOf(self.login(b"alice@example.org", b"anything")),
                         "alice@example.org")

    def test_empty_password_field_is_no_password(self):
        self.assertRefused(self.login(b"nopass@example.org", b""))
        self.assertRefused(self.login(b"empty@example.org", b""))

    def test_sees_new_user(self):
        self.assertRefused(self.login(b"carol@example.org", b"carol-pw"))
        UserFile(self.path).add("carol@example.org", "{PLAIN}carol-pw")
        self.assertEqual(self.successResultOf(self.login(b"carol@example.org", b"carol-pw")),
                         "carol@example.org")


class APOPTests(unittest.TestCase):
    TIMESTAMP = b"<1896.697170952@pop.example.org>"

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "users")
        with open(path, "w") as f:
            f.write("alice@example.org:{PLAIN}tanstaaf\n"
                    f"bob@example.org:{cheap_bcrypt(b'tanstaaf')}\n"
                    "empty@example.org:{PLAIN}\n")
        self.db = UserDB(path)
        self.checker = PasswordChecker(self.db, run_inline)

    def apop(self, username, secret, timestamp=TIMESTAMP):
        digest = hashlib.md5(timestamp + secret).hexdigest().encode("ascii")
        return APOPCredentials(username, self.TIMESTAMP, digest)

    def test_rfc1939_example(self):
        credentials = APOPCredentials("mrose", b"<1896.697170952@dbc.mtview.ca.us>",
                                      b"c4c9334bac560ecc979e58001b3e22fb")
        self.assertTrue(credentials.checkPassword(b"tanstaaf"))
        self.assertFalse(credentials.checkPassword(b"tanstaag"))

    def test_plain_user(self):
        d = self.checker.requestAvatarId(self.apop("Alice@Example.org", b"tanstaaf"))
        self.assertEqual(self.successResultOf(d), "alice@example.org")

    def test_uppercase_digest(self):
        digest = hashlib.md5(self.TIMESTAMP + b"tanstaaf").hexdigest().upper().encode()
        d = self.checker.requestAvatarId(
            APOPCredentials("alice@example.org", self.TIMESTAMP, digest))
        self.assertEqual(self.successResultOf(d), "alice@example.org")

    def test_wrong_secret(self):
        d = self.checker.requestAvatarId(self.apop("alice@example.org", b"tanstaag"))
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_other_timestamp(self):
        d = self.checker.requestAvatarId(
            self.apop("alice@example.org", b"tanstaaf", timestamp=b"<1.2@pop.example.org>"))
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_hashed_user_cannot_use_apop(self):
        d = self.checker.requestAvatarId(self.apop("bob@example.org", b"tanstaaf"))
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_stored_hash_is_not_an_apop_secret(self):
        """Someone who read the users file cannot log in with a hash as the APOP secret."""
        stored = self.db.get("bob@example.org").password
        for secret in (stored, users.split_scheme(stored)[1]):
            d = self.checker.requestAvatarId(self.apop("bob@example.org", secret.encode()))
            self.failureResultOf(d, error.UnauthorizedLogin)

    def test_unknown_user(self):
        d = self.checker.requestAvatarId(self.apop("nobody@example.org", b"tanstaaf"))
        self.failureResultOf(d, error.UnauthorizedLogin)
        d = self.checker.requestAvatarId(self.apop("../x", b"tanstaaf"))
        self.failureResultOf(d, error.UnauthorizedLogin)

    def test_empty_secret_is_not_a_secret(self):
        """MD5(timestamp) alone is public: an account with no password must not open."""
        d = self.checker.requestAvatarId(self.apop("empty@example.org", b""))
        self.failureResultOf(d, error.UnauthorizedLogin)


class UsersFileFaultTests(unittest.TestCase):
    """Issue 12: a users file that cannot serve never makes every recipient unknown."""

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "users")
        self.clock = Clock()
        self.db = UserDB(self.path, clock=self.clock.seconds, fault_log_interval=60)

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)

    def errors(self, events) -> list[str]:
        return [formatEvent(e) for e in events if e.get("log_level") is not None
                and e["log_level"].name == "error"]

    def assert_keeps_alice(self, spoil, problem: str) -> None:
        self.write(b"alice@example.org:{PLAIN}a\n")
        self.assertIsNotNone(self.db.get("alice@example.org"))
        spoil()
        with capturedLogs() as events:
            for _ in range(5):
                self.clock.advance(1)
                self.assertIsNotNone(self.db.get("alice@example.org"))
                self.assertIsNone(self.db.get("nobody@example.org"))
                self.assertTrue(self.db.has_domain("example.org"))
        [line] = self.errors(events)
        self.assertIn(self.path, line)
        self.assertIn(problem, line)
        self.assertIn("keeping the 1 users loaded before", line)
        with capturedLogs() as events:
            self.clock.advance(60)
            self.db.get("alice@example.org")
        self.assertEqual(len(self.errors(events)), 1, "repeated at a bounded rate")
        self.assertFalse(any(e.get("log_failure") for e in events), "no traceback")

    def test_emptied_in_place(self):
        self.assert_keeps_alice(lambda: self.write(b""), "is empty")

    def test_garbage(self):
        self.assert_keeps_alice(lambda: self.write(b"\x89PNG\r\n\x1a\n\0\0\0"), "NUL")

    def test_no_valid_line(self):
        self.assert_keeps_alice(lambda: self.write(b"hello world\nfoo\n"),
                                "has no valid user line (line 1:")

    def test_replaced_by_a_directory(self):
        def spoil():
            os.unlink(self.path)
            os.mkdir(self.path)
        self.assert_keeps_alice(spoil, "cannot be read: Is a directory")

    def test_unreadable(self):
        def spoil():
            os.chmod(self.path, 0)
            users.open = _denied  # root reads a mode 000 file: deny as for anyone else
            self.addCleanup(delattr, users, "open")

        self.assert_keeps_alice(spoil, "cannot be read: Permission denied")

    def test_fixed_file_is_used_again(self):
        self.write(b"alice@example.org:{PLAIN}a\n")
        self.db.get("alice@example.org")
        self.write(b"")
        self.clock.advance(1)
        self.db.get("alice@example.org")
        self.write(b"bob@example.org:{PLAIN}b\n")
        self.clock.advance(1)
        self.assertIsNone(self.db.get("alice@example.org"))
        self.assertIsNotNone(self.db.get("bob@example.org"))

    def test_never_loaded_is_unavailable_not_unknown(self):
        self.write(b"")
        with capturedLogs() as events:
            self.assertRaises(UsersUnavailable, self.db.get, "alice@example.org")
            self.assertRaises(UsersUnavailable, self.db.has_domain, "example.org")
        [line] = self.errors(events)
        self.assertIn("no users are loaded: mail and logins get temporary errors", line)
        self.write(b"alice@example.org:{PLAIN}a\n")
        self.assertIsNotNone(self.db.get("alice@example.org"))

    def test_comments_only_is_no_users_on_purpose(self):
        UserFile(self.path).add("alice@example.org", "{PLAIN}a")
        UserFile(self.path).delete("alice@example.org")
        self.assertIsNone(self.db.get("alice@example.org"))
        UserFile(self.path).add("bob@example.org", "{PLAIN}b")
        with open(self.path) as f:
            self.assertEqual(f.read(), "bob@example.org:{PLAIN}b\n")

    def test_checker_reports_unavailable(self):
        self.write(b"\0")
        checker = PasswordChecker(self.db, run_inline)
        d = checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"a"))
        self.failureResultOf(d, UsersUnavailable)


def _denied(*args, **kwargs):
    """``open`` as for a non-root user on a mode 000 file (root reads any file)."""
    raise PermissionError(13, "Permission denied", args[0])
