"""The chat behind the handshake: customers, staff, messages, fan-out.

One `ChatService` runs in each ``onegov-chat serve`` process. Each
admitted connection becomes a `Client` with a bounded send queue and a
writer task, so a slow reader never delays the others. Database and
session-store calls run in threads, so a slow write in one chat never
delays delivery in another.

Delivery is exact: each client keeps, per chat, the sequence number of
the last message it was sent. Live messages at or below it are dropped,
and a gap is filled from the database before anything after it is sent.

"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from onegov.chat.collections.chats import (
    ChatCollection,
    StoredMessage,
    UserCollection,
    store_message,
)
from onegov.chat.config import Config
from onegov.chat.handshake import Principal
from onegov.chat.models import Base, ChatState
from onegov.chat.protocol import (
    PROTOCOL_VERSION,
    STAFF_COMMANDS,
    Close,
    Command,
    ProtocolError,
    encode,
    parse_command,
)
from onegov.chat.session import SessionStore, SessionStoreError

logger = logging.getLogger('onegov.chat.service')

T = TypeVar('T')


class RateLimiter:
    """A token bucket: `rate` frames per `window` seconds, bursts allowed."""

    def __init__(self, rate: int, window: float) -> None:
        self.capacity = float(rate)
        self.refill = rate / window
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(
            self.capacity, self.tokens + (now - self.stamp) * self.refill
        )
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        return max(0.0, (1 - self.tokens) / self.refill)


class Client:
    """One admitted connection."""

    def __init__(
        self,
        connection: ServerConnection,
        principal: Principal,
        config: Config,
    ) -> None:
        self.connection = connection
        self.principal = principal
        self.queue: asyncio.Queue[str | _Closing] = asyncio.Queue(
            config.send_queue_size
        )
        self.limiter = RateLimiter(
            config.rate_limit, config.rate_limit_window
        )
        self.closing = False

        #: The last sequence number sent, per chat this client follows.
        self.seen: dict[str, int] = {}
        #: Live messages held back while a chat's history is sent.
        self.held: dict[str, list[tuple[int, str]]] = {}
        self.writer: asyncio.Task[None] | None = None

    @property
    def role(self) -> str:
        return self.principal.role

    @property
    def is_staff(self) -> bool:
        return self.role == 'staff'

    @property
    def tenant(self) -> str:
        return self.principal.application_id

    @property
    def user_id(self) -> Any:
        return self.principal.data.get('user_id')

    @property
    def own_chat(self) -> Any:
        return self.principal.data.get('chat_id')

    def send(self, payload: str) -> None:
        """Queue `payload`; close the connection if the queue is full."""
        if self.closing:
            return
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            logger.info(
                'event=client_too_slow tenant=%s role=%s',
                self.tenant, self.role,
            )
            self.close(Close.TOO_SLOW, 'too slow', flush=False)

    def reply(self, message: dict[str, Any]) -> None:
        self.send(encode(message))

    def close(self, code: int, reason: str, flush: bool = True) -> None:
        """Close the connection without waiting for it.

        With `flush`, what is queued is sent first; without it (a client
        too slow to read), the queue is dropped.

        """
        if self.closing:
            return
        self.closing = True
        if flush:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_Closing(code, reason))
                return
        if self.writer is not None:
            self.writer.cancel()
        asyncio.get_running_loop().create_task(
            self.connection.close(code, reason)
        )

    async def write(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if isinstance(item, _Closing):
                    await self.connection.close(item.code, item.reason)
                    return
                await self.connection.send(item)
            except ConnectionClosed:
                return


@dataclass(frozen=True)
class _Closing:
    """The last item of a send queue: close after what came before."""

    code: int
    reason: str


class Hub:
    """Fan-out inside this process: chat channels and staff channels."""

    def __init__(self) -> None:
        self.chats: dict[str, set[Client]] = defaultdict(set)
        self.staff: dict[str, set[Client]] = defaultdict(set)

    def follow(self, chat_id: str, client: Client) -> None:
        self.chats[chat_id].add(client)

    def unfollow(self, chat_id: str, client: Client) -> None:
        members = self.chats.get(chat_id)
        if members is not None:
            members.discard(client)
            if not members:
                del self.chats[chat_id]

    def members(self, chat_id: str) -> list[Client]:
        return list(self.chats.get(chat_id, ()))

    def staff_of(self, tenant: str) -> list[Client]:
        return list(self.staff.get(tenant, ()))


class ChatService:
    """The chat loop of one server process."""

    def __init__(self, config: Config, store: SessionStore) -> None:
        from onegov.chat.database import create_database_engine

        self.config = config
        self.store = store
        engine = create_database_engine(config.dsn)
        Base.metadata.create_all(engine)
        self.db: sessionmaker[Session] = sessionmaker(
            bind=engine, expire_on_commit=False
        )
        self.executor = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix='chat-db'
        )
        self.hub = Hub()
        self.clients: set[Client] = set()
        self.by_session: dict[tuple[str, str], set[Client]] = (
            defaultdict(set)
        )
        self.chat_locks: dict[str, asyncio.Lock] = {}
        self.liveness: asyncio.Task[None] | None = None

    # Plumbing ----------------------------------------------------------

    async def run_db(self, function: Callable[[Session], T]) -> T:
        """Run `function` with a database session, in a thread."""

        def work() -> T:
            with self.db() as session:
                return function(session)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, work)

    @contextlib.asynccontextmanager
    async def chat_lock(self, chat_id: str) -> AsyncIterator[None]:
        # Store and publish one message of a chat at a time in this
        # process, so that live messages leave in sequence order.
        lock = self.chat_locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            yield
        if not lock.locked() and self.chat_locks.get(chat_id) is lock:
            del self.chat_locks[chat_id]

    def start(self) -> None:
        self.liveness = asyncio.get_running_loop().create_task(
            self.check_liveness()
        )

    async def stop(self) -> None:
        if self.liveness is not None:
            self.liveness.cancel()
        self.executor.shutdown(wait=True)

    # Connections -------------------------------------------------------

    async def handle(
        self, connection: ServerConnection, principal: Principal
    ) -> None:
        """Serve one admitted connection until it closes."""
        client = Client(connection, principal, self.config)
        key = (principal.application_id, principal.session_id)
        siblings = self.by_session[key]
        if len(siblings) >= self.config.max_connections_per_session:
            logger.info(
                'event=connection_refused reason=too_many_connections '
                'tenant=%s role=%s', client.tenant, client.role,
            )
            await connection.close(
                Close.TOO_MANY_CONNECTIONS, 'too many connections'
            )
            return

        siblings.add(client)
        self.clients.add(client)
        client.writer = asyncio.get_running_loop().create_task(
            client.write()
        )
        try:
            if await self.greet(client):
                await self.read(client)
        finally:
            self.forget(client)
            await self.finish(client)

    async def finish(self, client: Client) -> None:
        """Let a closing client's writer send what is queued, briefly."""
        writer = client.writer
        if writer is None or writer.done():
            return
        if client.closing:
            with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
                await asyncio.wait_for(writer, timeout=5)
        writer.cancel()

    def forget(self, client: Client) -> None:
        key = (client.tenant, client.principal.session_id)
        self.by_session[key].discard(client)
        if not self.by_session[key]:
            del self.by_session[key]
        self.clients.discard(client)
        for chat_id in list(client.seen):
            self.hub.unfollow(chat_id, client)
        for chat_id in list(client.held):
            self.hub.unfollow(chat_id, client)
        staff = self.hub.staff.get(client.tenant)
        if staff is not None:
            staff.discard(client)
            if not staff:
                del self.hub.staff[client.tenant]

    async def greet(self, client: Client) -> bool:
        """Say hello; announce waiting chats to staff. False to close."""
        tenant = client.tenant
        hello: dict[str, Any] = {
            'type': 'hello',
            'protocol': PROTOCOL_VERSION,
            'role': client.role,
            'tenant': client.principal.schema,
        }

        if client.is_staff:
            user_id = client.user_id

            def load(session: Session) -> Any:
                user = UserCollection(session, tenant).by_id(user_id)
                if user is None:
                    return None
                chats = ChatCollection(session, tenant)
                return (
                    user.display_name,
                    [chat.as_dict() for chat in chats.waiting()],
                    [chat.as_dict() for chat in chats.active(user.id)],
                )

            found = await self.run_db(load)
            if found is None:
                client.close(Close.SESSION_ENDED, 'session ended')
                return False
            hello['name'], waiting, active = found
            hello['active'] = active
            client.reply(hello)
            self.hub.staff[tenant].add(client)
            for chat in waiting:
                client.reply({'type': 'request', 'chat': chat})
            return True

        chat_id = client.own_chat

        def load_chat(session: Session) -> Any:
            chat = ChatCollection(session, tenant).by_id(chat_id)
            return chat.as_dict() if chat is not None else None

        chat = await self.run_db(load_chat) if chat_id else None
        hello['chat'] = chat
        if chat is None:
            # A session without a chat may stay connected (the page may
            # offer to start one), but every command about a chat fails.
            client.reply(hello)
            return True
        client.reply(hello)
        if chat['state'] == ChatState.ended:
            client.close(Close.CHAT_ENDED, 'chat ended')
            return False
        if chat['state'] == ChatState.waiting:
            # Announce the request now that the customer is here; staff
            # who connect later get it in their greeting.
            for member in self.hub.staff_of(tenant):
                member.reply({'type': 'request', 'chat': chat})
        return True

    async def read(self, client: Client) -> None:
        connection = client.connection
        try:
            async for frame in connection:
                if client.closing:
                    return
                if isinstance(frame, bytes):
                    client.closing = True
                    await connection.close(
                        Close.UNSUPPORTED_DATA, 'binary frames not accepted'
                    )
                    return
                await self.dispatch(client, frame)
        except ConnectionClosed:
            return

    async def dispatch(self, client: Client, frame: str) -> None:
        """Answer one frame; never raises for anything a client sends."""
        if not client.limiter.allow():
            client.reply({
                'type': 'error', 'code': 'rate_limited',
                'message': 'too many messages, slow down',
                'retry_after': round(client.limiter.retry_after(), 3),
            })
            return
        try:
            command = parse_command(frame, self.config.max_text_length)
            if command.type in STAFF_COMMANDS and not client.is_staff:
                raise ProtocolError(
                    'forbidden', 'this command is for staff only',
                    command.type,
                )
            handler = getattr(self, f'on_{command.type}')
            await handler(client, command)
        except ProtocolError as error:
            client.reply(error.reply())
        except (SessionStoreError, OSError, SQLAlchemyError):
            # The database or the store is down: nothing was stored or
            # acknowledged, and the client keeps what it sent.
            logger.warning(
                'event=backend_unavailable tenant=%s', client.tenant,
                exc_info=True,
            )
            client.reply({
                'type': 'error', 'code': 'unavailable',
                'message': 'try again later',
            })

    def target(self, client: Client, command: Command) -> str:
        """The chat a command is about: a customer's own, always."""
        if not client.is_staff:
            # A customer is bound to the chat in its own session; any id
            # the client sends is ignored.
            if not isinstance(client.own_chat, str):
                raise ProtocolError('not_found', 'no chat started', ref(
                    command))
            return client.own_chat
        if command.chat_id is None:
            raise ProtocolError('bad_field', 'chat_id is required', ref(
                command))
        return command.chat_id

    async def visible_chat(
        self, client: Client, chat_id: str
    ) -> dict[str, Any]:
        """Return the chat if `client` may see it; refuse otherwise."""
        tenant, user_id, staff = client.tenant, client.user_id, client.is_staff

        def load(session: Session) -> Any:
            chat = ChatCollection(session, tenant).by_id(chat_id)
            if chat is None:
                return None
            if staff and chat.staff_id != user_id:
                return None
            return chat.as_dict()

        chat = await self.run_db(load)
        if chat is None:
            raise ProtocolError('not_found', 'no such chat', chat_id)
        return dict(chat)

    # Commands ----------------------------------------------------------

    async def on_ping(self, client: Client, command: Command) -> None:
        client.reply({'type': 'pong'})

    async def on_join(self, client: Client, command: Command) -> None:
        """Send what came after `last_seq`, then follow the chat live."""
        chat_id = self.target(client, command)
        chat = await self.visible_chat(client, chat_id)

        client.held[chat_id] = []
        client.seen.pop(chat_id, None)
        self.hub.follow(chat_id, client)
        client.reply({'type': 'joined', 'chat': chat})
        await self.catch_up(client, chat_id, command.last_seq)

    async def catch_up(
        self, client: Client, chat_id: str, after: int
    ) -> None:
        """Send the stored messages after `after`, then those held."""
        tenant = client.tenant
        while True:
            history = await self.run_db(functools.partial(
                _messages_after, tenant, chat_id, after
            ))
            for message in history:
                client.send(encode(message))
                after = message['seq']
            if len(history) < 1000:
                break

        held = client.held.pop(chat_id, [])
        client.seen[chat_id] = after
        for seq, payload in sorted(held):
            self.deliver(client, chat_id, seq, payload)

    def deliver(
        self, client: Client, chat_id: str, seq: int, payload: str
    ) -> None:
        """Send a live message exactly once and in order."""
        if chat_id in client.held:
            client.held[chat_id].append((seq, payload))
            return
        seen = client.seen.get(chat_id)
        if seen is None or seq <= seen:
            return
        if seq == seen + 1:
            client.seen[chat_id] = seq
            client.send(payload)
            return

        # A gap: another process stored the messages in between. Fetch
        # them from the database before sending anything newer.
        client.held[chat_id] = [(seq, payload)]
        asyncio.get_running_loop().create_task(
            self.catch_up(client, chat_id, seen)
        )

    async def on_message(self, client: Client, command: Command) -> None:
        chat_id = self.target(client, command)
        chat = await self.visible_chat(client, chat_id)
        if chat['state'] == ChatState.ended:
            raise ProtocolError('chat_ended', 'the chat has ended', ref(
                command))
        if client.is_staff and chat['state'] != ChatState.active:
            raise ProtocolError(
                'forbidden', 'accept the chat first', ref(command)
            )

        role = 'staff' if client.is_staff else 'customer'
        name = (
            client.principal.data.get('name') or 'Staff'
            if client.is_staff else chat['customer_name']
        )

        async with self.chat_lock(chat_id):
            try:
                stored: StoredMessage | None = await self.run_db(
                    lambda session: store_message(
                        session, chat_id, role, str(name), command.text,
                        command.client_id,
                    )
                )
            except (OSError, SQLAlchemyError):
                logger.warning(
                    'event=store_failed chat=%s', chat_id, exc_info=True
                )
                raise ProtocolError(
                    'unavailable', 'the message was not stored, send it '
                    'again', ref(command),
                ) from None
            if stored is None:
                raise ProtocolError(
                    'chat_ended', 'the chat has ended', ref(command)
                )

            message = stored.message
            client.reply({
                'type': 'ack', 'chat_id': chat_id,
                'client_id': message['client_id'], 'seq': message['seq'],
                'duplicate': stored.duplicate,
            })
            if not stored.duplicate:
                self.publish(chat_id, message)

    def publish(self, chat_id: str, message: dict[str, Any]) -> None:
        payload = encode(message)
        for member in self.hub.members(chat_id):
            self.deliver(member, chat_id, message['seq'], payload)

    def notify_chat(self, chat_id: str, message: dict[str, Any]) -> None:
        payload = encode(message)
        for member in self.hub.members(chat_id):
            member.send(payload)

    def notify_staff(self, tenant: str, message: dict[str, Any]) -> None:
        payload = encode(message)
        for member in self.hub.staff_of(tenant):
            member.send(payload)

    async def on_accept(self, client: Client, command: Command) -> None:
        chat_id = self.target(client, command)
        tenant, user_id = client.tenant, client.user_id
        name = str(client.principal.data.get('name') or 'Staff')

        def claim(session: Session) -> Any:
            chats = ChatCollection(session, tenant)
            if chats.by_id(chat_id) is None:
                return None
            won = chats.claim(chat_id, user_id, name)
            session.commit()
            chat = chats.by_id(chat_id)
            return won, chat.as_dict() if chat else None

        outcome = await self.run_db(claim)
        if outcome is None:
            raise ProtocolError('not_found', 'no such chat', chat_id)
        won, chat = outcome
        if not won:
            raise ProtocolError(
                'conflict', 'the chat was taken by someone else', chat_id
            )

        logger.info(
            'event=chat_accepted tenant=%s chat=%s', tenant, chat_id
        )
        client.reply({'type': 'accepted', 'chat': chat})
        self.notify_staff(tenant, {'type': 'taken', 'chat_id': chat_id})
        self.notify_chat(chat_id, {'type': 'state', 'chat': chat})

    async def on_end(self, client: Client, command: Command) -> None:
        chat_id = self.target(client, command)
        tenant, user_id = client.tenant, client.user_id

        def end(session: Session) -> Any:
            chats = ChatCollection(session, tenant)
            chat = chats.by_id(chat_id)
            if chat is None or chat.staff_id != user_id:
                return None
            ended = chats.end(chat_id, user_id)
            session.commit()
            session.refresh(chat)
            return ended, chat.as_dict()

        outcome = await self.run_db(end)
        if outcome is None:
            raise ProtocolError('not_found', 'no such chat', chat_id)
        ended, chat = outcome
        if not ended:
            raise ProtocolError(
                'chat_ended', 'the chat has ended already', chat_id
            )

        logger.info('event=chat_ended tenant=%s chat=%s', tenant, chat_id)
        client.reply({'type': 'ended', 'chat': chat})
        for member in self.hub.members(chat_id):
            member.reply({'type': 'state', 'chat': chat})
            if not member.is_staff:
                member.close(Close.CHAT_ENDED, 'chat ended')
            else:
                self.hub.unfollow(chat_id, member)
                member.seen.pop(chat_id, None)

    # Liveness ----------------------------------------------------------

    async def check_liveness(self) -> None:
        """Close the sockets of sessions that ended, now and then."""
        while True:
            await asyncio.sleep(self.config.liveness_interval)
            try:
                await self.sweep()
            except Exception:
                logger.error('event=liveness_failed', exc_info=True)

    async def sweep(self) -> None:
        for (tenant, session_id), clients in list(self.by_session.items()):
            try:
                data = await asyncio.to_thread(
                    self.store.load, tenant, session_id
                )
            except SessionStoreError:
                # The store is down: keep the connections; the next
                # sweep will tell.
                continue
            for client in list(clients):
                if not _still_valid(client.principal, data):
                    logger.info(
                        'event=session_ended tenant=%s role=%s',
                        tenant, client.role,
                    )
                    client.close(Close.SESSION_ENDED, 'session ended')


def _still_valid(principal: Principal, data: dict[str, Any]) -> bool:
    if not data:
        return False
    for key in ('role', 'user_id', 'chat_id'):
        if data.get(key) != principal.data.get(key):
            return False
    return True


def _messages_after(
    tenant: str, chat_id: str, after: int, session: Session
) -> list[dict[str, Any]]:
    return ChatCollection(session, tenant).messages_after(chat_id, after)


def ref(command: Command) -> str:
    return command.client_id or command.type
