"""Tests for popgate.smtp.delivery: routing decisions, trace headers, durable group commits.

Real Maildirs in trial temp directories; ``run_in_thread`` stand-ins either run the work
at once or hand back Deferreds the test fires itself.
"""

from __future__ import annotations

import email
import errno
import glob
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from popgate import config
from popgate.addresses import parse_path
from popgate.auth.users import UserDB, UserFile, hash_password
from popgate.loglimit import LogLimiter
from popgate.smtp import delivery
from popgate.smtp.delivery import (
    Arrival,
    Deliverer,
    GroupCommitter,
    Recipient,
    Router,
    commit_group,
    fold,
    received_header,
    storage_refusal,
)
from popgate.smtp.reply import RELAY_DENIED, UNKNOWN_USER, USERS_UNAVAILABLE
from popgate.store import maildir
from popgate.store.maildir import MaildirStore
from tests.fakes import Deferring, synchronous


class UsersFixture:
    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.users_file = os.path.join(self.data_dir, "users")
        for name in ("alice@example.org", "bob@example.org", "postmaster@example.net",
                     "carol@example.net"):
            self.add_user(name)
        self.users = UserDB(self.users_file)

    def add_user(self, name):
        UserFile(self.users_file).add(name, hash_password("pw", "PLAIN"))

    def make_config(self, **overrides):
        settings = {"server.data_dir": self.data_dir, "server.hostname": "mx.example.net"}
        settings.update(overrides)
        return config.load(None, settings)


class RouterTests(UsersFixture, TestCase):
    def router(self, **overrides):
        return Router(self.make_config(**overrides), self.users)

    def resolve(self, router, address):
        return router.resolve(parse_path(address, utf8=True))

    def names(self, resolution):
        self.assertIsNone(resolution.refusal)
        return [user.name for user in resolution.users]

    def test_local_domains(self):
        router = self.router(**{"server.domains": ["Extra.Example"],
                                "aliases.@alias.example": ["bob@example.org"]})
        for domain in ("example.org", "example.net", "extra.example", "alias.example"):
            self.assertTrue(router.is_local(domain), domain)
        self.assertFalse(router.is_local("remote.example"))

    def test_a_new_user_makes_a_new_local_domain(self):
        router = self.router()
        self.assertEqual(self.resolve(router, "<dan@new.example>").refusal, RELAY_DENIED)
        self.add_user("dan@new.example")
        self.assertEqual(self.names(self.resolve(router, "<dan@new.example>")),
                         ["dan@new.example"])

    def test_relay_forms_are_denied(self):
        router = self.router()
        for address in ["<alice@remote.example>", "<@a.example:alice@example.org>",
                        "<alice%remote.example@example.org>", "<remote!alice@example.org>",
                        '<"alice@remote.example"@example.org>', "<alice@[127.0.0.1]>",
                        "<alice@[IPv6:::1]>"]:
            self.assertEqual(self.resolve(router, address).refusal, RELAY_DENIED, address)

    def test_unknown_user(self):
        router = self.router()
        self.assertEqual(self.resolve(router, "<nobody@example.org>").refusal, UNKNOWN_USER)
        self.assertEqual(self.resolve(router, "<+tag@example.org>").refusal, UNKNOWN_USER)
        self.assertEqual(self.resolve(router, "<jösé@example.org>").refusal, UNKNOWN_USER)

    def test_case_and_sub_addresses(self):
        router = self.router()
        for address in ["<ALICE@EXAMPLE.ORG>", "<alice+x@example.org>", "<Alice+x+y@Example.org>",
                        "<alice+@example.org>"]:
            self.assertEqual(self.names(self.resolve(router, address)), ["alice@example.org"])

    def test_alias_order(self):
        router = self.router(**{
            "aliases.alice@example.org": ["bob@example.org"],
            "aliases.team@example.org": ["alice@example.org", "bob@example.org",
                                         "alice@example.org"],
            "aliases.@example.org": ["carol@example.net"],
        })
        self.assertEqual(self.names(self.resolve(router, "<alice@example.org>")),
                         ["bob@example.org"])
        self.assertEqual(self.names(self.resolve(router, "<Team+x@example.org>")),
                         ["alice@example.org", "bob@example.org"])
        self.assertEqual(self.names(self.resolve(router, "<bob@example.org>")),
                         ["bob@example.org"])
        self.assertEqual(self.names(self.resolve(router, "<other@example.org>")),
                         ["carol@example.net"])

    def test_alias_targets_must_exist(self):
        router = self.router(**{
            "aliases.some@example.org": ["gone@example.org", "bob@example.org"],
            "aliases.none@example.org": ["gone@example.org"],
        })
        self.assertEqual(self.names(self.resolve(router, "<some@example.org>")),
                         ["bob@example.org"])
        self.assertEqual(self.resolve(router, "<none@example.org>").refusal, UNKNOWN_USER)

    def test_postmaster_goes_to_the_configured_user(self):
        router = self.router(**{"server.postmaster": "bob@example.org",
                                "server.domains": ["extra.example"]})
        for address in ["<postmaster@example.org>", "<PostMaster@example.net>",
                        "<postmaster@extra.example>"]:
            self.assertEqual(self.names(self.resolve(router, address)), ["bob@example.org"])
        self.assertEqual(self.names(router.resolve_postmaster()), ["bob@example.org"])

    def test_postmaster_without_configuration(self):
        # RFC 5321 §4.5.1: postmaster@ of every local domain works.  A domain's own user
        # postmaster@ or its catch-all comes first, then the first user in the file.
        router = self.router(**{"server.domains": ["extra.example"],
                                "aliases.@alias.example": ["bob@example.org"]})
        self.assertEqual(self.names(self.resolve(router, "<postmaster@example.net>")),
                         ["postmaster@example.net"])
        for address in ["<postmaster@example.org>", "<Postmaster@extra.example>"]:
            self.assertEqual(self.names(self.resolve(router, address)), ["alice@example.org"])
        self.assertEqual(self.names(self.resolve(router, "<postmaster@alias.example>")),
                         ["bob@example.org"])
        self.assertEqual(self.names(router.resolve_postmaster()), ["postmaster@example.net"])
        self.assertEqual(self.resolve(router, "<postmaster@remote.example>").refusal,
                         RELAY_DENIED)

    def test_default_postmaster_follows_the_users_file(self):
        os.unlink(self.users_file)
        router = self.router()
        self.assertEqual(self.resolve(router, "<postmaster@example.org>").refusal,
                         RELAY_DENIED)  # example.org is no longer local
        router = self.router(**{"server.domains": ["example.org"]})
        self.assertEqual(self.resolve(router, "<postmaster@example.org>").refusal,
                         UNKNOWN_USER)  # nobody to give it to
        self.add_user("dave@example.org")
        self.assertEqual(self.names(self.resolve(router, "<postmaster@example.org>")),
                         ["dave@example.org"])

    def test_describe_postmaster(self):
        line = delivery.describe_postmaster(self.make_config(), self.users)
        self.assertEqual(line, "postmaster@<every local domain> goes to alice@example.org, "
                               f"the first user in {self.users_file}, unless an alias, a user "
                               "postmaster@<domain> or a catch-all of that domain says "
                               "otherwise; set server.postmaster to choose")
        configured = self.make_config(**{"server.postmaster": "bob@example.org"})
        self.assertEqual(delivery.describe_postmaster(configured, self.users),
                         "postmaster@<every local domain> goes to bob@example.org "
                         "(server.postmaster)")
        missing = self.make_config(**{"server.postmaster": "gone@example.org"})
        self.assertTrue(delivery.describe_postmaster(missing, self.users).startswith(
            "server.postmaster gone@example.org is not a user: postmaster@<every local "
            "domain> goes to alice@example.org"))
        empty = UserDB(os.path.join(self.data_dir, "nobody"))
        self.assertIn("will go to the first user added to", delivery.describe_postmaster(
            self.make_config(), empty))

    def test_configured_postmaster_missing_falls_back(self):
        router = self.router(**{"server.postmaster": "gone@example.org"})
        self.assertEqual(self.names(self.resolve(router, "<postmaster@example.net>")),
                         ["postmaster@example.net"])


ARRIVAL = Arrival(sender="sender@remote.example", recipients=(), helo="client.example",
                    client_ip="192.0.2.5", protocol="ESMTP")


class DelivererTests(UsersFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.store = MaildirStore(os.path.join(self.data_dir, "mail"), "mx.example.net")
        self.deliverer = Deliverer(self.store, synchronous, hostname="mx.example.net",
                                   now=lambda: 1_700_000_000.0, spares=0)

    def envelope(self, *addresses, **changes):
        router = Router(self.make_config(**{"aliases.all@example.org": [
            "alice@example.org", "bob@example.org"]}), self.users)
        recipients = tuple(
            Recipient(address, router.resolve(parse_path(f"<{address}>")).users)
            for address in addresses)
        fields = {**ARRIVAL.__dict__, "recipients": recipients, **changes}
        return Arrival(**fields)

    def begin(self, envelope):
        return self.successResultOf(self.deliverer.begin(envelope))

    def files(self, user, sub="new"):
        local, domain = user.split("@")
        return sorted(glob.glob(os.path.join(self.data_dir, "mail", domain, local, "Maildir",
                                             sub, "*")))

    def read(self, user):
        [path] = self.files(user)
        with open(path, "rb") as f:
            return path, f.read()

    def test_one_copy_per_user_with_its_own_trace_headers(self):
        transaction = self.begin(self.envelope(
            "alice+x@example.org", "all@example.org"))
        self.assertEqual(len(self.files("alice@example.org", "tmp")), 1)
        transaction.write(b"Subject: hi\n\n")
        transaction.write(b"body\n")
        self.successResultOf(transaction.finish())
        _, alice = self.read("alice@example.org")
        _, bob = self.read("bob@example.org")
        self.assertTrue(alice.startswith(b"Return-Path: <sender@remote.example>\n"
                                         b"Delivered-To: alice@example.org\nReceived: "))
        self.assertIn(b"for <alice+x@example.org>;", alice)
        self.assertIn(b"Delivered-To: bob@example.org\n", bob)
        self.assertIn(b"for <all@example.org>;", bob)
        self.assertIn(f" id {transaction.id} ".encode(), alice.replace(b"\n\t", b" "))
        self.assertTrue(alice.endswith(b"\nSubject: hi\n\nbody\n"))
        for _, message in transaction._copies:
            self.assertFalse(os.path.exists(message.tmp_path))
        self.assertEqual(transaction.size, len(b"Subject: hi\n\nbody\n"))

    def test_file_name_carries_both_sizes(self):
        transaction = self.begin(self.envelope("alice@example.org"))
        transaction.write(b"a\nb\n")
        self.successResultOf(transaction.finish())
        path, content = self.read("alice@example.org")
        crlf_octets = len(content) + content.count(b"\n")
        self.assertTrue(path.endswith(f",S={len(content)},W={crlf_octets}"), path)

    def test_copies_share_one_buffer(self):
        """A big message to several users: every copy gets every byte, and the bytes not
        yet written wait in one buffer, not in one per copy."""
        users = ("alice@example.org", "bob@example.org", "carol@example.net")
        transaction = self.begin(self.envelope(*users))
        line = b"x" * 99 + b"\n"
        for _ in range(3000):  # 300 kB in 100-byte writes
            transaction.write(line)
            for _, message in transaction._copies:
                self.assertLess(len(message._buffer), 1024)
        self.successResultOf(transaction.finish())
        for user in users:
            path, content = self.read(user)
            self.assertTrue(content.startswith(b"Return-Path: "))
            self.assertTrue(content.endswith(line * 3000))
            self.assertEqual(content.count(line), 3000)
            crlf_octets = len(content) + content.count(b"\n")
            self.assertTrue(path.endswith(f",S={len(content)},W={crlf_octets}"), path)

    def test_null_sender(self):
        transaction = self.begin(self.envelope("alice@example.org", sender=""))
        self.successResultOf(transaction.finish())
        self.assertTrue(self.read("alice@example.org")[1].startswith(b"Return-Path: <>\n"))

    def test_abort_leaves_nothing(self):
        transaction = self.begin(self.envelope("alice@example.org", "bob@example.org"))
        transaction.write(b"partial\n")
        transaction.abort()
        for user in ("alice@example.org", "bob@example.org"):
            self.assertEqual(self.files(user, "tmp") + self.files(user), [])

    def test_begin_fails_cleanly(self):
        opened = []
        real = self.store.new_message

        def second_fails(md):
            if opened:
                raise OSError(24, "Too many open files")
            opened.append(real(md))
            return opened[-1]

        self.store.new_message = second_fails
        self.failureResultOf(self.deliverer.begin(
            self.envelope("alice@example.org", "bob@example.org")), OSError)
        self.assertEqual(self.files("alice@example.org", "tmp"), [])

    def test_write_error_fails_finish(self):
        transaction = self.begin(self.envelope("alice@example.org"))

        def full(data):
            raise OSError(28, "No space left on device")

        transaction._copies[0][1].write = full
        transaction.write(b"data\n")
        transaction.write(b"more\n")
        self.failureResultOf(transaction.finish(), OSError)
        self.assertEqual(self.files("alice@example.org", "tmp"), [])
        self.assertEqual(self.files("alice@example.org"), [])


class ReceivedHeaderTests(TestCase):
    def header(self, **changes):
        envelope = Arrival(**{**ARRIVAL.__dict__, **changes})
        return received_header(envelope, "alice@example.org", "mx.example.net", "ABC123",
                               "Tue, 14 Nov 2023 22:13:20 +0000")

    def test_form(self):
        header = self.header()
        self.assertEqual(header.replace("\n\t", " "), (
            "Received: from client.example (unknown [192.0.2.5]) by mx.example.net (popgate) "
            "with ESMTP id ABC123 for <alice@example.org>; Tue, 14 Nov 2023 22:13:20 +0000"))
        parsed = email.message_from_string(header + "\n\n")
        self.assertIn("by mx.example.net (popgate)", parsed["Received"])

    def test_folded_within_78_columns(self):
        header = self.header(tls="TLSv1.3 TLS_AES_256_GCM_SHA384", protocol="ESMTPS")
        lines = header.split("\n")
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(len(line) <= 78 for line in lines), lines)
        self.assertTrue(all(line.startswith("\t") for line in lines[1:]))

    def test_tls(self):
        header = self.header(tls="TLSv1.3 TLS_AES_256_GCM_SHA384", protocol="ESMTPS")
        self.assertIn("with ESMTPS id ABC123 (using TLSv1.3 with cipher "
                      "TLS_AES_256_GCM_SHA384) for", header.replace("\n\t", " "))

    def test_peers(self):
        self.assertIn("(unknown [IPv6:2001:db8::1])", self.header(client_ip="2001:db8::1"))
        self.assertIn("from client.example (local socket)", self.header(client_ip=None))

    def test_fold_keeps_long_words_whole(self):
        folded = fold("X:", ["a" * 100, "b"])
        self.assertEqual(folded, "X: " + "a" * 100 + "\n\tb")


class GroupCommitTests(UsersFixture, TestCase):
    def setUp(self):
        super().setUp()
        self.store = MaildirStore(os.path.join(self.data_dir, "mail"), "mx.example.net")

    def message(self, user="alice@example.org", text=b"hello\n"):
        message = self.store.new_message(self.store.maildir(self.users.get(user)))
        message.write(text)
        return message

    def test_deliveries_waiting_for_a_busy_committer_share_one_thread_call(self):
        threads = Deferring()
        committer = GroupCommitter(threads, max_in_flight=1)
        first = committer.commit([self.message()])
        later = [committer.commit([self.message()]) for _ in range(3)]
        self.assertEqual(len(threads.calls), 1)
        self.assertNoResult(first)
        threads.run_next()
        self.successResultOf(first)
        [(_, _, (groups,))] = threads.calls
        self.assertEqual(len(groups), 3)
        for d in later:
            self.assertNoResult(d)
        threads.run_next()
        for d in later:
            self.successResultOf(d)
        self.assertEqual(len(self.store.maildir(self.users.get("alice@example.org")).scan()),
                         4)

    def test_files_are_closed_once_committed(self):
        committer = GroupCommitter(synchronous)
        messages = [self.message(), self.message("bob@example.org")]
        self.successResultOf(committer.commit(messages))
        self.assertEqual([m.closed for m in messages], [True, True])
        self.assertEqual([os.path.exists(m.final_path) for m in messages], [True, True])

    def test_directory_fsync_is_shared(self):
        groups = [[self.message()], [self.message()], [self.message("bob@example.org")]]
        synced = []
        self.patch(maildir, "fsync_directory", synced.append)
        outcomes = commit_group(groups)
        self.assertEqual(outcomes, [None, None, None])
        self.assertEqual(len(synced), 2)

    def test_one_failure_does_not_fail_the_group(self):
        bad = self.message("bob@example.org")
        os.rmdir(os.path.join(bad.maildir.path, "new"))
        good = self.message()
        outcomes = commit_group([[bad], [good]])
        self.assertIsInstance(outcomes[0], OSError)
        self.assertIsNone(outcomes[1])
        self.assertFalse(os.path.exists(bad.tmp_path))
        self.assertTrue(os.path.exists(good.final_path))

    def test_a_failed_thread_call_fails_every_delivery(self):
        committer = GroupCommitter(lambda f, *a: defer.fail(RuntimeError("pool gone")))
        message = self.message()
        self.failureResultOf(committer.commit([message]), RuntimeError)
        self.assertFalse(os.path.exists(message.tmp_path))


class SpareTests(UsersFixture, TestCase):
    """Spare tmp/ files: a message's files are made ahead of time, in the background."""

    def setUp(self):
        super().setUp()
        self.store = MaildirStore(os.path.join(self.data_dir, "mail"), "mx.example.net")
        self.threads = Deferring()
        self.now = 1_700_000_000.0
        self.deliverer = Deliverer(self.store, self.threads, hostname="mx.example.net",
                                   now=lambda: self.now, spares=4)
        self.created = []
        real = self.store.new_message

        def new_message(md):
            self.created.append(real(md))
            return self.created[-1]

        self.store.new_message = new_message

    def envelope(self, *names):
        recipients = tuple(Recipient(name, (self.users.get(name),)) for name in names)
        return Arrival(**{**ARRIVAL.__dict__, "recipients": recipients})

    def tmp(self, user="alice@example.org"):
        local, domain = user.split("@")
        return sorted(os.listdir(os.path.join(self.data_dir, "mail", domain, local, "Maildir",
                                              "tmp")))

    def run_threads(self):
        while self.threads.calls:
            self.threads.run_next()

    def begin(self, *names):
        d = self.deliverer.begin(self.envelope(*names))
        self.run_threads()
        return self.successResultOf(d)

    def commit(self, transaction, text=b"body\n"):
        transaction.write(text)
        done = transaction.finish()
        self.run_threads()
        self.successResultOf(done)

    def test_next_message_needs_no_thread_call(self):
        first = self.begin("alice@example.org")  # none yet: made in a thread, and 2 spares
        self.assertEqual(len(self.created), 3)
        self.commit(first)
        spares = [m.unique for m in self.created[1:]]
        self.assertEqual(self.tmp(), sorted(spares))
        d = self.deliverer.begin(self.envelope("alice@example.org"))
        second = self.successResultOf(d)  # at once, without a thread call for it
        self.assertIs(second._copies[0][1], self.created[1])  # the oldest spare
        [(_, f, (_, wanted, _))] = self.threads.calls  # the spare it took is replaced
        self.assertIs(f, delivery.make_spares)
        self.assertEqual([(user.name, n) for user, n in wanted], [("alice@example.org", 1)])
        self.run_threads()
        self.commit(second, b"second\n")
        infos = self.store.maildir(self.users.get("alice@example.org")).scan()
        self.assertEqual([i.uidl for i in infos], [first._copies[0][1].unique, spares[0]])
        with open(infos[1].path, "rb") as f:
            content = f.read()
        self.assertTrue(content.startswith(b"Return-Path: <sender@remote.example>\n"))
        self.assertIn(f" id {second.id} ".encode(), content.replace(b"\n\t", b" "))
        self.assertTrue(content.endswith(b"\nsecond\n"))
        self.assertEqual(len(self.tmp()), 2)

    def test_every_recipient_needs_a_spare(self):
        self.commit(self.begin("alice@example.org"))
        d = self.deliverer.begin(self.envelope("alice@example.org", "bob@example.org"))
        self.assertNoResult(d)  # bob has no spare: both files are made in a thread
        self.run_threads()
        self.commit(self.successResultOf(d))
        # alice's spares are left, and she wants 3 now; bob wants 2 but gets what is left
        # of the 4 spares allowed.
        self.assertEqual(len(self.tmp()), 3)
        self.assertEqual(len(self.tmp("bob@example.org")), 1)

    def test_spares_follow_the_messages_in_flight(self):
        """A user who gets more messages at once than there are spares gets more spares."""
        self.commit(self.begin("alice@example.org"))
        self.assertEqual(len(self.tmp()), 2)
        held = [self.successResultOf(self.deliverer.begin(self.envelope("alice@example.org")))
                for _ in range(2)]  # the refills wait in the threads
        d = self.deliverer.begin(self.envelope("alice@example.org"))
        self.assertNoResult(d)
        self.run_threads()
        held.append(self.successResultOf(d))
        for transaction in held:
            self.commit(transaction)
        self.assertEqual(len(self.tmp()), 3)
        self.assertEqual(len(self.store.maildir(self.users.get("alice@example.org")).scan()),
                         4)

    def test_at_most_the_limit(self):
        for _ in range(3):
            self.commit(self.begin("alice@example.org", "bob@example.org",
                                   "carol@example.net"))
        self.assertEqual(len(self.tmp()) + len(self.tmp("bob@example.org"))
                         + len(self.tmp("carol@example.net")), 4)

    def test_old_spares_are_removed_not_used(self):
        self.commit(self.begin("alice@example.org"))
        old = self.tmp()
        self.now += 61
        d = self.deliverer.begin(self.envelope("alice@example.org"))
        self.assertNoResult(d)
        self.run_threads()  # removes the old ones, makes new ones
        transaction = self.successResultOf(d)
        self.assertNotIn(transaction._copies[0][1].unique, old)
        self.commit(transaction)
        self.assertEqual(len(self.tmp()), 3)
        self.assertEqual(set(self.tmp()) & set(old), set())

    def test_old_spares_of_a_quiet_user_make_room_for_others(self):
        self.commit(self.begin("alice@example.org", "bob@example.org"))
        self.commit(self.begin("alice@example.org", "bob@example.org"))  # the limit: 4
        self.assertEqual(len(self.tmp()) + len(self.tmp("bob@example.org")), 4)
        self.now += 61  # alice and bob get no more mail; carol does
        self.commit(self.begin("carol@example.net"))  # the old ones are removed
        self.assertEqual(self.tmp() + self.tmp("bob@example.org"), [])
        self.assertEqual(len(self.tmp("carol@example.net")), 2)
        d = self.deliverer.begin(self.envelope("carol@example.net"))
        self.successResultOf(d)  # from a spare

    def test_close_removes_the_spares(self):
        self.commit(self.begin("alice@example.org"))
        d = self.deliverer.begin(self.envelope("bob@example.org"))
        self.threads.run_next()  # bob's files; his spares are still being made
        transaction = self.successResultOf(d)
        self.deliverer.close()
        self.assertEqual(self.tmp(), [])
        self.run_threads()
        self.assertEqual(self.tmp("bob@example.org"), [transaction._copies[0][1].unique])
        self.commit(transaction)  # a delivery under way is not disturbed
        self.assertEqual(self.tmp() + self.tmp("bob@example.org"), [])
        self.assertEqual(len(self.store.maildir(self.users.get("bob@example.org")).scan()), 1)
        # Every later message gets its files in a thread call of its own.
        d = self.deliverer.begin(self.envelope("bob@example.org"))
        [(_, f, _)] = self.threads.calls
        self.assertIsNot(f, delivery.make_spares)
        self.run_threads()
        self.commit(self.successResultOf(d))
        self.assertEqual(self.tmp("bob@example.org"), [])

    def test_failure_to_make_spares_is_logged_once_and_harmless(self):
        real_make = delivery.make_spares

        def full(store, wanted, stale):
            created, _ = real_make(store, wanted[:0], stale)
            return created, OSError(28, "No space left on device")

        self.patch(delivery, "make_spares", full)
        with capturedLogs() as events:
            for _ in range(3):
                self.commit(self.begin("alice@example.org"))
        errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(errors, ["cannot make spare message files: [Errno 28] No space left "
                                  "on device"])
        self.assertEqual(self.tmp(), [])
        self.assertEqual(len(self.store.maildir(self.users.get("alice@example.org")).scan()),
                         3)


class FaultTests(UsersFixture, TestCase):
    """Issue 12: storage faults and an unusable users file get temporary replies, and
    a line in the log at a bounded rate, never a traceback."""

    def test_users_file_never_loaded_is_a_temporary_refusal(self):
        with open(self.users_file, "wb") as f:
            f.write(b"")
        router = Router(self.make_config(), UserDB(self.users_file))
        for resolution in (router.resolve(parse_path("<alice@example.org>")),
                           router.resolve_postmaster()):
            self.assertEqual(resolution.refusal, USERS_UNAVAILABLE)
            self.assertEqual(resolution.refusal.code // 100, 4)

    def test_storage_refusal_codes_and_one_line_per_cause(self):
        clock = Clock()
        limiter = LogLimiter(clock, interval=60)
        full = OSError(errno.ENOSPC, "No space left on device")
        with capturedLogs() as events:
            replies = [storage_refusal(full, limiter) for _ in range(100)]
            replies.append(storage_refusal(OSError(errno.EDQUOT, "Disk quota exceeded"),
                                           limiter))
            other = storage_refusal(OSError(errno.EIO, "Input/output error"), limiter)
            clock.advance(60)
            storage_refusal(full, limiter)
        self.assertEqual({(r.code, r.enhanced) for r in replies}, {(452, "4.3.1")})
        self.assertEqual((other.code, other.enhanced), (451, "4.3.0"))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("No space left on device", lines[0])
        self.assertFalse(any(e.get("log_failure") for e in events))

    def test_a_write_error_is_not_logged_per_message(self):
        store = MaildirStore(os.path.join(self.data_dir, "mail"), "mx.example.net")
        deliverer = Deliverer(store, synchronous, hostname="mx.example.net", spares=0)
        user = self.users.get("alice@example.org")
        arrival = Arrival("s@remote.example", (Recipient("alice@example.org", (user,)),),
                          "client.example", "192.0.2.1", "ESMTP")
        transaction = self.successResultOf(deliverer.begin(arrival))
        [(_, message)] = transaction._copies
        self.patch(message, "write", _disk_full)
        with capturedLogs() as events:
            transaction.write(b"x\n")
            self.failureResultOf(transaction.finish(), OSError)
        self.assertEqual(events, [])
        self.assertFalse(os.path.exists(message.tmp_path))

    def test_vanished_tmp_file_is_written_again(self):
        """A clean-up script removed the tmp/ file before the rename: the message is
        still delivered, whole, from the open file, with one warning."""
        store = MaildirStore(os.path.join(self.data_dir, "mail"), "mx.example.net")
        maildir_ = store.maildir(self.users.get("alice@example.org"))
        message = store.new_message(maildir_)
        body = b"Subject: x\n\n" + b"y" * (3 * (1 << 20)) + b"\n"
        message.write(body)
        message.flush()
        os.unlink(message.tmp_path)
        with capturedLogs() as events:
            self.successResultOf(GroupCommitter(synchronous).commit([message]))
        [info] = maildir_.scan()
        with open(info.path, "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(os.listdir(os.path.join(maildir_.path, "tmp")), [])
        [line] = [formatEvent(e) for e in events]
        self.assertIn("was removed by another program before delivery; written again", line)


def _disk_full(data):
    raise OSError(errno.ENOSPC, "No space left on device")
