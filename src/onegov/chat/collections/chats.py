"""The queries the views and the websocket server need.

Every query is bound to one tenant: a chat of another tenant is not
found, whatever its id.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, func, insert, select, text, update
from sqlalchemy.orm import Session

from onegov.chat.models import Chat, ChatState, Message, User
from onegov.chat.models.base import utcnow
from onegov.chat.models.chat import message_dict


@dataclass(frozen=True)
class StoredMessage:
    """The outcome of storing a message."""

    message: dict[str, Any]
    duplicate: bool


class ChatCollection:
    """The chats of one tenant."""

    def __init__(self, session: Session, application_id: str) -> None:
        self.session = session
        self.application_id = application_id

    def _query(self) -> Any:
        return select(Chat).where(Chat.application_id == self.application_id)

    def by_id(self, chat_id: Any) -> Chat | None:
        if not isinstance(chat_id, str) or len(chat_id) != 32:
            return None
        return self.session.scalars(
            self._query().where(Chat.id == chat_id)
        ).one_or_none()

    def waiting(self) -> Sequence[Chat]:
        return self.session.scalars(
            self._query()
            .where(Chat.state == ChatState.waiting)
            .order_by(Chat.created)
        ).all()

    def position(self, chat: Chat) -> int:
        """The place of a waiting chat in the queue (1 is next), else 0."""
        if chat.state != ChatState.waiting:
            return 0
        ahead = self.session.scalar(
            select(func.count())
            .select_from(Chat)
            .where(Chat.application_id == self.application_id)
            .where(Chat.state == ChatState.waiting)
            .where(Chat.created < chat.created)
        )
        return int(ahead or 0) + 1

    def active(self, staff_id: int | None = None) -> Sequence[Chat]:
        query = self._query().where(Chat.state == ChatState.active)
        if staff_id is not None:
            query = query.where(Chat.staff_id == staff_id)
        return self.session.scalars(query.order_by(Chat.accepted)).all()

    def archived(self) -> Sequence[Chat]:
        return self.session.scalars(
            self._query()
            .where(Chat.state == ChatState.ended)
            .order_by(Chat.ended.desc())
        ).all()

    def add(
        self, customer_name: str, customer_email: str, topic: str
    ) -> Chat:
        chat = Chat(
            application_id=self.application_id,
            customer_name=customer_name,
            customer_email=customer_email,
            topic=topic,
            state=ChatState.waiting,
            last_seq=0,
        )
        self.session.add(chat)
        self.session.flush()
        return chat

    def claim(self, chat_id: str, staff_id: int, staff_name: str) -> bool:
        """Take a waiting chat; True for exactly one of many claims.

        The state is checked and changed in one ``UPDATE``, so two staff
        members who accept the same chat at once cannot both succeed.

        """
        result = self.session.execute(
            update(Chat)
            .where(Chat.id == chat_id)
            .where(Chat.application_id == self.application_id)
            .where(Chat.state == ChatState.waiting)
            .values(
                state=ChatState.active, staff_id=staff_id,
                staff_name=staff_name, accepted=utcnow(),
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def end(self, chat_id: str, staff_id: int | None = None) -> bool:
        """End an open chat (of `staff_id` if given); True if it ended."""
        query = (
            update(Chat)
            .where(Chat.id == chat_id)
            .where(Chat.application_id == self.application_id)
            .where(Chat.state != ChatState.ended)
        )
        if staff_id is not None:
            query = query.where(Chat.staff_id == staff_id)
        result = self.session.execute(
            query.values(state=ChatState.ended, ended=utcnow())
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def messages_after(
        self, chat_id: str, seq: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        rows = self.session.scalars(
            select(Message)
            .where(Message.chat_id == chat_id)
            .where(Message.seq > seq)
            .order_by(Message.seq)
            .limit(limit)
        ).all()
        return [row.as_dict() for row in rows]

    def purge(self, older_than: datetime) -> int:
        """Delete ended chats that ended before `older_than`."""
        chats = self.session.scalars(
            self._query()
            .where(Chat.state == ChatState.ended)
            .where(Chat.ended < older_than)
        ).all()
        for chat in chats:
            self.session.delete(chat)
        return len(chats)


@dataclass(frozen=True)
class NewMessage:
    """A message to store, with who sent it, from the server session."""

    tenant: str
    chat_id: str
    role: str
    user_id: Any
    staff_name: str
    text: str
    client_id: str


#: Why a message was not stored: the chat is unknown to the sender, it
#: waits for staff to accept it, or it has ended.
Refusal = str


def store_messages(
    session: Session, messages: Sequence[NewMessage]
) -> list[StoredMessage | Refusal]:
    """Store `messages` in one transaction, in order; return each outcome.

    A message whose `client_id` is known from the same side (`role`) is
    not stored again: the stored one is returned, marked as duplicate.
    The next sequence number is taken with an ``UPDATE ... RETURNING`` on
    the chat row, which locks it until the commit, so numbers are
    gap-free across processes. Nothing is acknowledged before the commit,
    so a failed commit loses nothing a client was told was stored.

    The statements are plain SQL, built once: on this path, building
    SQLAlchemy expressions for every message cost more than running them.

    Raises:
        IntegrityError: when another process stored one of the same
            client ids at the same moment; store the messages one by one
            then.

    """
    connection = session.connection()
    outcomes: list[StoredMessage | Refusal] = []
    rows: list[dict[str, Any]] = []
    batch: dict[tuple[str, str, str], StoredMessage] = {}

    for new in messages:
        key = (new.chat_id, new.role, new.client_id)
        if key in batch:
            # Sent twice within one batch: the second is the duplicate.
            outcomes.append(StoredMessage(batch[key].message, True))
            continue
        staff = new.role == 'staff'
        params = {
            'chat': new.chat_id, 'tenant': new.tenant, 'role': new.role,
            'client_id': new.client_id, 'user': new.user_id,
        }

        known = connection.execute(
            _KNOWN_BY_STAFF if staff else _KNOWN, params
        ).one_or_none()
        if known is not None:
            seq, name, body, created = known
            outcomes.append(StoredMessage(message_dict(
                new.chat_id, seq, new.role, name, body, new.client_id,
                created,
            ), duplicate=True))
            continue

        numbered = connection.execute(
            _NEXT_BY_STAFF if staff else _NEXT, params
        ).one_or_none()
        if numbered is None:
            outcomes.append(_refusal(connection, new))
            continue

        seq, customer_name = numbered
        name = new.staff_name if staff else customer_name
        created = utcnow()
        rows.append({
            'chat_id': new.chat_id, 'seq': seq, 'role': new.role,
            'sender_name': name, 'text': new.text,
            'client_id': new.client_id, 'created': created,
        })
        stored = StoredMessage(message_dict(
            new.chat_id, seq, new.role, name, new.text, new.client_id,
            created,
        ), duplicate=False)
        batch[key] = stored
        outcomes.append(stored)

    if rows:
        connection.execute(_INSERT, rows)
    session.commit()
    return outcomes


def _refusal(connection: Any, new: NewMessage) -> Refusal:
    """Why `new` could not be numbered (the rare path)."""
    chat = connection.execute(_CHAT, {
        'chat': new.chat_id, 'tenant': new.tenant,
    }).one_or_none()
    if chat is None:
        return 'not_found'
    state, staff_id = chat
    if new.role == 'staff':
        if state == ChatState.waiting.name:
            # Every staff member of the tenant sees waiting chats.
            return 'not_active'
        if staff_id != new.user_id:
            return 'not_found'
    return 'chat_ended'


# The statements of `store_messages`. A chat's state is stored by the
# name of its `ChatState`.

_KNOWN = text(
    'SELECT m.seq, m.sender_name, m.text, m.created'
    ' FROM chat_messages m JOIN chats c ON c.id = m.chat_id'
    ' WHERE m.chat_id = :chat AND m.role = :role'
    ' AND m.client_id = :client_id AND c.application_id = :tenant'
).columns(created=DateTime(timezone=True))

_KNOWN_BY_STAFF = text(
    'SELECT m.seq, m.sender_name, m.text, m.created'
    ' FROM chat_messages m JOIN chats c ON c.id = m.chat_id'
    ' WHERE m.chat_id = :chat AND m.role = :role'
    ' AND m.client_id = :client_id AND c.application_id = :tenant'
    ' AND c.staff_id = :user'
).columns(created=DateTime(timezone=True))

_NEXT = text(
    'UPDATE chats SET last_seq = last_seq + 1'
    " WHERE id = :chat AND application_id = :tenant AND state != 'ended'"
    ' RETURNING last_seq, customer_name'
)

_NEXT_BY_STAFF = text(
    'UPDATE chats SET last_seq = last_seq + 1'
    " WHERE id = :chat AND application_id = :tenant AND state = 'active'"
    ' AND staff_id = :user'
    ' RETURNING last_seq, customer_name'
)

_INSERT = insert(Message)

_CHAT = text(
    'SELECT state, staff_id FROM chats'
    ' WHERE id = :chat AND application_id = :tenant'
)


class UserCollection:
    """The staff accounts of one tenant."""

    def __init__(self, session: Session, application_id: str) -> None:
        self.session = session
        self.application_id = application_id

    def by_username(self, username: str) -> User | None:
        return self.session.scalars(
            select(User)
            .where(User.application_id == self.application_id)
            .where(User.username == username)
        ).one_or_none()

    def by_id(self, user_id: Any) -> User | None:
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            return None
        return self.session.scalars(
            select(User)
            .where(User.application_id == self.application_id)
            .where(User.id == user_id)
        ).one_or_none()

    def add(
        self,
        username: str,
        display_name: str,
        password: str,
        role: str = 'staff',
    ) -> User:
        if not username or len(username) > 255:
            raise ValueError('a username needs 1 to 255 characters')
        if self.by_username(username) is not None:
            raise ValueError(f'the user {username!r} exists already')
        user = User(
            application_id=self.application_id,
            username=username,
            display_name=display_name or username,
            role=role,
        )
        user.set_password(password)
        self.session.add(user)
        self.session.flush()
        return user
