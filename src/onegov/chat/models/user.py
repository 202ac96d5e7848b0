"""Staff accounts."""

from __future__ import annotations

from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from onegov.chat.models.base import Base, utcnow

_hasher = PasswordHasher()

#: A hash to verify against when the user does not exist, so that the
#: answer takes as long as for a real user.
_DUMMY_HASH = _hasher.hash('not a password of anyone')


class User(Base):
    """A staff member of one tenant."""

    __tablename__ = 'chat_users'
    __table_args__ = (UniqueConstraint('application_id', 'username'),)

    #: The primary key.
    id: Mapped[int] = mapped_column(primary_key=True)

    #: The tenant the account belongs to.
    application_id: Mapped[str] = mapped_column(String(255), index=True)

    #: The login name, unique per tenant.
    username: Mapped[str] = mapped_column(String(255))

    #: The name customers see.
    display_name: Mapped[str] = mapped_column(String(255))

    #: The argon2 hash of the password; the password itself is never kept.
    password_hash: Mapped[str] = mapped_column(String(255))

    #: The role put into the session at login.
    role: Mapped[str] = mapped_column(String(32), default='staff')

    #: When the account was created.
    created: Mapped[datetime] = mapped_column(default=utcnow)

    def set_password(self, password: str) -> None:
        if not isinstance(password, str) or len(password) < 8:
            raise ValueError('a password needs at least 8 characters')
        self.password_hash = _hasher.hash(password)

    def check_password(self, password: str) -> bool:
        try:
            return _hasher.verify(self.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


def burn_password_check(password: str) -> None:
    """Spend the time of a password check for a user that does not exist."""
    try:
        _hasher.verify(_DUMMY_HASH, password)
    except VerificationError:
        pass
