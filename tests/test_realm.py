"""Tests for popgate.pop3.realm: the locked maildrop snapshot behind a POP3 login."""

from __future__ import annotations

import os

from twisted.cred.error import UnauthorizedLogin
from twisted.trial import unittest

from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.pop3.realm import IMaildrop, MailboxInUse, Maildrop, MaildropRealm, NoSuchMessage
from popgate.store.maildir import MaildirStore, commit
from tests.fakes import Deferring, synchronous


class RealmTestCase(unittest.TestCase):
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        users_path = os.path.join(root, "users")
        UserFile(users_path).add("alice@example.org", hash_password("pw", "PLAIN"))
        self.users = UserDB(users_path)
        self.store = MaildirStore(os.path.join(root, "mail"), "test.host")
        self.realm = MaildropRealm(self.users, self.store, synchronous)
        self.maildir = self.store.maildir(self.users.get("alice@example.org"))

    def deliver(self, body: bytes) -> None:
        message = self.store.new_message(self.maildir)
        message.write(body)
        commit([message])

    def open(self, name="alice@example.org"):
        return self.successResultOf(self.realm.requestAvatar(name, None, IMaildrop))

    def test_avatar_is_a_snapshot_of_the_maildir(self):
        self.deliver(b"Subject: one\n\nbody\n")
        self.deliver(b"Subject: two\n\nbody\n")
        interface, maildrop, logout = self.open()
        self.addCleanup(logout)
        self.assertIs(interface, IMaildrop)
        self.assertTrue(IMaildrop.providedBy(maildrop))
        self.assertEqual(maildrop.user, "alice@example.org")
        self.assertEqual(maildrop.count(), 2)
        self.deliver(b"Subject: three\n\nlate\n")
        self.assertEqual(maildrop.count(), 2, "a message delivered after login is not seen")
        self.assertEqual(maildrop.stat(), (2, sum(i.octets for _, i in maildrop.listing())))

    def test_second_login_is_refused_while_the_first_holds_the_lock(self):
        _, _, logout = self.open()
        failure = self.failureResultOf(
            self.realm.requestAvatar("alice@example.org", None, IMaildrop))
        failure.trap(MailboxInUse)
        logout()
        _, _, logout_again = self.open()
        logout_again()

    def test_logout_twice_is_harmless(self):
        _, _, logout = self.open()
        logout()
        logout()
        self.open()[2]()

    def test_removed_user_is_unauthorized(self):
        failure = self.failureResultOf(
            self.realm.requestAvatar("bob@example.org", None, IMaildrop))
        failure.trap(UnauthorizedLogin)

    def test_other_interfaces_are_not_served(self):
        failure = self.failureResultOf(
            self.realm.requestAvatar("alice@example.org", None, object))
        failure.trap(NotImplementedError)

    def test_failed_scan_releases_the_lock(self):
        def broken():
            raise OSError("disk on fire")

        self.patch(self.maildir, "scan", broken)
        failure = self.failureResultOf(
            self.realm.requestAvatar("alice@example.org", None, IMaildrop))
        failure.trap(OSError)
        self.patch(self.maildir, "scan", lambda: [])
        self.open()[2]()  # the lock is free again

    def test_no_file_is_made_or_locked_on_the_reactor(self):
        """docs/design.md: file creation runs in threads.  A first login creates the
        Maildir, and every login opens (creates) and flocks its lock file: on GlusterFS
        or NFS each is a round trip to the servers."""
        UserFile(self.users.path).add("bob@example.org", hash_password("pw", "PLAIN"))
        threads = Deferring()
        realm = MaildropRealm(self.users, self.store, threads)
        d = realm.requestAvatar("bob@example.org", None, IMaildrop)
        maildir_path = os.path.join(self.store.root, "example.org", "bob", "Maildir")
        self.assertFalse(os.path.exists(maildir_path))
        while threads.calls:
            threads.run_next()
        _, maildrop, logout = self.successResultOf(d)
        self.addCleanup(logout)
        self.assertEqual(maildrop.count(), 0)
        self.assertTrue(os.path.exists(os.path.join(maildir_path, "popgate.lock")))

    def test_message_numbers_and_deletion_marks(self):
        for n in range(3):
            self.deliver(b"Subject: %d\n\nbody\n" % n)
        _, maildrop, logout = self.open()
        self.addCleanup(logout)
        for bad in (0, 4, -1):
            self.assertRaises(NoSuchMessage, maildrop.message, bad)
        maildrop.delete(2)
        self.assertEqual(str(self.assertRaises(NoSuchMessage, maildrop.message, 2)),
                         "Message 2 is deleted")
        self.assertRaises(NoSuchMessage, maildrop.delete, 2)
        self.assertEqual([n for n, _ in maildrop.listing()], [1, 3])
        self.assertEqual(maildrop.stat()[0], 2)
        self.assertEqual(maildrop.deleted_count, 1)
        maildrop.undelete_all()
        self.assertEqual(maildrop.stat()[0], 3)
        self.assertEqual(maildrop.deleted_count, 0)

    def test_commit_removes_marked_and_marks_retrieved_seen(self):
        for n in range(3):
            self.deliver(b"Subject: %d\n\nbody\n" % n)
        _, maildrop, logout = self.open()
        uidls = [info.uidl for _, info in maildrop.listing()]
        maildrop.delete(1)
        maildrop.retrieved(2)
        self.successResultOf(maildrop.commit())
        logout()
        self.assertEqual(os.listdir(os.path.join(self.maildir.path, "new")),
                         [os.path.basename(maildrop.message(3).path)])
        [seen] = os.listdir(os.path.join(self.maildir.path, "cur"))
        self.assertTrue(seen.endswith(":2,S"))
        after = [info.uidl for info in self.maildir.scan()]
        self.assertEqual(sorted(after), sorted(uidls[1:]))

    def test_commit_with_nothing_to_do_touches_nothing(self):
        calls = []
        maildrop = Maildrop("alice@example.org", self.maildir, [],
                          lambda f, *a: calls.append(f))
        self.successResultOf(maildrop.commit())
        self.assertEqual(calls, [])

    def test_dropping_the_session_deletes_nothing(self):
        self.deliver(b"Subject: keep\n\nbody\n")
        _, maildrop, logout = self.open()
        maildrop.delete(1)
        logout()  # no commit: what a dropped connection does
        self.assertEqual(len(self.maildir.scan()), 1)
