"""What a benchmark needs before it starts: sessions, tokens and chats.

Everything is written with the code the web app runs, straight into the
store and the database, so that issuing a token is not part of any
measurement:

* a session is a `BrowserSession` flushed to the store, its token put
  there by `store_websocket_token` and its cookie signed by
  `CookieSigner`, as ``GET /chat/token`` does;
* a staff member's session holds what the login view puts in it, a
  customer's the id of the chat the customer form started;
* staff accounts and chats come from `UserCollection` and
  `ChatCollection`, and each chat is claimed by a staff member as the
  ``accept`` command does, so that both sides may talk at once.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.orm import Session

from onegov.chat.collections import ChatCollection, UserCollection
from onegov.chat.database import create_database_engine
from onegov.chat.framework import schema_for
from onegov.chat.integration import WEBSOCKET_PATH
from onegov.chat.security import new_websocket_token, store_websocket_token
from onegov.chat.session import (
    COOKIE_NAME,
    BrowserSession,
    CookieSigner,
    store_from_url,
)

try:
    from onegov.chat.database import create_tables
except ImportError:  # before it moved there from the service
    from onegov.chat.service import (  # type: ignore[attr-defined,no-redef]
        create_tables,
    )

#: How long a prepared token stays good: longer than any run.
TOKEN_TTL = 3600.0

#: The staff accounts the chats are spread over.
STAFF_ACCOUNTS = 4


@dataclass(frozen=True)
class Room:
    """A chat and who talks in it: the customer first, then staff."""

    chat_id: str
    members: list[dict[str, Any]]


class Preparer:
    """Writes sessions and chats for one chat server configuration."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.application_id: str = settings['application_id']
        self.schema = schema_for(self.application_id)
        self.store = store_from_url(settings['session_store'])
        self.signer = CookieSigner(
            settings['identity_secret'], self.application_id
        )
        self.dsn: str = settings['dsn']

    def close(self) -> None:
        self.store.close()

    def session(self, **data: Any) -> dict[str, Any]:
        """A new session holding `data` and one token; what the client
        needs to present them: the path, with the token, and the
        cookie."""
        session = BrowserSession(self.store, self.application_id)
        for key, value in data.items():
            session[key] = value
        token = new_websocket_token()
        store_websocket_token(session, token, ttl=TOKEN_TTL)
        session.flush()
        if session.session_id is None:
            raise RuntimeError('the session was not written')

        query = urlencode({'token': token, 'schema': self.schema})
        cookie = self.signer.sign(session.session_id)
        return {
            'path': f'{WEBSOCKET_PATH}?{query}',
            'cookie': f'{COOKIE_NAME}={cookie}',
        }

    def visitors(self, count: int) -> list[dict[str, Any]]:
        """Sessions of visitors who fetched a token and nothing else."""
        return [self.session() for _ in range(count)]

    def rooms(self, sizes: list[int]) -> list[Room]:
        """One active chat per size: a customer and size - 1 staff
        connections (each a login of its own) of the staff member who
        took the chat."""
        engine = create_database_engine(self.dsn)
        try:
            create_tables(engine)
            with Session(engine, expire_on_commit=False) as db:
                staff = self._staff(db)
                chats = ChatCollection(db, self.application_id)
                taken = []
                for number, size in enumerate(sizes):
                    member = staff[number % len(staff)]
                    chat = chats.add(
                        f'Customer {number}', f'c{number}@example.org',
                        'Building permit',
                    )
                    chats.claim(chat.id, member[0], member[1])
                    taken.append((chat.id, member, size))
                db.commit()
        finally:
            engine.dispose()

        rooms = []
        for chat_id, (user_id, name), size in taken:
            members = [{
                **self.session(chat_id=chat_id),
                'join': {'type': 'join', 'last_seq': 0},
                'chat_id': None,
            }]
            for _ in range(size - 1):
                members.append({
                    **self.session(user_id=user_id, role='staff', name=name),
                    'join': {
                        'type': 'join', 'chat_id': chat_id, 'last_seq': 0,
                    },
                    'chat_id': chat_id,
                })
            rooms.append(Room(chat_id, members))
        return rooms

    def _staff(self, db: Session) -> list[tuple[int, str]]:
        users = UserCollection(db, self.application_id)
        staff = []
        for number in range(STAFF_ACCOUNTS):
            name = f'Staff {number}'
            user = users.by_username(f'staff{number}') or users.add(
                f'staff{number}', name, 'benchmark password'
            )
            staff.append((user.id, name))
        return staff


def bare_rooms(sizes: list[int]) -> list[Room]:
    """The same rooms on the bare relay: no sessions, no joins."""
    return [
        Room(
            f'room{number}',
            [
                {'path': f'/?room=room{number}', 'cookie': None,
                 'join': None, 'chat_id': None}
                for _ in range(size)
            ],
        )
        for number, size in enumerate(sizes)
    ]


def bare_visitors(count: int, prefix: str) -> list[dict[str, Any]]:
    """Connections to the bare relay, each to a room of its own."""
    return [
        {'path': f'/?room={prefix}{number}', 'cookie': None}
        for number in range(count)
    ]
