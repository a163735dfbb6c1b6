"""The realm behind SMTP AUTH: a login there yields only who the user is.

POP3's realm opens (and locks) a maildrop; submission needs nothing but the authenticated
user's normalised name, to decide which senders the user may use.  The portal built with
:class:`AccountRealm` uses the same :class:`~popgate.auth.users.PasswordChecker` as POP3,
and :class:`~popgate.auth.login.Authenticator` the same penalties and bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from popgate.auth.users import UserDB


class IAccount(Interface):
    """An authenticated user, as submission sees one."""

    name = Attribute("The normalised user name (local@domain).")


@implementer(IAccount)
@dataclass(frozen=True)
class Account:
    name: str


@implementer(IRealm)
class AccountRealm:
    """Fires with ``(IAccount, Account, logout)``; a user removed since the password
    check is refused like a wrong password."""

    def __init__(self, users: UserDB):
        self._users = users

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IAccount not in interfaces:
            return defer.fail(NotImplementedError("this realm only serves IAccount"))
        if self._users.get(avatarId) is None:
            return defer.fail(UnauthorizedLogin())
        return defer.succeed((IAccount, Account(avatarId), lambda: None))
