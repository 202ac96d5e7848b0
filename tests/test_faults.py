"""Faults under traffic: Redis, PostgreSQL or a replica goes away.

Every test runs replicas of ``onegov-chat serve`` against a Redis of its
own, which it may stop and start again on the same port, and a fresh
PostgreSQL database. Customers talk on one replica and staff on
another, without pause, while the fault happens. The clients behave as
the browser client does (`conftest.Chatter`): on a retryable close they
fetch a fresh token from the web app, connect to the next replica and
join with the last seq they saw; a message is sent again, with the same
client_id, until it is acknowledged.

Each test then checks that every acknowledged message is stored exactly
once, nothing else is, and every client got the whole chat, in order.

"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin
from webtest import TestApp

from conftest import (
    ORIGIN,
    Chatter,
    Credentials,
    PostgresServer,
    RedisServer,
    ServerProcess,
    TownApp,
    accept_chats,
    add_staff,
    assert_history,
    caught_up,
    chat_pairs,
    fetch_token,
    health,
    wait_for_health,
    ws_url,
)

Replicas = Callable[[int], list[ServerProcess]]

OK = (200, 'ok\n')


@pytest.fixture
def store_url(dedicated_redis: RedisServer) -> str:
    """Sessions and fan-out in a Redis of the test's own."""
    return dedicated_redis.url


@pytest.fixture
def dsn(request: pytest.FixtureRequest, store_url: str) -> str:
    """A fresh database, on a PostgreSQL of the test's own if the test
    asks for `dedicated_postgres`, else on the shared one."""
    name = (
        'dedicated_postgres' if 'dedicated_postgres' in request.fixturenames
        else 'postgres_server'
    )
    server: PostgresServer = request.getfixturevalue(name)
    return server.create_database(f'test_{uuid.uuid4().hex}')


@pytest.fixture
def settings(settings: dict[str, Any], store_url: str) -> dict[str, Any]:
    """The production setup, with a short liveness sweep and a rate
    limit out of the way of clients that send again quickly."""
    return {
        **settings,
        'broker': store_url,
        'liveness_interval': 1,
        'rate_limit': 1000,
        'shutdown_timeout': 10,
    }


Fault = Callable[[list[Chatter]], Awaitable[None]]


def under_traffic(
    app: TownApp,
    replicas: list[ServerProcess],
    dsn: str,
    fault: Fault,
    customers_on: int = 0,
    staff_on: int = 1,
    chats: int = 2,
) -> list[Chatter]:
    """Run `fault` while customers and staff talk; return the clients
    once they caught up with every message stored."""
    add_staff(app)
    pairs = chat_pairs(app, chats)

    async def scenario() -> list[Chatter]:
        await accept_chats(
            replicas[staff_on], pairs[0][1], [c for _, _, c in pairs]
        )
        chatters = []
        for number, (customer, staff, chat_id) in enumerate(pairs):
            chatters += [
                Chatter(
                    f'c{number}', customer, chat_id, False, replicas,
                    customers_on,
                ),
                Chatter(
                    f's{number}', staff, chat_id, True, replicas, staff_on
                ),
            ]
        for chatter in chatters:
            chatter.start()
        done = asyncio.Event()
        talking = [
            asyncio.ensure_future(chatter.talk(done)) for chatter in chatters
        ]
        try:
            await acked(chatters, 3)
            await fault(chatters)
            await acked(chatters, 3)
        finally:
            done.set()
            await asyncio.wait_for(asyncio.gather(*talking), 60)
        await caught_up(chatters, dsn)
        for chatter in chatters:
            await chatter.stop()
        return chatters

    return asyncio.run(scenario())


async def acked(
    chatters: list[Chatter], more: int, timeout: float = 60
) -> None:
    """Wait until each chatter had `more` messages acknowledged."""
    targets = [len(chatter.acked) + more for chatter in chatters]
    deadline = time.monotonic() + timeout
    while any(
        len(chatter.acked) < target
        for chatter, target in zip(chatters, targets, strict=True)
    ):
        assert time.monotonic() < deadline, [
            (c.name, len(c.acked), c.errors) for c in chatters
        ]
        await asyncio.sleep(0.05)


async def handshake(
    replica: ServerProcess, web: TestApp, credentials: Any = None
) -> tuple[int, str]:
    """Try one handshake; return 101 and the greeting's type, or the
    status and body of the refusal."""
    if credentials is None:
        credentials = await asyncio.to_thread(fetch_token, web)
    try:
        async with connect(
            ws_url(replica, credentials), origin=Origin(ORIGIN),
            additional_headers={
                'Cookie': f'session_id={credentials.cookie}'
            },
            open_timeout=15,
        ) as connection:
            return 101, json.loads(await connection.recv())['type']
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode()


async def log_line(
    replica: ServerProcess, pattern: str, timeout: float = 30
) -> None:
    await asyncio.to_thread(replica.wait_for_log, pattern, timeout)


def served_on(chatter: Chatter, replicas: list[ServerProcess]) -> list[int]:
    """The replicas (by index) that admitted the chatter, in order."""
    ports = [replica.port for replica in replicas]
    return [ports.index(port) for port in chatter.admitted]


def test_healthz_names_the_failing_backend(
    start_replicas: Replicas,
    dedicated_redis: RedisServer,
    dedicated_postgres: PostgresServer,
) -> None:
    """``/healthz`` answers 200 ``ok`` while store, broker and database
    answer, and 503 naming the parts that do not while Redis or
    PostgreSQL is down."""
    replica, = start_replicas(1)
    assert health(replica) == OK

    dedicated_redis.stop()
    assert health(replica) == (503, 'unavailable: store, broker\n')
    dedicated_redis.start()
    wait_for_health(replica, OK)

    dedicated_postgres.stop()
    assert health(replica) == (503, 'unavailable: database\n')
    dedicated_postgres.start()
    wait_for_health(replica, OK)
    assert replica.process.poll() is None


def test_redis_restart_under_traffic_loses_nothing(
    start_replicas: Replicas,
    town_app: TownApp,
    dedicated_redis: RedisServer,
    settings: dict[str, Any],
) -> None:
    """While Redis is down handshakes are refused with 503 and never
    admitted, established connections stay open and keep storing, and
    once it is back the replicas reconnect by themselves and every
    client gets the whole chat once, in order."""
    replicas = start_replicas(2)
    spare = TestApp(town_app)
    tokens: list[Credentials] = []

    async def outage(chatters: list[Chatter]) -> None:
        tokens.extend([
            await asyncio.to_thread(fetch_token, spare) for _ in range(6)
        ])
        await asyncio.to_thread(dedicated_redis.stop)
        down = time.monotonic()
        before = sum(len(chatter.acked) for chatter in chatters)

        for replica in replicas:
            assert await asyncio.to_thread(health, replica) == (
                503, 'unavailable: store, broker\n'
            )
        # For three seconds, every handshake is refused; none admitted.
        number = 0
        while time.monotonic() < down + 3:
            replica = replicas[number % 2]
            assert await handshake(replica, spare, tokens[number]) == (
                503, 'session store unavailable\n'
            )
            number = (number + 1) % len(tokens)
            await asyncio.sleep(0.3)
        # The database is up: messages are still stored, acknowledged
        # and delivered on the replica they were sent to.
        assert sum(len(chatter.acked) for chatter in chatters) > before

        await asyncio.to_thread(dedicated_redis.start)
        for replica in replicas:
            await log_line(replica, 'event=broker_reconnected')
            await asyncio.to_thread(wait_for_health, replica, OK)
        # The refused handshakes consumed nothing: a token still works.
        assert await handshake(replicas[0], spare, tokens[-1]) == (
            101, 'hello'
        )

    chatters = under_traffic(
        town_app, replicas, settings['dsn'], outage
    )
    assert_history(chatters, settings['dsn'])
    for chatter in chatters:
        # One connection each, from start to end.
        assert len(chatter.admitted) == 1, chatter.name
        assert chatter.closes == [1000], chatter.name
        assert chatter.errors == [], chatter.name
    for replica in replicas:
        log = replica.log()
        assert 'event=broker_unavailable' in log
        assert 'reason=store_unavailable status=503' in log
        assert ' ERROR ' not in log
        for credentials in tokens:
            assert credentials.token not in log
            assert credentials.cookie not in log
        assert replica.process.poll() is None


def test_postgres_restart_under_traffic_loses_nothing(
    start_replicas: Replicas,
    town_app: TownApp,
    dedicated_postgres: PostgresServer,
    settings: dict[str, Any],
) -> None:
    """While PostgreSQL is down no message is acknowledged (each gets the
    error ``unavailable``) and no replica fails; once it is back what the
    clients send again is stored exactly once and every client gets the
    whole chat, in order."""
    replicas = start_replicas(2)
    window: list[float] = []

    async def outage(chatters: list[Chatter]) -> None:
        loop = asyncio.get_running_loop()
        refused = [chatter.unavailable for chatter in chatters]
        await asyncio.to_thread(dedicated_postgres.stop)
        window.append(loop.time())
        for replica in replicas:
            assert await asyncio.to_thread(health, replica) == (
                503, 'unavailable: database\n'
            )

        # For three seconds at least, everyone keeps trying and is told
        # to try again.
        down = time.monotonic()
        while time.monotonic() < down + 3 or any(
            chatter.unavailable < count + 2
            for chatter, count in zip(chatters, refused, strict=True)
        ):
            assert time.monotonic() < down + 30
            await asyncio.sleep(0.1)

        window.append(loop.time())
        await asyncio.to_thread(dedicated_postgres.start)
        for replica in replicas:
            await asyncio.to_thread(wait_for_health, replica, OK)

    chatters = under_traffic(
        town_app, replicas, settings['dsn'], outage
    )
    assert_history(chatters, settings['dsn'])
    stopped, restarted = window
    for chatter in chatters:
        assert not [
            # An acknowledgement sent just before the stop may still
            # be on its way.
            key for key, at in chatter.ack_times.items()
            if stopped + 0.5 < at < restarted
        ], chatter.name
        assert len(chatter.admitted) == 1, chatter.name
        assert chatter.closes == [1000], chatter.name
        assert chatter.errors == [], chatter.name
    for replica in replicas:
        assert replica.process.poll() is None
        log = replica.log()
        assert 'event=store_failed' in log
        # An outage is no bug of ours: nothing is logged as an ERROR.
        assert ' ERROR ' not in log


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM],
                         ids=['SIGKILL', 'SIGTERM'])
def test_replica_lost_under_traffic_loses_nothing(
    start_replicas: Replicas,
    town_app: TownApp,
    settings: dict[str, Any],
    sig: signal.Signals,
) -> None:
    """A replica killed (SIGKILL) or drained (SIGTERM: its clients get
    1001, it exits with 0 within shutdown_timeout) during traffic: its
    clients reconnect to another replica and resume without loss."""
    replicas = start_replicas(3)
    gone = replicas[0]
    exits: list[tuple[int, float]] = []

    async def lose_replica(chatters: list[Chatter]) -> None:
        started = time.monotonic()
        gone.process.send_signal(sig)
        code = await asyncio.to_thread(gone.process.wait, 30)
        exits.append((code, time.monotonic() - started))

    # Customers on the replica that goes, staff on the last one; the
    # customers move on to the middle one.
    chatters = under_traffic(
        town_app, replicas, settings['dsn'], lose_replica,
        customers_on=0, staff_on=2,
    )
    assert_history(chatters, settings['dsn'])

    code, elapsed = exits[0]
    lost = 1006 if sig == signal.SIGKILL else 1001
    for chatter in chatters:
        if chatter.staff:
            assert served_on(chatter, replicas) == [2], chatter.name
            assert chatter.closes == [1000], chatter.name
        else:
            assert served_on(chatter, replicas) == [0, 1], chatter.name
            assert chatter.closes == [lost, 1000], chatter.name
        assert chatter.errors == [], chatter.name

    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 0
        assert elapsed < settings['shutdown_timeout']
        log = gone.log()
        assert 'event=server_stopping signal=SIGTERM' in log
        assert log.rstrip().endswith('event=server_stopped')
        assert ' ERROR ' not in log
    for replica in replicas[1:]:
        assert replica.process.poll() is None
        assert ' ERROR ' not in replica.log()


def test_message_a_dead_replica_stored_reaches_everyone(
    start_replicas: Replicas, town_app: TownApp, settings: dict[str, Any]
) -> None:
    """A message a replica stored but died before acknowledging and
    publishing reaches both sides live once the client sends it again
    with the same client_id, acknowledged as a duplicate."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from onegov.chat.collections.chats import NewMessage, store_messages

    replicas = start_replicas(2)
    add_staff(town_app)
    (customer_web, staff_web, chat_id), = chat_pairs(town_app, 1)

    def die_after_commit() -> None:
        # What the replica did before SIGKILL: the commit, nothing else.
        engine = create_engine(settings['dsn'])
        try:
            with Session(engine) as session:
                store_messages(session, [NewMessage(
                    'town/govikon', chat_id, 'customer', None, '',
                    'lost ack', 'c0-lost',
                )])
        finally:
            engine.dispose()

    async def scene() -> list[Chatter]:
        await accept_chats(replicas[1], staff_web, [chat_id])
        customer = Chatter('c0', customer_web, chat_id, False, replicas, 0)
        staff = Chatter('s0', staff_web, chat_id, True, replicas, 1)
        chatters = [customer, staff]
        for chatter in chatters:
            chatter.start()
        assert await customer.say('before', 'c0-before') == 1

        await asyncio.to_thread(die_after_commit)
        assert await customer.say('lost ack', 'c0-lost') == 2
        await caught_up(chatters, settings['dsn'], timeout=5)
        for chatter in chatters:
            await chatter.stop()
        return chatters

    chatters = asyncio.run(scene())
    assert_history(chatters, settings['dsn'])
    assert [chatter.received for chatter in chatters] == [[1, 2], [1, 2]]


def test_broker_catches_up_only_once_subscribed_again(
    dedicated_redis: RedisServer,
) -> None:
    """When Redis is back, the broker asks the service to catch its chats
    up from the database only after Redis confirmed every subscription
    again, so that nothing published in between is missed."""
    from onegov.chat.broker import RedisBroker

    chat_id = 'c' * 32

    async def scene() -> None:
        broker = RedisBroker(dedicated_redis.url)
        other = RedisBroker(dedicated_redis.url)
        subscribed_at_resync: list[set[str]] = []
        received: list[tuple[str, int | None, str]] = []
        broker.on_resync = lambda: subscribed_at_resync.append(
            set(broker.active)
        )
        broker.on_chat = lambda *event: received.append(event)
        await broker.start()
        try:
            await broker.follow_chat(chat_id)
            channel = broker.chat_channel(chat_id)
            assert broker.active == {channel}

            await asyncio.to_thread(dedicated_redis.stop)
            await until(lambda: not broker.healthy)
            await asyncio.to_thread(dedicated_redis.start)
            await until(lambda: bool(subscribed_at_resync))
            assert subscribed_at_resync == [{channel}]

            await other.publish_chat(chat_id, 7, '{}')
            await until(lambda: bool(received))
            assert received == [(chat_id, 7, '{}')]
        finally:
            await broker.stop()
            await other.stop()

    asyncio.run(scene())


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        await asyncio.sleep(0.02)
