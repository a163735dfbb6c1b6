"""Tests for popgate.addresses: user names and SMTP paths."""

from twisted.trial import unittest

from popgate.addresses import (
    MAX_PATH,
    AddressError,
    Mailbox,
    normalise_domain,
    normalise_user,
    parse_path,
    split_user,
)

# A domain of exactly 253 characters: three 63-character labels and one of 61.
DOMAIN_253 = ".".join(["b" * 63] * 3 + ["c" * 61])


class NormaliseUserTests(unittest.TestCase):
    def assertRefused(self, name, *fragments):
        """``name`` is refused with a message that contains every fragment."""
        with self.assertRaises(AddressError) as caught:
            normalise_user(name)
        message = str(caught.exception)
        self.assertTrue(message, "the refusal must say why")
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_plain_name_unchanged(self):
        self.assertEqual(normalise_user("alice@example.org"), "alice@example.org")

    def test_lowercased(self):
        self.assertEqual(normalise_user("Alice.Smith@Example.ORG"), "alice.smith@example.org")

    def test_allowed_characters(self):
        self.assertEqual(normalise_user("a.b-c_d9@mail-1.example.org"),
                         "a.b-c_d9@mail-1.example.org")

    def test_single_label_domain(self):
        self.assertEqual(normalise_user("root@localhost"), "root@localhost")

    def test_maximum_lengths_accepted(self):
        local = "x" * 64
        self.assertEqual(len(DOMAIN_253), 253)
        name = f"{local}@{DOMAIN_253}"
        self.assertEqual(normalise_user(name), name)
        self.assertEqual(normalise_user("a@" + "l" * 63 + ".org"), "a@" + "l" * 63 + ".org")

    def test_path_traversal(self):
        self.assertRefused("../x@a.b", "invalid local part", "'../x'")

    def test_slash(self):
        self.assertRefused("a/b@c.d", "invalid local part", "'a/b'")

    def test_slash_in_domain(self):
        self.assertRefused("a@c/../d", "invalid domain")

    def test_nul(self):
        self.assertRefused("a\0b@c.d", "printable ASCII")

    def test_control_characters(self):
        for char in ["\x01", "\x1b", "\x7f", "\r", "\n", "\x85"]:
            self.assertRefused(f"a{char}b@c.d")
            self.assertRefused(f"ab@c{char}.d")

    def test_tab(self):
        self.assertRefused("a\tb@c.d", "printable ASCII")

    def test_space(self):
        self.assertRefused("a b@c.d", "invalid local part")
        self.assertRefused("ab@c d.e", "invalid domain")
        self.assertRefused(" ab@c.d", "invalid local part")

    def test_empty_local(self):
        self.assertRefused("@c.d", "empty local part")

    def test_empty_domain(self):
        self.assertRefused("a@", "empty domain")

    def test_no_at(self):
        self.assertRefused("alice", "not of the form local@domain")

    def test_empty(self):
        self.assertRefused("", "not of the form local@domain")

    def test_two_ats(self):
        self.assertRefused("a@b@c.d", "invalid local part")

    def test_plus_reserved(self):
        self.assertRefused("a+tag@c.d", "'+' is reserved for sub-addresses")

    def test_leading_dot(self):
        self.assertRefused(".a@c.d", "invalid local part", "leading")

    def test_trailing_dot(self):
        self.assertRefused("a.@c.d", "invalid local part", "trailing")

    def test_double_dot(self):
        self.assertRefused("a..b@c.d", "invalid local part", "doubled dots")

    def test_local_too_long(self):
        self.assertRefused("x" * 65 + "@c.d", "local part longer than 64 characters")

    def test_domain_too_long(self):
        self.assertRefused("a@" + DOMAIN_253 + "c", "domain longer than 253 characters")

    def test_label_too_long(self):
        self.assertRefused("a@" + "l" * 64 + ".org", "invalid domain")

    def test_non_ascii(self):
        self.assertRefused("jos\u00e9@c.d", "printable ASCII")
        self.assertRefused("a@b\u00fccher.example", "printable ASCII")
        # A fullwidth "@" must not pass as a separator either.
        self.assertRefused("a\uff20c.d", "printable ASCII")

    def test_label_leading_hyphen(self):
        self.assertRefused("a@-b.c", "invalid domain", "'-b.c'")

    def test_label_trailing_hyphen(self):
        self.assertRefused("a@b-.c", "invalid domain")

    def test_empty_label(self):
        self.assertRefused("a@b..c", "invalid domain", "'b..c'")
        self.assertRefused("a@.b.c", "invalid domain")
        self.assertRefused("a@b.c.", "invalid domain")

    def test_underscore_in_domain(self):
        self.assertRefused("a@b_c.d", "invalid domain")

    def test_not_a_string(self):
        self.assertRaises(AddressError, normalise_user, b"alice@example.org")

    def test_refusal_is_a_value_error(self):
        """Callers that catch ValueError (argument parsers) see the refusal too."""
        self.assertRaises(ValueError, normalise_user, "../x@a.b")

    def test_split_user(self):
        self.assertEqual(split_user("alice@example.org"), ("alice", "example.org"))

    def test_normalise_domain(self):
        self.assertEqual(normalise_domain("Mail.Example.ORG"), "mail.example.org")
        self.assertRaises(AddressError, normalise_domain, "")


class ParsePathTests(unittest.TestCase):
    def assertRefused(self, path, fragment, utf8=False):
        with self.assertRaises(AddressError) as caught:
            parse_path(path, utf8=utf8)
        self.assertIn(fragment, str(caught.exception))

    def test_null_path(self):
        self.assertIsNone(parse_path("<>"))

    def test_simple(self):
        mailbox = parse_path("<alice@example.org>")
        self.assertEqual(mailbox, Mailbox("alice", "example.org"))
        self.assertEqual(str(mailbox), "alice@example.org")
        self.assertFalse(mailbox.has_relay_hack)
        self.assertFalse(mailbox.is_literal)

    def test_domain_lowercased_local_kept(self):
        mailbox = parse_path("<Alice@Example.ORG>")
        self.assertEqual(mailbox.local, "Alice")
        self.assertEqual(mailbox.domain, "example.org")

    def test_plus_and_atext_allowed(self):
        mailbox = parse_path("<a+tag.x-y_z=1@example.org>")
        self.assertEqual(mailbox.local, "a+tag.x-y_z=1")
        self.assertFalse(mailbox.has_relay_hack)

    def test_source_route(self):
        mailbox = parse_path("<@relay.example,@other.example:bob@example.org>")
        self.assertTrue(mailbox.routed)
        self.assertTrue(mailbox.has_relay_hack)
        self.assertEqual(str(mailbox), "bob@example.org")

    def test_malformed_source_route(self):
        self.assertRefused("<@relay.example>", "malformed source route")

    def test_percent_hack(self):
        mailbox = parse_path("<bob%victim.example@example.org>")
        self.assertTrue(mailbox.has_relay_hack)

    def test_bang_path(self):
        mailbox = parse_path("<victim.example!bob@example.org>")
        self.assertTrue(mailbox.has_relay_hack)

    def test_quoted_at(self):
        mailbox = parse_path('<"bob@victim.example"@example.org>')
        self.assertTrue(mailbox.quoted)
        self.assertTrue(mailbox.has_relay_hack)
        self.assertEqual(mailbox.domain, "example.org")

    def test_malformed_quoted(self):
        self.assertRefused('<"bob@example.org>', "malformed")
        self.assertRefused('<"a"b"@example.org>', "malformed quoted local part")

    def test_address_literal_ipv4(self):
        mailbox = parse_path("<postmaster@[192.0.2.1]>")
        self.assertTrue(mailbox.is_literal)
        self.assertEqual(mailbox.domain, "[192.0.2.1]")

    def test_address_literal_ipv6(self):
        mailbox = parse_path("<postmaster@[IPv6:2001:db8::1]>")
        self.assertTrue(mailbox.is_literal)
        self.assertEqual(mailbox.domain, "[IPv6:2001:db8::1]")

    def test_empty_address_literal(self):
        self.assertRefused("<a@[]>", "invalid domain")

    def test_missing_brackets(self):
        self.assertRefused("alice@example.org", "enclosed in <>")
        self.assertRefused("<alice@example.org", "enclosed in <>")
        self.assertRefused("alice@example.org>", "enclosed in <>")
        self.assertRefused("", "enclosed in <>")

    def test_not_an_address(self):
        self.assertRefused("<alice>", "local-part@domain")
        self.assertRefused("<@example.org:>", "local-part@domain")
        self.assertRefused("<alice@>", "local-part@domain")
        self.assertRefused("<@example.org>", "source route")

    def test_bad_domain(self):
        self.assertRefused("<a@b..c>", "invalid domain")
        self.assertRefused("<a@-b.c>", "invalid domain")
        self.assertRefused("<a@b_c.d>", "invalid domain")

    def test_bad_local(self):
        self.assertRefused("<a b@example.org>", "malformed local part")
        self.assertRefused("<.a@example.org>", "malformed local part")
        self.assertRefused("<a..b@example.org>", "malformed local part")
        self.assertRefused("<a\x7fb@example.org>", "malformed local part")
        self.assertRefused("<a\0b@example.org>", "malformed local part")

    def test_non_ascii_needs_smtputf8(self):
        self.assertRefused("<j\u00f6rg@example.org>", "non-ASCII address without SMTPUTF8")
        self.assertRefused("<a@b\u00fccher.example>", "non-ASCII address without SMTPUTF8")

    def test_non_ascii_local_with_smtputf8(self):
        mailbox = parse_path("<j\u00f6rg@example.org>", utf8=True)
        self.assertEqual(mailbox.local, "j\u00f6rg")
        mailbox = parse_path("<\u7528\u6237@example.org>", utf8=True)
        self.assertEqual(mailbox.local, "\u7528\u6237")

    def test_idn_domain_to_a_label(self):
        mailbox = parse_path("<anna@B\u00fccher.Example>", utf8=True)
        self.assertEqual(mailbox.domain, "xn--bcher-kva.example")
        self.assertEqual(str(mailbox), "anna@xn--bcher-kva.example")

    def test_invalid_idn(self):
        self.assertRefused("<a@" + "\u00fc" * 70 + ".example>", "internationalised domain",
                           utf8=True)

    def test_local_part_too_long(self):
        self.assertEqual(parse_path("<" + "x" * 64 + "@example.org>").local, "x" * 64)
        self.assertRefused("<" + "x" * 65 + "@example.org>", "local part too long")

    def test_local_part_length_in_octets(self):
        # 33 two-octet characters: 33 characters but 66 octets.
        self.assertRefused("<" + "\u00e9" * 33 + "@example.org>", "local part too long",
                           utf8=True)

    def test_path_too_long(self):
        local = "x" * 64
        domain = ".".join(["d" * 63, "d" * 63, "d" * 61])
        path = f"<{local}@{domain}>"
        self.assertEqual(len(path), 256)
        self.assertEqual(str(parse_path(path)), f"{local}@{domain}")
        self.assertRefused("<" + "x" * 64 + "@" + "d" * (MAX_PATH - 66) + ">", "path too long")
        self.assertRefused("<" + "a" * 300 + ">", "path too long")
