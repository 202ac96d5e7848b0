"""Chats and their messages.

Every message is a row of its own, numbered per chat by `Message.seq`:
strictly increasing and without gaps, so that a client that knows the
last number it has seen can ask for exactly what came after it.

"""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from onegov.chat.models.base import Base, utcnow


class ChatState(enum.StrEnum):
    """Where a chat stands."""

    #: The customer asked; no staff member took the chat yet.
    waiting = 'waiting'

    #: A staff member took the chat; both talk.
    active = 'active'

    #: The chat is closed and kept in the archive.
    ended = 'ended'


def new_chat_id() -> str:
    return secrets.token_hex(16)


class Chat(Base):
    """One conversation between a customer and a staff member."""

    __tablename__ = 'chats'

    #: A random id: knowing one chat's id tells nothing of another's.
    id: Mapped[str] = mapped_column(
        String(32), primary_key=True, default=new_chat_id
    )

    #: The tenant the chat belongs to.
    application_id: Mapped[str] = mapped_column(String(255), index=True)

    #: What the customer gave as name, e-mail and topic.
    customer_name: Mapped[str] = mapped_column(String(255))
    customer_email: Mapped[str] = mapped_column(String(255))
    topic: Mapped[str] = mapped_column(String(255))

    #: Waiting, active or ended.
    state: Mapped[ChatState] = mapped_column(
        Enum(ChatState, native_enum=False, length=16),
        default=ChatState.waiting, index=True,
    )

    #: The staff member who took the chat, and the name shown for them.
    staff_id: Mapped[int | None] = mapped_column(
        ForeignKey('chat_users.id', ondelete='SET NULL'), default=None
    )
    staff_name: Mapped[str | None] = mapped_column(
        String(255), default=None
    )

    #: The sequence number of the last message; the next one gets +1.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)

    #: When the chat was asked for, taken and ended.
    created: Mapped[datetime] = mapped_column(default=utcnow)
    accepted: Mapped[datetime | None] = mapped_column(default=None)
    ended: Mapped[datetime | None] = mapped_column(default=None)

    messages: Mapped[list[Message]] = relationship(
        back_populates='chat', order_by='Message.seq',
        cascade='all, delete-orphan', passive_deletes=True,
    )

    def as_dict(self) -> dict[str, Any]:
        """What clients learn of the chat (no e-mail address)."""
        return {
            'id': self.id,
            'customer_name': self.customer_name,
            'topic': self.topic,
            'state': self.state.value,
            'staff_name': self.staff_name,
            'created': self.created.isoformat(),
            'last_seq': self.last_seq,
        }


class Message(Base):
    """One message of a chat, stored as it was sent."""

    __tablename__ = 'chat_messages'
    __table_args__ = (
        UniqueConstraint('chat_id', 'seq'),
        # Each side picks its own message ids: the same id from the
        # customer and from staff are two messages.
        UniqueConstraint('chat_id', 'role', 'client_id'),
    )

    #: The primary key.
    id: Mapped[int] = mapped_column(primary_key=True)

    #: The chat the message belongs to.
    chat_id: Mapped[str] = mapped_column(
        ForeignKey('chats.id', ondelete='CASCADE')
    )

    #: The message's number in its chat: 1, 2, 3, …, without gaps.
    seq: Mapped[int] = mapped_column(Integer)

    #: The sender's role and display name, from the server-side session
    #: and the database, never from the client.
    role: Mapped[str] = mapped_column(String(32))
    sender_name: Mapped[str] = mapped_column(String(255))

    #: The text exactly as sent; it is escaped where it is rendered.
    text: Mapped[str] = mapped_column(Text)

    #: The id the sender gave the message, to store a re-sent one once.
    client_id: Mapped[str] = mapped_column(String(64))

    #: When the server stored the message.
    created: Mapped[datetime] = mapped_column(default=utcnow)

    chat: Mapped[Chat] = relationship(back_populates='messages')

    def as_dict(self) -> dict[str, Any]:
        return message_dict(
            self.chat_id, self.seq, self.role, self.sender_name, self.text,
            self.client_id, self.created,
        )


def message_dict(
    chat_id: str,
    seq: int,
    role: str,
    name: str,
    text: str,
    client_id: str,
    created: datetime,
) -> dict[str, Any]:
    """A message as clients receive it."""
    if created.tzinfo is None:
        # SQLite gives back what it was given, without the offset.
        created = created.replace(tzinfo=UTC)
    return {
        'type': 'message',
        'chat_id': chat_id,
        'seq': seq,
        'role': role,
        'name': name,
        'text': text,
        'client_id': client_id,
        'time': created.isoformat(),
    }
