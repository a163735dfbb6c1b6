"""Tests for popgate.store.maildir: delivery, listing, UIDLs, removal, locking, clean-up."""

import builtins
import os
import re
import select
import stat
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

from twisted.trial import unittest

from popgate.auth.users import User
from popgate.codec import DotEncoder
from popgate.store import maildir as maildir_module
from popgate.store.maildir import (
    LOCK_NAME,
    SETTLED,
    STALE_TMP_AGE,
    ListingBudget,
    MailboxLocked,
    Maildir,
    MaildirStore,
    MessageInfo,
    commit,
    crlf_size,
    make_uidl,
)

ALICE = User("alice@example.org", "{PLAIN}x")
BOB = User("bob@example.net", "{PLAIN}y")


def sent_octets(content: bytes) -> int:
    """What POP3 RETR sends for ``content`` before dot-stuffing and the final ``.CRLF``:
    the number LIST must report."""
    encoder = DotEncoder()
    body = encoder.encode(content)
    tail = encoder.finish()
    if tail.endswith(b"\r\n.\r\n"):  # a CRLF added to end the last line: the client
        body += tail[:-3]              # cannot tell it from the message's own (issue 12)
    else:
        assert tail == b".\r\n", tail
    # Undo the dot-stuffing, which LIST does not count (RFC 1939 §11 sizes).
    stuffed = body.startswith(b"..") + body.count(b"\r\n..")
    return len(body) - stuffed


class StoreTestCase(unittest.TestCase):
    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root, mode=0o700)
        self.store = MaildirStore(self.root, "mx.example.org")
        self.maildir = self.store.maildir(ALICE)

    def deliver(self, content: bytes, maildir: Maildir | None = None, chunks: int = 1):
        message = self.store.new_message(maildir or self.maildir)
        step = max(1, len(content) // chunks)
        for i in range(0, len(content), step):
            message.write(content[i:i + step])
        commit([message])
        return message

    def listing(self, sub: str, maildir: Maildir | None = None) -> list[str]:
        return sorted(os.listdir(os.path.join((maildir or self.maildir).path, sub)))

    def put_foreign(self, name: str | bytes, content: bytes, sub: str = "new") -> str:
        directory = os.path.join(self.maildir.path, sub)
        if isinstance(name, bytes):
            directory = os.fsencode(directory)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(content)
        return os.fsdecode(path)


class LayoutTests(StoreTestCase):
    def test_path_from_user_record(self):
        self.assertEqual(self.maildir.path,
                         os.path.join(self.root, "example.org", "alice", "Maildir"))

    def test_directories_0700(self):
        for sub in ("tmp", "new", "cur"):
            mode = os.stat(os.path.join(self.maildir.path, sub)).st_mode
            self.assertTrue(stat.S_ISDIR(mode))
            self.assertEqual(stat.S_IMODE(mode), 0o700, sub)

    def test_same_maildir_object(self):
        self.assertIs(self.store.maildir(ALICE), self.maildir)
        self.assertIsNot(self.store.maildir(BOB), self.maildir)

    def test_create_is_idempotent(self):
        self.deliver(b"x\n")
        self.maildir.create()
        self.assertEqual(len(self.maildir.scan()), 1)

    def test_scan_missing_directories(self):
        self.assertEqual(Maildir(os.path.join(self.root, "nowhere")).scan(), [])


class DeliveryTests(StoreTestCase):
    def test_one_file_in_new_with_sizes(self):
        content = b"Subject: hi\n\nline one\nline two\n"
        message = self.deliver(content, chunks=3)
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("cur"), [])
        [name] = self.listing("new")
        lines = content.count(b"\n")
        self.assertRegex(name, r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]{16}\.mx\.example\.org,S=\d+,W=\d+$")
        self.assertTrue(name.endswith(f",S={len(content)},W={len(content) + lines}"), name)
        self.assertEqual(message.final_path, os.path.join(self.maildir.path, "new", name))
        with open(message.final_path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_empty_message(self):
        self.deliver(b"")
        [name] = self.listing("new")
        self.assertTrue(name.endswith(",S=0,W=0"), name)
        [info] = self.maildir.scan()
        self.assertEqual(info.octets, 0)

    def test_unique_names(self):
        for _ in range(20):
            self.deliver(b"x\n")
        self.assertEqual(len(set(self.listing("new"))), 20)
        self.assertEqual(len({m.uidl for m in self.maildir.scan()}), 20)

    def test_hostname_cannot_break_the_name(self):
        store = MaildirStore(self.root, "evil/../host:2,T")
        message = store.new_message(self.maildir)
        message.write(b"x\n")
        commit([message])
        [name] = self.listing("new")
        self.assertNotIn("/", name)
        self.assertNotIn(":", name)
        [info] = self.maildir.scan()
        self.assertFalse(info.seen)
        self.assertEqual(info.octets, 3)

    def test_commit_several_maildirs(self):
        other = self.store.maildir(BOB)
        messages = []
        for maildir in (self.maildir, other):
            message = self.store.new_message(maildir)
            message.write(b"to both\n")
            messages.append(message)
        commit(messages)
        for maildir in (self.maildir, other):
            self.assertEqual(len(self.listing("new", maildir)), 1)
            self.assertEqual(self.listing("tmp", maildir), [])

    def test_uncommitted_message_invisible(self):
        """A crash after writing, before commit: nothing in new/, the file stays in tmp/."""
        message = self.store.new_message(self.maildir)
        message.write(b"Subject: half\n\nwritten\n")
        message.flush()
        self.assertEqual(self.maildir.scan(), [])
        self.assertEqual(self.listing("new"), [])
        self.assertEqual(self.listing("tmp"), [message.unique])
        # Another process (after a restart) still does not see it.
        self.assertEqual(Maildir(self.maildir.path).scan(), [])
        message.abort()

    def test_abort_removes_tmp(self):
        message = self.store.new_message(self.maildir)
        message.write(b"never mind\n")
        message.abort()
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("new"), [])
        message.abort()  # twice is harmless

    def test_commit_failure_rename(self):
        def broken_rename(src, dst):
            raise OSError(28, "No space left on device")

        message = self.store.new_message(self.maildir)
        message.write(b"x\n")
        self.patch(os, "rename", broken_rename)
        self.assertRaises(OSError, commit, [message])
        self.assertEqual(self.listing("new"), [])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.maildir.scan(), [])

    def test_commit_failure_fsync(self):
        def broken_fsync(fd):
            raise OSError(5, "Input/output error")

        message = self.store.new_message(self.maildir)
        message.write(b"x\n")
        self.patch(os, "fsync", broken_fsync)
        self.assertRaises(OSError, commit, [message])
        self.assertEqual(self.listing("new"), [])
        self.assertEqual(self.listing("tmp"), [])


class ScanTests(StoreTestCase):
    def test_delivery_order_and_octets(self):
        contents = [b"first\n", b"second\nwith two lines\n", b"", b"x" * 5000 + b"\n\n"]
        messages = [self.deliver(c) for c in contents]
        infos = self.maildir.scan()
        self.assertEqual([i.uidl for i in infos], [m.unique for m in messages])
        self.assertEqual([i.octets for i in infos],
                         [len(c.replace(b"\n", b"\r\n")) for c in contents])
        self.assertEqual([i.octets for i in infos], [sent_octets(c) for c in contents])
        self.assertEqual([i.path for i in infos], [m.final_path for m in messages])
        self.assertEqual([i.seen for i in infos], [False] * 4)

    def test_delivery_order_within_one_clock_tick(self):
        """A coarse clock gives several deliveries the same <secs>.M<usecs>."""
        self.patch(maildir_module, "time", SimpleNamespace(time=lambda: 1700000000.25))
        messages = [self.deliver(b"%d\n" % i) for i in range(12)]
        self.assertEqual([i.uidl for i in self.maildir.scan()], [m.unique for m in messages])

    def test_order_by_time_not_name(self):
        # 999999999 sorts after 1000000000 as text, but is earlier.
        later = self.put_foreign("1000000000.M5P1Q1R0.host,S=2,W=3", b"b\n")
        earlier = self.put_foreign("999999999.M5P1Q1R0.host,S=2,W=3", b"a\n")
        same_second = self.put_foreign("1000000000.M40P1Q1R0.host,S=2,W=3", b"c\n")
        self.assertEqual([i.path for i in self.maildir.scan()], [earlier, later, same_second])

    def test_new_and_cur_merged_in_order(self):
        messages = [self.deliver(b"%d\n" % i) for i in range(4)]
        self.maildir.mark_seen([self.maildir.scan()[1], self.maildir.scan()[3]])
        infos = self.maildir.scan()
        self.assertEqual([i.uidl for i in infos], [m.unique for m in messages])
        self.assertEqual([i.seen for i in infos], [False, True, False, True])

    def test_no_open_or_stat_for_own_names(self):
        """STAT/LIST needs only the directory: the sizes come from the names."""
        for i in range(3):
            self.deliver(b"line\n" * i)

        real_os_open = os.open

        def forbidden(*args, **kwargs):
            raise AssertionError("scan opened a message with open()")

        def directories_only(path, *args, **kwargs):
            if os.path.basename(path) not in ("new", "cur"):
                raise AssertionError(f"scan opened a message: {path}")
            return real_os_open(path, *args, **kwargs)

        def no_stat(*args, **kwargs):
            raise AssertionError("scan stat'ed a message")

        self.patch(builtins, "open", forbidden)
        self.patch(os, "open", directories_only)
        self.patch(os, "stat", no_stat)
        self.patch(os, "lstat", no_stat)
        infos = self.maildir.scan()
        self.assertEqual([i.octets for i in infos], [0, 6, 12])

    def test_hidden_files_ignored(self):
        message = self.deliver(b"real\n")
        self.put_foreign(".hidden", b"not mail\n")
        self.put_foreign(".nfs0000000001", b"not mail\n", sub="cur")
        self.assertEqual([i.path for i in self.maildir.scan()], [message.final_path])

    def test_uidl_stable_across_mark_seen(self):
        self.deliver(b"one\n")
        self.deliver(b"two\nlines\n")
        before = self.maildir.scan()
        self.maildir.mark_seen(before[:1])
        after = self.maildir.scan()
        self.assertEqual([i.uidl for i in after], [i.uidl for i in before])
        self.assertEqual([i.octets for i in after], [i.octets for i in before])
        self.assertEqual([i.seen for i in after], [True, False])
        self.assertEqual(self.listing("cur"), [os.path.basename(before[0].path) + ":2,S"])
        self.assertEqual(self.listing("new"), [os.path.basename(before[1].path)])
        # The same after a restart (a fresh Maildir object, as another process has).
        again = Maildir(self.maildir.path).scan()
        self.assertEqual([i.uidl for i in again], [i.uidl for i in before])

    def test_mark_seen_twice_is_harmless(self):
        self.deliver(b"one\n")
        infos = self.maildir.scan()
        self.maildir.mark_seen(infos)
        self.maildir.mark_seen(infos)  # stale paths: already moved
        self.maildir.mark_seen(self.maildir.scan())  # already seen
        [name] = self.listing("cur")
        self.assertTrue(name.endswith(":2,S"))
        self.assertFalse(name.endswith(":2,S:2,S"))

    def test_uidl_is_unique_part(self):
        message = self.deliver(b"x\n")
        [info] = self.maildir.scan()
        self.assertEqual(info.uidl, message.unique)
        self.assertTrue(1 <= len(info.uidl) <= 70)
        self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in info.uidl))


class ForeignFileTests(StoreTestCase):
    def check(self, content: bytes, expected: int):
        self.put_foreign("1700000000.foreign.host", content)
        [info] = self.maildir.scan()
        self.assertEqual(info.octets, expected)
        self.assertEqual(info.octets, sent_octets(content))
        self.assertEqual(info.uidl, "1700000000.foreign.host")

    def test_lf(self):
        self.check(b"a\nb\n\n", 8)

    def test_crlf(self):
        self.check(b"a\r\nb\r\n", 6)

    def test_mixed(self):
        self.check(b"a\r\nb\nc\r\n", 9)

    def test_lone_cr(self):
        self.check(b"a\rb\r", 6)  # + the CRLF RETR adds

    def test_cr_before_crlf(self):
        self.check(b"a\r\r\nb", 7)

    def test_size_field_without_w(self):
        name = "1700000000.M1P2.host,S=4"
        self.put_foreign(name, b"a\nb\n")
        [info] = self.maildir.scan()
        self.assertEqual(info.octets, 6)
        self.assertEqual(info.uidl, "1700000000.M1P2.host")

    def test_foreign_in_cur_with_flags(self):
        self.put_foreign("1700000000.M1P2.host:2,RS", b"a\nb\n", sub="cur")
        [info] = self.maildir.scan()
        self.assertEqual((info.octets, info.seen, info.uidl), (6, True, "1700000000.M1P2.host"))

    def test_crlf_split_across_read_block(self):
        """A CRLF whose CR ends one 1 MiB read block and LF starts the next."""
        block = maildir_module._READ_BLOCK
        self.assertEqual(block, 1 << 20)
        content = b"x" * (block - 1) + b"\r\n" + b"y\n" + b"z\r\n"
        path = self.put_foreign("1700000000.big.host", content)
        expected = len(content) + 1  # only "y\n" gains a CR
        self.assertEqual(crlf_size(path), expected)
        [info] = self.maildir.scan()
        self.assertEqual(info.octets, expected)

    def test_lf_at_start_of_second_block(self):
        block = maildir_module._READ_BLOCK
        content = b"x" * block + b"\nend\n"
        path = self.put_foreign("1700000000.big2.host", content)
        self.assertEqual(crlf_size(path), len(content) + 2)

    def test_crlf_size_every_boundary(self):
        """With a tiny read block, every split of CR/LF sequences is counted right."""
        self.patch(maildir_module, "_READ_BLOCK", 3)
        samples = [b"ab\r\ncd\ne\r\r\nf\r", b"\r\n\r\n\n\r\r\n", b"\n\n\n", b"\r\r\r\n"]
        for n, content in enumerate(samples):
            for shift in range(3):
                data = b"." * shift + content
                path = self.put_foreign(f"sample{n}.{shift}", data)
                self.assertEqual(crlf_size(path), sent_octets(data), data)

    def test_size_computed_once(self):
        path = self.put_foreign("1700000000.foreign.host", b"a\nb\n")
        self.assertEqual(self.maildir.scan()[0].octets, 6)
        opened = []
        real_crlf_size = maildir_module.crlf_size
        self.patch(maildir_module, "crlf_size", lambda p: opened.append(p) or real_crlf_size(p))
        self.assertEqual(self.maildir.scan()[0].octets, 6)
        self.assertEqual(opened, [])
        self.assertTrue(os.path.exists(path))

class ListingCacheTests(StoreTestCase):
    """A login to an unchanged big Maildir reads no directory (module docstring)."""

    def setUp(self):
        super().setUp()
        self.reads = []
        real_scandir = os.scandir

        def counting_scandir(fd):
            self.reads.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            return real_scandir(fd)

        self.patch(os, "scandir", counting_scandir)

    def later(self, seconds: float) -> Maildir:
        """The same Maildir as seen by a process whose clock says `seconds` from now."""
        return Maildir(self.maildir.path, ListingBudget(100), now=lambda: time.time() + seconds)

    def test_settled_unchanged_directories_not_read_again(self):
        message = self.deliver(b"one\n")
        maildir = self.later(SETTLED + 1)
        self.assertEqual([i.path for i in maildir.scan()], [message.final_path])
        self.assertEqual(sorted(self.reads), ["cur", "new"])
        self.assertEqual([i.path for i in maildir.scan()], [message.final_path])
        self.assertEqual(sorted(self.reads), ["cur", "new"])

    def test_settled_directory_read_again_once_changed(self):
        first = self.deliver(b"one\n")
        maildir = self.later(SETTLED + 1)
        maildir.scan()
        second = self.deliver(b"two\n")  # changes new/'s mtime and ctime
        self.assertEqual([i.path for i in maildir.scan()], [first.final_path, second.final_path])
        self.assertEqual(sorted(self.reads), ["cur", "new", "new"])

    def test_recent_directory_read_again_even_with_the_same_stamp(self):
        """A directory changed less than SETTLED seconds ago may change again within its
        timestamp granularity, keeping its stamp: it is read again on every scan."""
        first = self.deliver(b"one\n")
        maildir = self.later(0)
        maildir.scan()
        new_dir = os.path.join(self.maildir.path, "new")
        frozen = os.stat(new_dir)
        real_fstat = os.fstat

        def fstat(fd):
            found = real_fstat(fd)
            return frozen if found.st_ino == frozen.st_ino else found

        self.patch(os, "fstat", fstat)
        second = self.deliver(b"two\n")  # the same tick: new/ keeps its stamp
        self.assertEqual([i.path for i in maildir.scan()], [first.final_path, second.final_path])

    def test_names_parsed_once(self):
        """Messages listed before are not parsed (nor, for foreign names, read) again."""
        self.put_foreign("1700000000.foreign.host", b"a\nb\n")
        self.deliver(b"own\n")
        maildir = self.later(0)
        before = maildir.scan()
        parsed = []
        real_parse = Maildir._parse
        self.patch(Maildir, "_parse", lambda m, sub, name: parsed.append(name)
                   or real_parse(m, sub, name))
        newest = self.deliver(b"newest\n")
        after = maildir.scan()
        self.assertEqual(parsed, [os.path.basename(newest.final_path)])
        self.assertEqual(after[:2], before)

    def test_budget_drops_the_least_recently_scanned(self):
        budget = ListingBudget(limit=3)
        bob = self.store.maildir(BOB)
        self.deliver(b"a1\n")
        self.deliver(b"a2\n")
        self.deliver(b"b1\n", bob)
        self.deliver(b"b2\n", bob)
        alice = Maildir(self.maildir.path, budget, now=lambda: time.time() + SETTLED + 1)
        bob = Maildir(bob.path, budget, now=lambda: time.time() + SETTLED + 1)
        alice.scan()
        bob.scan()  # 4 > 3: alice's cache goes
        self.reads.clear()
        self.assertEqual(len(bob.scan()), 2)
        self.assertEqual(self.reads, [])
        self.assertEqual(len(alice.scan()), 2)
        self.assertEqual(sorted(self.reads), ["cur", "new"])

    def test_maildir_bigger_than_the_budget_not_cached(self):
        for n in range(3):
            self.deliver(b"%d\n" % n)
        maildir = Maildir(self.maildir.path, ListingBudget(limit=2),
                          now=lambda: time.time() + SETTLED + 1)
        for _ in range(2):
            self.assertEqual(len(maildir.scan()), 3)
        self.assertEqual(sorted(self.reads), ["cur", "cur", "new", "new"])

    def test_new_mail_seen_by_the_next_scan(self):
        first = self.deliver(b"one\n")
        self.assertEqual([i.path for i in self.maildir.scan()], [first.final_path])
        second = self.deliver(b"two\n")
        self.assertEqual([i.path for i in self.maildir.scan()],
                         [first.final_path, second.final_path])
        self.maildir.mark_seen(self.maildir.scan()[:1])
        self.assertEqual([i.seen for i in self.maildir.scan()], [True, False])


    def test_long_name_hashed_uidl(self):
        name = "x" * 100
        self.put_foreign(name, b"a\n")
        [info] = self.maildir.scan()
        self.assertEqual(len(info.uidl), 40)
        self.assertRegex(info.uidl, r"^[0-9a-f]{40}$")
        self.assertEqual(info.uidl, make_uidl(name))
        self.assertEqual(Maildir(self.maildir.path).scan()[0].uidl, info.uidl)  # stable

    def test_seventy_characters_kept(self):
        self.assertEqual(make_uidl("y" * 70), "y" * 70)
        self.assertNotEqual(make_uidl("y" * 71), "y" * 71)

    def test_non_printable_names_hashed(self):
        names = ["with space", "tab\there", "del\x7fhere", "caf\u00e9", "bell\x07"]
        for name in names:
            self.put_foreign(name, b"a\n")
        self.put_foreign(b"bad\xff\xfeutf8", b"a\n")
        infos = self.maildir.scan()
        self.assertEqual(len(infos), 6)
        self.assertEqual(len({i.uidl for i in infos}), 6)
        for info in infos:
            self.assertEqual(len(info.uidl), 40, info.path)
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in info.uidl), info.uidl)
            self.assertEqual(info.octets, 3)

    def test_empty_unique_part_hashed(self):
        self.assertEqual(len(make_uidl("")), 40)

    def test_budget_counts_a_maildir_once_however_often_scanned(self):
        budget = ListingBudget(limit=3)
        bob_path = self.store.maildir(BOB).path
        self.deliver(b"a\n")
        self.deliver(b"b\n", self.store.maildir(BOB))
        alice = Maildir(self.maildir.path, budget, now=lambda: time.time() + SETTLED + 1)
        bob = Maildir(bob_path, budget, now=lambda: time.time() + SETTLED + 1)
        for _ in range(3):
            alice.scan()
        bob.scan()  # 1 + 1 <= 3: both stay cached
        self.reads.clear()
        alice.scan()
        bob.scan()
        self.assertEqual(self.reads, [])

    def test_zero_budget_caches_nothing(self):
        self.deliver(b"a\n")
        maildir = Maildir(self.maildir.path, ListingBudget(limit=0),
                          now=lambda: time.time() + SETTLED + 1)
        maildir.scan()
        maildir.scan()
        self.assertEqual(sorted(self.reads), ["cur", "cur", "new", "new"])


class RemoveTests(StoreTestCase):
    def test_remove(self):
        for i in range(3):
            self.deliver(b"%d\n" % i)
        infos = self.maildir.scan()
        self.maildir.remove([infos[0], infos[2]])
        self.assertEqual([i.uidl for i in self.maildir.scan()], [infos[1].uidl])
        self.assertFalse(os.path.exists(infos[0].path))

    def test_remove_already_gone(self):
        self.deliver(b"x\n")
        infos = self.maildir.scan()
        os.unlink(infos[0].path)
        self.maildir.remove(infos)
        self.maildir.remove(infos)
        self.assertEqual(self.maildir.scan(), [])

    def test_remove_seen(self):
        self.deliver(b"x\n")
        self.maildir.mark_seen(self.maildir.scan())
        self.maildir.remove(self.maildir.scan())
        self.assertEqual(self.listing("cur"), [])
        self.assertEqual(self.maildir.scan(), [])

    def test_remove_nothing(self):
        self.maildir.remove([])


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    sys.stdout.write("locked\\n")
    sys.stdout.flush()
    sys.stdin.read()
""")

_TRY_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy")
    else:
        print("free")
""")


class LockTests(StoreTestCase):
    def lock_path(self):
        return os.path.join(self.maildir.path, LOCK_NAME)

    def test_second_lock_in_same_process(self):
        lock = self.maildir.lock()
        self.addCleanup(lock.release)
        with self.assertRaises(MailboxLocked):
            self.maildir.lock()
        # A second Maildir object for the same directory (another session) is refused too.
        self.assertRaises(MailboxLocked, Maildir(self.maildir.path).lock)

    def test_release_and_retake(self):
        lock = self.maildir.lock()
        lock.release()
        lock.release()  # twice is harmless
        again = self.maildir.lock()
        again.release()

    def test_other_mailboxes_independent(self):
        lock = self.maildir.lock()
        self.addCleanup(lock.release)
        self.store.maildir(BOB).lock().release()

    def test_lock_file_private(self):
        self.maildir.lock().release()
        self.assertEqual(stat.S_IMODE(os.stat(self.lock_path()).st_mode) & 0o077, 0)

    def test_lock_file_not_a_message(self):
        self.deliver(b"x\n")
        lock = self.maildir.lock()
        self.addCleanup(lock.release)
        self.assertEqual(len(self.maildir.scan()), 1)

    def test_held_by_another_process(self):
        child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, self.lock_path()],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def stop():
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
            child.stdin.close()
            child.stdout.close()

        self.addCleanup(stop)
        ready, _, _ = select.select([child.stdout], [], [], 10)
        self.assertTrue(ready, "the child did not take the lock in time")
        self.assertEqual(child.stdout.readline(), b"locked\n")
        self.assertRaises(MailboxLocked, self.maildir.lock)
        child.stdin.close()
        self.assertEqual(child.wait(timeout=10), 0)
        self.maildir.lock().release()  # free again once the other process is gone

    def test_excludes_another_process(self):
        def probe():
            return subprocess.run([sys.executable, "-c", _TRY_LOCK, self.lock_path()],
                                  capture_output=True, timeout=10, check=True).stdout

        lock = self.maildir.lock()
        try:
            self.assertEqual(probe(), b"busy\n")
        finally:
            lock.release()
        self.assertEqual(probe(), b"free\n")

    def test_lock_not_inherited_by_children(self):
        """A process spawned while a session holds the lock (a hook, a twistd child) must
        not keep the mailbox locked after the session releases it."""
        lock = self.maildir.lock()
        self.addCleanup(lock.release)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=False)
        try:
            # Wait until the child runs Python: only then has its exec finished closing
            # (and releasing) any close-on-exec descriptor, the kernel does it lazily.
            ready, _, _ = select.select([child.stdout], [], [], 10)
            self.assertTrue(ready, "the child did not start in time")
            self.assertEqual(child.stdout.readline(), b"ready\n")
            lock.release()
            # Had the child inherited the descriptor, the lock would still be held.
            self.maildir.lock().release()
        finally:
            child.stdin.close()
            child.wait(timeout=10)
            child.stdout.close()


class CleanTmpTests(StoreTestCase):
    def make(self, maildir, sub, name, age):
        path = os.path.join(maildir.path, sub, name)
        with open(path, "wb") as f:
            f.write(b"data\n")
        when = time.time() - age
        os.utime(path, (when, when))
        return path

    def test_removes_only_stale_tmp(self):
        bob = self.store.maildir(BOB)
        hours = 3600
        stale = [self.make(self.maildir, "tmp", "stale1", 37 * hours),
                 self.make(bob, "tmp", "stale2", 100 * hours)]
        fresh = [self.make(self.maildir, "tmp", "fresh", 35 * hours),
                 self.make(bob, "tmp", "justnow", 0)]
        old_mail = [self.make(self.maildir, "new", "1000000000.old.host", 1000 * hours),
                    self.make(bob, "cur", "1000000000.old.host:2,S", 1000 * hours)]
        self.assertEqual(self.store.clean_tmp(), 2)
        for path in stale:
            self.assertFalse(os.path.exists(path), path)
        for path in fresh + old_mail:
            self.assertTrue(os.path.exists(path), path)
        self.assertEqual(self.store.clean_tmp(), 0)

    def test_default_age_is_36_hours(self):
        self.assertEqual(STALE_TMP_AGE, 36 * 3600)
        path = self.make(self.maildir, "tmp", "edge", 0)
        mtime = os.stat(path).st_mtime
        self.assertEqual(self.store.clean_tmp(now=mtime + STALE_TMP_AGE - 1), 0)
        self.assertTrue(os.path.exists(path))
        self.assertEqual(self.store.clean_tmp(now=mtime + STALE_TMP_AGE + 1), 1)
        self.assertFalse(os.path.exists(path))

    def test_message_in_progress_kept(self):
        message = self.store.new_message(self.maildir)
        message.write(b"x\n")
        self.assertEqual(self.store.clean_tmp(), 0)
        commit([message])
        self.assertEqual(len(self.maildir.scan()), 1)

    def test_empty_or_missing_root(self):
        self.assertEqual(MaildirStore(os.path.join(self.root, "none"), "h").clean_tmp(), 0)

    def test_directories_in_tmp_kept(self):
        directory = os.path.join(self.maildir.path, "tmp", "subdir")
        os.mkdir(directory)
        os.utime(directory, (0, 0))
        self.assertEqual(self.store.clean_tmp(), 0)
        self.assertTrue(os.path.isdir(directory))


class MessageInfoTests(unittest.TestCase):
    def test_frozen(self):
        info = MessageInfo("p", "u", 1, False)
        self.assertRaises(AttributeError, setattr, info, "octets", 2)
        self.assertTrue(re.match(r"MessageInfo\(", repr(info)))


class OwnedTmpTests(StoreTestCase):
    """Issue 12: popgate's own tmp/ files name a locked owner; the files of owners that
    died go at the next sweep, a live owner's are never touched, whatever the host."""

    def node(self, host="mx.example.org") -> MaildirStore:
        """Another popgate process sharing the mail root (flock locks belong to an open
        file, so two stores in one process exclude each other like two processes)."""
        store = MaildirStore(self.root, host)
        store.claim_owner()
        self.addCleanup(self.crash, store)
        return store

    def crash(self, store: MaildirStore) -> None:
        """What kill -9 does to a store: its lock is dropped, its files stay."""
        if store._owner_fd is not None:
            os.close(store._owner_fd)
            store._owner_fd = None

    def spare(self, store: MaildirStore, data: bytes = b"") -> str:
        message = store.new_message(store.maildir(ALICE))
        message.write(data)
        message.flush()
        return message.tmp_path

    def test_names_say_whose_they_are(self):
        store = self.node()
        name = os.path.basename(self.spare(store))
        self.assertRegex(name, rf"^\d+\.M\d+P{os.getpid()}Q\d+R[0-9a-f]{{16}}"
                               rf"\.mx\.example\.org,O={store.owner}$")
        with open(os.path.join(self.root, ".popgate-owners", store.owner)) as f:
            self.assertEqual(f.read(), f"mx.example.org {os.getpid()}\n")

    def test_live_owners_files_are_kept_on_any_host(self):
        mine, same_host, other_host = self.node(), self.node(), self.node("mx2.example.org")
        paths = [self.spare(store) for store in (mine, same_host, other_host)]
        self.assertEqual(mine.clean_tmp(), 0)
        self.assertEqual(same_host.clean_tmp(), 0)
        for path in paths:
            self.assertTrue(os.path.exists(path), path)

    def test_dead_owners_files_and_lock_are_removed(self):
        survivor, crashed = self.node(), self.node("mx2.example.org")
        kept = self.spare(survivor)
        gone = [self.spare(crashed), self.spare(crashed, b"partial message\n")]
        self.crash(crashed)
        self.assertEqual(survivor.clean_tmp(), 2)
        self.assertTrue(os.path.exists(kept))
        for path in gone:
            self.assertFalse(os.path.exists(path), path)
        self.assertEqual(os.listdir(os.path.join(self.root, ".popgate-owners")),
                         [survivor.owner])

    def test_the_previous_incarnation_of_this_process_is_dead(self):
        """kill -9 and restart with the same pid (containers): a new owner, the old
        files go."""
        before = self.node()
        stale = self.spare(before)
        self.crash(before)
        after = self.node()
        self.assertEqual(after.clean_tmp(), 1)
        self.assertFalse(os.path.exists(stale))

    def test_files_of_an_owner_whose_lock_file_is_gone(self):
        crashed = self.node()
        path = self.spare(crashed)
        self.crash(crashed)
        os.unlink(os.path.join(self.root, ".popgate-owners", crashed.owner))
        self.assertEqual(self.node().clean_tmp(), 1)
        self.assertFalse(os.path.exists(path))

    def test_an_interrupted_claim_is_removed_after_a_minute(self):
        owners = os.path.join(self.root, ".popgate-owners")
        os.makedirs(owners)
        leftover = os.path.join(owners, "0123456789abcdef.new")
        with open(leftover, "w"):
            pass
        self.assertEqual(self.store.clean_tmp(), 0)
        self.assertTrue(os.path.exists(leftover), "may be a claim in progress")
        self.store.clean_tmp(now=time.time() + 61)
        self.assertFalse(os.path.exists(leftover))

    def test_foreign_and_unowned_files_keep_the_36_hour_rule(self):
        self.node()
        foreign = os.path.join(self.maildir.path, "tmp", "1700000000.12345.other-mta")
        unowned = self.spare(self.store)  # a store that never claimed: no O= field
        for path in (foreign, unowned):
            with open(path, "ab"):
                pass
        self.assertEqual(self.node().clean_tmp(), 0)
        self.assertEqual(self.store.clean_tmp(now=time.time() + STALE_TMP_AGE + 1), 2)
