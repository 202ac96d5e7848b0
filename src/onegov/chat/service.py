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
import json
import logging
import os
import secrets
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from onegov.chat.broker import LocalBroker, broker_from_url
from onegov.chat.collections.chats import (
    ChatCollection,
    NewMessage,
    Refusal,
    StoredMessage,
    UserCollection,
    store_messages,
)
from onegov.chat.config import Config
from onegov.chat.handshake import Principal
from onegov.chat.metrics import Metrics
from onegov.chat.models import ChatState
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


_background: set[asyncio.Task[Any]] = set()


def spawn(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run `coroutine` in the background, keeping a reference to it."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)


class RateLimiter:
    """A token bucket: `rate` frames per `window` seconds, bursts allowed."""

    __slots__ = ('capacity', 'refill', 'stamp', 'tokens')

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
    """One admitted connection.

    What is sent to it goes through a bounded queue, written by a task
    that runs only while the queue is not empty: an idle connection
    costs no task.

    """

    __slots__ = (
        'closing',
        'connection',
        'held',
        'limit',
        'limiter',
        'pending',
        'principal',
        'seen',
        'standing',
        'writer',
    )

    def __init__(
        self,
        connection: ServerConnection,
        principal: Principal,
        config: Config,
    ) -> None:
        self.connection = connection
        self.principal = principal
        self.pending: deque[str | _Closing] = deque()
        self.limit = config.send_queue_size
        self.limiter = RateLimiter(
            config.rate_limit, config.rate_limit_window
        )
        self.closing = False

        #: The last sequence number sent, per chat this client follows.
        self.seen: dict[str, int] = {}
        #: Live messages held back while a chat's history is sent.
        self.held: dict[str, list[tuple[int, str]]] = {}
        self.writer: asyncio.Task[None] | None = None
        #: The last queue position sent to a waiting customer.
        self.standing: dict[str, Any] = {}

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
        if len(self.pending) >= self.limit:
            logger.info(
                'event=client_too_slow tenant=%s role=%s',
                self.tenant, self.role,
            )
            self.close(Close.TOO_SLOW, 'too slow', flush=False)
            return
        self._enqueue(payload)

    def _enqueue(self, item: str | _Closing) -> None:
        self.pending.append(item)
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(
                self.write()
            )

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
            self._enqueue(_Closing(code, reason))
            return
        self.pending.clear()
        if self.writer is not None:
            self.writer.cancel()
        spawn(self.connection.close(code, reason))

    async def write(self) -> None:
        """Send what is queued, in order, then end."""
        try:
            while self.pending:
                item = self.pending.popleft()
                if isinstance(item, _Closing):
                    await self.connection.close(item.code, item.reason)
                    return
                await self.connection.send(item)
        except ConnectionClosed:
            self.pending.clear()
        finally:
            self.writer = None


@dataclass(frozen=True)
class _Closing:
    """The last item of a send queue: close after what came before."""

    code: int
    reason: str


class MessageWriter:
    """Stores messages in batches: one database trip for all that came
    in while the last trip was under way.

    Each message is acknowledged only after the transaction holding it
    committed. Outcomes are handed back in the order the messages came,
    so a chat's messages are published in sequence order.

    """

    #: The most messages stored in one transaction.
    BATCH = 100

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.waiting: list[
            tuple[NewMessage, asyncio.Future[StoredMessage | Refusal]]
        ] = []
        self.task: asyncio.Task[None] | None = None

    async def store(self, message: NewMessage) -> StoredMessage | Refusal:
        outcome: asyncio.Future[StoredMessage | Refusal] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiting.append((message, outcome))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())
        return await outcome

    async def run(self) -> None:
        try:
            while self.waiting:
                batch = self.waiting[:self.BATCH]
                del self.waiting[:self.BATCH]
                outcomes = await self.service.run_db(functools.partial(
                    _store_batch, [message for message, _ in batch]
                ))
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        except BaseException as error:
            # The trip itself failed (the executor is gone): nobody may
            # wait for ever.
            for _, future in self.waiting:
                if not future.done():
                    future.set_exception(error)
            self.waiting.clear()
            raise
        finally:
            self.task = None


def _store_batch(
    messages: list[NewMessage], session: Session
) -> list[StoredMessage | Refusal | BaseException]:
    """Store a batch in one transaction; one by one if that fails."""
    try:
        return list(store_messages(session, messages))
    except (OSError, SQLAlchemyError) as error:
        session.rollback()
        if len(messages) == 1:
            return [error]

    # A duplicate raced in from another process, or one message broke
    # the transaction: each on its own, so that one failure fails one.
    outcomes: list[StoredMessage | Refusal | BaseException] = []
    for message in messages:
        outcomes.append(_store_alone(session, message))
    return outcomes


def _store_alone(
    session: Session, message: NewMessage
) -> StoredMessage | Refusal | BaseException:
    try:
        return store_messages(session, [message])[0]
    except IntegrityError:
        # The same client id, stored a moment ago by another process:
        # the second try finds it and answers with it.
        session.rollback()
    except (OSError, SQLAlchemyError) as error:
        session.rollback()
        return error
    try:
        return store_messages(session, [message])[0]
    except (OSError, SQLAlchemyError) as error:
        session.rollback()
        return error


class Hub:
    """Fan-out inside this process: chat channels and staff channels."""

    def __init__(self) -> None:
        self.chats: dict[str, set[Client]] = defaultdict(set)
        self.staff: dict[str, set[Client]] = defaultdict(set)

    def follow(self, chat_id: str, client: Client) -> bool:
        """Add `client` to the chat; True if it is the first here."""
        members = self.chats[chat_id]
        members.add(client)
        return len(members) == 1

    def unfollow(self, chat_id: str, client: Client) -> bool:
        """Remove `client` from the chat; True if it was the last here."""
        members = self.chats.get(chat_id)
        if members is None or client not in members:
            return False
        members.discard(client)
        if not members:
            del self.chats[chat_id]
            return True
        return False

    def members(self, chat_id: str) -> list[Client]:
        return list(self.chats.get(chat_id, ()))

    def staff_of(self, tenant: str) -> list[Client]:
        return list(self.staff.get(tenant, ()))


class ChatService:
    """The chat loop of one server process."""

    def __init__(
        self,
        config: Config,
        store: SessionStore,
        metrics: Metrics | None = None,
        broker: LocalBroker | None = None,
    ) -> None:
        from onegov.chat.database import (
            create_database_engine,
            create_tables,
        )

        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        self.broker = broker or broker_from_url(config.broker)
        self.broker.on_chat = self.on_chat_event
        self.broker.on_staff = self.on_staff_event
        self.broker.on_resync = self.resync
        engine = create_database_engine(config.dsn)
        create_tables(engine)
        self.engine = engine
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
        self.writer = MessageWriter(self)
        self.liveness: asyncio.Task[None] | None = None

        #: Who this replica is, for ``onegov-chat status``.
        self.replica = secrets.token_hex(6)
        self.address = ''
        self.started = time.time()

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
        # Publish one message of a chat at a time in this process, so
        # that they reach the broker in sequence order.
        lock = self.chat_locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            yield
        if not lock.locked() and self.chat_locks.get(chat_id) is lock:
            del self.chat_locks[chat_id]

    async def start(self) -> None:
        await self.broker.start()
        self.liveness = asyncio.get_running_loop().create_task(
            self.check_liveness()
        )

    async def stop(self) -> None:
        if self.liveness is not None:
            self.liveness.cancel()
        await self.broker.stop()
        # Let the writes under way finish: they may be acknowledged yet.
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        self.engine.dispose()

    def ping_database(self) -> None:
        """Raise unless the database answers (for the health check)."""
        from sqlalchemy import text

        with self.db() as session:
            session.execute(text('SELECT 1'))

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
            self.metrics.connections_refused.labels(
                'too_many_connections'
            ).inc()
            await connection.close(
                Close.TOO_MANY_CONNECTIONS, 'too many connections'
            )
            return

        siblings.add(client)
        self.clients.add(client)
        gauge = self.metrics.connections.labels(client.role)
        gauge.inc()
        try:
            try:
                greeted = await self.greet(client)
            except (SessionStoreError, OSError, SQLAlchemyError):
                # The database is down: an outage, not a bug. Ask the
                # client to come back later (1013 is a "retry" code).
                logger.warning(
                    'event=backend_unavailable tenant=%s role=%s',
                    client.tenant, client.role,
                )
                client.close(Close.TRY_AGAIN_LATER, 'try again later')
                greeted = False
            if greeted:
                await self.read(client)
        finally:
            gauge.dec()
            await self.forget(client)
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

    async def forget(self, client: Client) -> None:
        key = (client.tenant, client.principal.session_id)
        self.by_session[key].discard(client)
        if not self.by_session[key]:
            del self.by_session[key]
        self.clients.discard(client)
        for chat_id in {*client.seen, *client.held}:
            await self.unfollow(chat_id, client)
        staff = self.hub.staff.get(client.tenant)
        if staff is not None and client in staff:
            staff.discard(client)
            if not staff:
                del self.hub.staff[client.tenant]
                await self.broker.unfollow_staff(client.tenant)

    async def follow(self, chat_id: str, client: Client) -> None:
        if self.hub.follow(chat_id, client):
            await self.broker.follow_chat(chat_id)

    async def unfollow(self, chat_id: str, client: Client) -> None:
        if self.hub.unfollow(chat_id, client):
            await self.broker.unfollow_chat(chat_id)

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
            staff = self.hub.staff[tenant]
            staff.add(client)
            if len(staff) == 1:
                await self.broker.follow_staff(tenant)
            await self.share_presence(tenant)
            for chat in waiting:
                client.reply({'type': 'request', 'chat': chat})
            return True

        chat_id = client.own_chat

        def load_chat(session: Session) -> Any:
            chats = ChatCollection(session, tenant)
            chat = chats.by_id(chat_id)
            if chat is None:
                return None
            return chat.as_dict(), chats.position(chat)

        found = await self.run_db(load_chat) if chat_id else None
        chat, position = found if found else (None, 0)
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
            client.standing = await self.queue_info(tenant, position)
            client.reply(client.standing)
            # Announce the request now that the customer is here; staff
            # who connect later get it in their greeting.
            await self.notify_staff(tenant, {'type': 'request', 'chat': chat})
        return True

    async def queue_info(self, tenant: str, position: int) -> dict[str, Any]:
        """Where a waiting customer stands, and whether staff are here."""
        return {
            'type': 'queue',
            'position': position,
            'staff_online': await self.broker.present(tenant),
        }

    async def read(self, client: Client) -> None:
        connection = client.connection
        try:
            async for frame in connection:
                if client.closing:
                    return
                if isinstance(frame, bytes):
                    client.close(
                        Close.UNSUPPORTED_DATA, 'binary frames not accepted'
                    )
                    return
                await self.dispatch(client, frame)
        except ConnectionClosed:
            return

    async def dispatch(self, client: Client, frame: str) -> None:
        """Answer one frame; never raises for anything a client sends."""
        if not client.limiter.allow():
            self.metrics.rate_limited.inc()
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
                'event=backend_unavailable tenant=%s', client.tenant
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

        # Follow first, holding live messages back, then read the
        # history: nothing published in between can be missed.
        client.held[chat_id] = []
        client.seen.pop(chat_id, None)
        await self.follow(chat_id, client)
        client.reply({'type': 'joined', 'chat': chat})
        after = min(command.last_seq, chat['last_seq'])
        await self.catch_up(client, chat_id, after)

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
            self.metrics.messages_delivered.inc()
            return

        # A gap: another process stored the messages in between. Fetch
        # them from the database before sending anything newer.
        client.held[chat_id] = [(seq, payload)]
        spawn(self.catch_up(client, chat_id, seen))

    async def on_message(self, client: Client, command: Command) -> None:
        """Store a message, acknowledge it, then hand it to everyone."""
        received = time.perf_counter()
        self.metrics.messages_received.inc()
        chat_id = self.target(client, command)

        try:
            stored = await self.writer.store(NewMessage(
                tenant=client.tenant,
                chat_id=chat_id,
                role='staff' if client.is_staff else 'customer',
                user_id=client.user_id,
                staff_name=str(client.principal.data.get('name') or 'Staff'),
                text=command.text,
                client_id=command.client_id,
            ))
        except (OSError, SQLAlchemyError) as error:
            # No traceback: during an outage this happens for every
            # message, and the exception says nothing new.
            logger.warning(
                'event=store_failed chat=%s error=%s',
                chat_id, type(error).__name__,
            )
            raise ProtocolError(
                'unavailable', 'the message was not stored, send it again',
                ref(command),
            ) from None
        if isinstance(stored, str):
            code, text = _REFUSALS[stored]
            raise ProtocolError(code, text, ref(command))

        message = stored.message
        client.reply({
            'type': 'ack', 'chat_id': chat_id,
            'client_id': message['client_id'], 'seq': message['seq'],
            'duplicate': stored.duplicate,
        })
        if not stored.duplicate:
            self.metrics.messages_stored.inc()

        # A duplicate is published again: the replica that stored it
        # first may have died before publishing it (the client saw no
        # ack, so it sent it again), and the members would miss it until
        # the chat's next message. Members drop what they have already
        # (`deliver`).
        async with self.chat_lock(chat_id):
            await self.publish(chat_id, message)
        if not stored.duplicate:
            self.metrics.delivery_latency.observe(
                time.perf_counter() - received
            )

    async def publish(self, chat_id: str, message: dict[str, Any]) -> None:
        """Hand a stored message to every member, here and elsewhere."""
        started = time.perf_counter()
        await self.broker.publish_chat(
            chat_id, message['seq'], encode(message)
        )
        self.metrics.broker_publish.observe(time.perf_counter() - started)

    async def notify_chat(
        self, chat_id: str, message: dict[str, Any]
    ) -> None:
        await self.broker.publish_chat(chat_id, None, encode(message))

    async def notify_staff(
        self, tenant: str, message: dict[str, Any]
    ) -> None:
        await self.broker.publish_staff(tenant, encode(message))

    def on_chat_event(
        self, chat_id: str, seq: int | None, payload: str
    ) -> None:
        """Deliver what was published to a chat, from here or elsewhere."""
        members = self.hub.members(chat_id)
        if seq is not None:
            for member in members:
                self.deliver(member, chat_id, seq, payload)
            return

        for member in members:
            member.send(payload)
        event = json.loads(payload)
        if event.get('type') == 'state' and (
            event.get('chat', {}).get('state') == ChatState.ended
        ):
            for member in members:
                if member.is_staff:
                    self.hub.unfollow(chat_id, member)
                    member.seen.pop(chat_id, None)
                else:
                    member.close(Close.CHAT_ENDED, 'chat ended')

    def on_staff_event(self, tenant: str, payload: str) -> None:
        for member in self.hub.staff_of(tenant):
            member.send(payload)

    def resync(self) -> None:
        """Catch every followed chat up after a broker outage."""
        for client in list(self.clients):
            for chat_id, seen in list(client.seen.items()):
                if chat_id not in client.held:
                    client.held[chat_id] = []
                    spawn(self.catch_up(client, chat_id, seen))

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
                'conflict', 'the chat is no longer waiting', chat_id
            )

        logger.info(
            'event=chat_accepted tenant=%s chat=%s', tenant, chat_id
        )
        client.reply({'type': 'accepted', 'chat': chat})
        await self.notify_staff(
            tenant, {'type': 'taken', 'chat_id': chat_id}
        )
        await self.notify_chat(chat_id, {'type': 'state', 'chat': chat})

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
        await self.notify_chat(chat_id, {'type': 'state', 'chat': chat})
        await self.notify_staff(
            tenant, {'type': 'taken', 'chat_id': chat_id}
        )

    # Liveness ----------------------------------------------------------

    async def check_liveness(self) -> None:
        """Close the sockets of sessions that ended, now and then."""
        while True:
            await asyncio.sleep(self.config.liveness_interval)
            try:
                await self.sweep()
            except (OSError, SQLAlchemyError, SessionStoreError):
                # The database or the store is down: an outage, not a
                # bug of ours (no ERROR, no traceback per sweep); the
                # next sweep tries again.
                logger.warning(
                    'event=liveness_skipped reason=backend_unavailable'
                )
            except Exception:
                logger.error('event=liveness_failed', exc_info=True)

    async def report_status(self) -> None:
        """Tell ``onegov-chat status`` what this replica serves."""
        connections: dict[str, dict[str, int]] = {}
        for client in self.clients:
            roles = connections.setdefault(client.tenant, {})
            roles[client.role] = roles.get(client.role, 0) + 1
        status = {
            'replica': self.replica,
            'address': self.address,
            'pid': os.getpid(),
            'started': self.started,
            'updated': time.time(),
            'connections': connections,
        }
        try:
            await asyncio.to_thread(
                self.store.put_status, self.replica, status,
                max(3 * self.config.liveness_interval, 5),
            )
        except SessionStoreError:
            logger.warning('event=status_report_failed')

    async def sweep(self) -> None:
        await self.report_status()
        await self.check_sessions()
        for tenant in list(self.hub.staff):
            await self.share_presence(tenant)
        await self.update_queues()

    async def check_sessions(self) -> None:
        """Close the sockets of sessions that logged out or changed."""
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

    async def share_presence(self, tenant: str) -> None:
        """Tell the other replicas which staff members are here."""
        members = {
            str(client.user_id) for client in self.hub.staff_of(tenant)
        }
        await self.broker.mark_present(
            tenant, members, ttl=max(3 * self.config.liveness_interval, 5)
        )

    async def update_queues(self) -> None:
        """Tell waiting customers where they stand, when it changed."""
        waiting: dict[str, list[Client]] = defaultdict(list)
        for client in self.clients:
            if not client.is_staff and isinstance(client.own_chat, str):
                waiting[client.tenant].append(client)

        for tenant, clients in waiting.items():
            queue = await self.run_db(
                functools.partial(_waiting_ids, tenant)
            )
            online = await self.broker.present(tenant)
            for client in clients:
                if client.own_chat not in queue:
                    continue
                info = {
                    'type': 'queue',
                    'position': queue.index(client.own_chat) + 1,
                    'staff_online': online,
                }
                if info != client.standing:
                    client.standing = info
                    client.reply(info)


#: Why a message was not stored: the error code and message.
_REFUSALS = {
    'not_found': ('not_found', 'no such chat'),
    'chat_ended': ('chat_ended', 'the chat has ended'),
    'not_active': ('forbidden', 'accept the chat first'),
}


def _still_valid(principal: Principal, data: dict[str, Any]) -> bool:
    # A session that was empty at the handshake (a visitor without a
    # chat) stays valid while empty; one that held a role or a chat ends
    # with its logout or expiry, when those keys vanish or change.
    for key in ('role', 'user_id', 'chat_id'):
        if data.get(key) != principal.data.get(key):
            return False
    return True


def _waiting_ids(tenant: str, session: Session) -> list[str]:
    return [chat.id for chat in ChatCollection(session, tenant).waiting()]


def _messages_after(
    tenant: str, chat_id: str, after: int, session: Session
) -> list[dict[str, Any]]:
    return ChatCollection(session, tenant).messages_after(chat_id, after)


def ref(command: Command) -> str:
    return command.client_id or command.type
