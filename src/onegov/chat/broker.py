"""Fan-out between the replicas of ``onegov-chat serve``.

A message is stored first, then published. Each replica delivers to its
own clients; the broker carries the message to the other replicas. Two
kinds of channel exist: one per chat (messages and state changes) and
one per tenant for its staff (new requests, taken chats).

`LocalBroker`, the embedded default, serves one process. `RedisBroker`
uses Redis pub/sub, chosen with ``broker: redis://...``. Pub/sub is not
durable: what a replica misses while Redis is away is not replayed by
the broker, but by the database. Clients skip nothing: each connection
fills any gap in the sequence numbers from the database, and after a
broker outage every chat followed is caught up the same way.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger('onegov.chat.broker')

#: Called with chat id, sequence number (None for events that are not
#: messages) and the encoded payload.
ChatHandler = Callable[[str, int | None, str], None]

#: Called with the tenant and the encoded payload.
StaffHandler = Callable[[str, str], None]


#: Seconds between pings on an idle pub/sub connection.
KEEPALIVE = 5.0


class BrokerUnavailable(Exception):
    """Raised when the broker cannot be reached."""


class LocalBroker:
    """Fan-out inside one process."""

    def __init__(self) -> None:
        self.on_chat: ChatHandler = _ignore_chat
        self.on_staff: StaffHandler = _ignore_staff
        self.on_resync: Callable[[], None] = _nothing
        self.presence: dict[str, dict[str, float]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def publish_chat(
        self, chat_id: str, seq: int | None, payload: str
    ) -> None:
        self.on_chat(chat_id, seq, payload)

    async def publish_staff(self, tenant: str, payload: str) -> None:
        self.on_staff(tenant, payload)

    async def follow_chat(self, chat_id: str) -> None:
        pass

    async def unfollow_chat(self, chat_id: str) -> None:
        pass

    async def follow_staff(self, tenant: str) -> None:
        pass

    async def unfollow_staff(self, tenant: str) -> None:
        pass

    async def mark_present(
        self, tenant: str, members: set[str], ttl: float
    ) -> None:
        now = time.time()
        self.presence[tenant] = {member: now + ttl for member in members}

    async def present(self, tenant: str) -> int:
        now = time.time()
        return sum(
            1 for expires in self.presence.get(tenant, {}).values()
            if expires > now
        )


def _ignore_chat(chat_id: str, seq: int | None, payload: str) -> None:
    pass


def _ignore_staff(tenant: str, payload: str) -> None:
    pass


def _nothing() -> None:
    pass


class RedisBroker(LocalBroker):
    """Fan-out across replicas through Redis pub/sub.

    One task owns the pub/sub connection: it applies subscription
    changes, reads messages and reconnects with back-off when Redis goes
    away, then asks the service to catch every followed chat up from the
    database (`on_resync`).

    """

    def __init__(self, url: str, prefix: str = 'onegov.chat') -> None:
        super().__init__()
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        # The subscriptions get a client of their own that never retries
        # by itself: a reconnect must go through `listen`, which catches
        # every followed chat up once the subscriptions are back.
        self.listener = redis.asyncio.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.prefix = prefix

        #: Tells this replica's own publications from the others'.
        self.replica = secrets.token_hex(8)

        self.wanted: set[str] = set()
        self.active: set[str] = set()
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.healthy = False
        self.publishing = True

    def chat_channel(self, chat_id: str) -> str:
        return f'{self.prefix}:chat:{chat_id}'

    def staff_channel(self, tenant: str) -> str:
        return f'{self.prefix}:staff:{tenant}'

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.listen())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.redis.aclose()
        await self.listener.aclose()

    async def ping(self) -> None:
        import redis

        try:
            await self.redis.ping()
        except (redis.RedisError, OSError):
            raise BrokerUnavailable('broker unavailable') from None

    async def _publish(self, channel: str, envelope: str) -> None:
        import redis

        try:
            await self.redis.publish(channel, envelope)
        except (redis.RedisError, OSError):
            # The others will find the message in the database when they
            # resume or notice the gap; nothing acknowledged is lost.
            # Logged once per outage, not once per message.
            if self.publishing:
                logger.warning('event=broker_publish_failed')
            self.publishing = False
        else:
            self.publishing = True

    async def publish_chat(
        self, chat_id: str, seq: int | None, payload: str
    ) -> None:
        self.on_chat(chat_id, seq, payload)
        marker = '-' if seq is None else str(seq)
        await self._publish(
            self.chat_channel(chat_id), f'{self.replica} {marker} {payload}'
        )

    async def publish_staff(self, tenant: str, payload: str) -> None:
        self.on_staff(tenant, payload)
        await self._publish(
            self.staff_channel(tenant), f'{self.replica} - {payload}'
        )

    async def _follow(self, channel: str) -> None:
        self.wanted.add(channel)
        if channel in self.active:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, []).append(waiter)
        # Wait until Redis confirmed the subscription, so that nothing
        # published after a history query can be missed; but never hang
        # on a broker that is away (its recovery catches up anyway).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter, timeout=2.0)

    async def _unfollow(self, channel: str) -> None:
        self.wanted.discard(channel)

    async def follow_chat(self, chat_id: str) -> None:
        await self._follow(self.chat_channel(chat_id))

    async def unfollow_chat(self, chat_id: str) -> None:
        await self._unfollow(self.chat_channel(chat_id))

    async def follow_staff(self, tenant: str) -> None:
        await self._follow(self.staff_channel(tenant))

    async def unfollow_staff(self, tenant: str) -> None:
        await self._unfollow(self.staff_channel(tenant))

    async def listen(self) -> None:
        import redis

        delay = 0.1
        recovering = False
        while True:
            pubsub = self.listener.pubsub()
            self.active = set()
            try:
                await pubsub.ping()
                self.healthy, delay = True, 0.1
                await self.pump(pubsub, resync=recovering)
            except (redis.RedisError, OSError):
                if self.healthy or not recovering:
                    logger.warning('event=broker_unavailable')
                self.healthy, recovering = False, True
                await asyncio.sleep(delay + secrets.randbelow(100) / 1000)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def pump(self, pubsub: Any, resync: bool = False) -> None:
        import redis

        pending: set[str] = set()
        pinged = heard = time.monotonic()
        while True:
            missing = self.wanted - self.active - pending
            if missing:
                await pubsub.subscribe(*missing)
                pending |= missing
            extra = self.active - self.wanted
            if extra:
                await pubsub.unsubscribe(*extra)
                self.active -= extra

            if resync and not pending:
                # Catch up only once Redis confirmed every subscription
                # again: what is published from now on arrives live, and
                # what came before is in the database. Catching up first
                # would miss what is published in between, until the
                # chat's next message shows the gap.
                resync = False
                logger.info('event=broker_reconnected')
                self.on_resync()

            if not pubsub.subscribed:
                await asyncio.sleep(0.05)
                heard = time.monotonic()
                continue

            # A connection that died without a word (no reset) shows only
            # by its silence: ping now and then, and give up on it when
            # not even the pong comes back.
            now = time.monotonic()
            if now - heard > 3 * KEEPALIVE:
                raise redis.ConnectionError('the pub/sub connection is silent')
            if now - pinged > KEEPALIVE:
                pinged = now
                await pubsub.ping()

            message = await pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            heard = time.monotonic()
            if message['type'] not in ('subscribe', 'message'):
                continue
            channel = message['channel']
            if isinstance(channel, bytes):
                channel = channel.decode()
            if message['type'] == 'subscribe':
                pending.discard(channel)
                self.active.add(channel)
                for waiter in self.waiters.pop(channel, []):
                    if not waiter.done():
                        waiter.set_result(None)
            elif message['type'] == 'message':
                self.dispatch(channel, message['data'])

    def dispatch(self, channel: str, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        replica, marker, payload = text.split(' ', 2)
        if replica == self.replica:
            return
        kind, _, key = channel[len(self.prefix) + 1:].partition(':')
        if kind == 'chat':
            self.on_chat(key, None if marker == '-' else int(marker), payload)
        elif kind == 'staff':
            self.on_staff(key, payload)

    async def mark_present(
        self, tenant: str, members: set[str], ttl: float
    ) -> None:
        import redis

        key = f'{self.prefix}:presence:{tenant}'
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                if members:
                    pipe.zadd(key, {member: now + ttl for member in members})
                pipe.zremrangebyscore(key, '-inf', now)
                pipe.expire(key, max(1, int(ttl * 2)))
                await pipe.execute()
        except (redis.RedisError, OSError):
            logger.warning('event=presence_failed')

    async def present(self, tenant: str) -> int:
        import redis

        try:
            count = await self.redis.zcount(
                f'{self.prefix}:presence:{tenant}', time.time(), '+inf'
            )
        except (redis.RedisError, OSError):
            return 0
        return int(count)


def broker_from_url(url: str | None) -> LocalBroker:
    """Return the broker named by `url`: in-process when None.

    Raises:
        ValueError: for a URL that is neither ``redis://`` nor
            ``rediss://``.

    """
    if url is None:
        return LocalBroker()
    if not url.startswith(('redis://', 'rediss://', 'unix://')):
        raise ValueError('broker must be a redis:// URL')
    return RedisBroker(url)
