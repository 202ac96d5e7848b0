"""Several ``onegov-chat serve`` replicas behind one Redis and PostgreSQL.

Every test starts its replicas with ``serve --port 0`` from one
configuration file: sessions and fan-out in a real Redis of the test's
own, chats in a fresh database of a real PostgreSQL.

"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin
from webtest import TestApp

from conftest import (
    ORIGIN,
    Chatter,
    Peer,
    RedisServer,
    ServerProcess,
    TownApp,
    accept_chats,
    add_staff,
    assert_history,
    caught_up,
    chat_pairs,
    fetch_token,
    log_in,
    start_chat,
    ws_url,
)

Replicas = Callable[[int], list[ServerProcess]]


@pytest.fixture
def store_url(dedicated_redis: RedisServer) -> str:
    """Sessions in a Redis of the test's own (no SQLite variant here):
    staff presence from other tests cannot leak in."""
    return dedicated_redis.url


@pytest.fixture
def settings(settings: dict[str, Any], store_url: str) -> dict[str, Any]:
    """The production setup: broker and sessions on Redis, a short
    liveness sweep, a rate limit out of the way."""
    return {
        **settings,
        'broker': store_url,
        'liveness_interval': 0.5,
        'rate_limit': 1000,
    }


def test_customer_and_staff_on_two_replicas_talk_in_order(
    start_replicas: Replicas, town_app: TownApp, settings: dict[str, Any]
) -> None:
    """Customers on one replica and staff on another exchange messages,
    turn by turn and all at once, and both sides get every message once
    and in order."""
    first, second = replicas = start_replicas(2)
    add_staff(town_app)
    pairs = chat_pairs(town_app, 2)

    async def talk() -> list[Chatter]:
        await accept_chats(second, pairs[0][1], [c for _, _, c in pairs])
        chatters = []
        for number, (customer, staff, chat_id) in enumerate(pairs):
            chatters += [
                Chatter(f'c{number}', customer, chat_id, False, replicas, 0),
                Chatter(f's{number}', staff, chat_id, True, replicas, 1),
            ]
        for chatter in chatters:
            chatter.start()

        # Turn by turn: each message reaches the other side before the
        # answer is written.
        for turn in range(3):
            for index, chatter in enumerate(chatters):
                other = chatters[index ^ 1]
                seq = await chatter.say(
                    f'turn {turn}', f'{chatter.name}-turn-{turn}'
                )
                await wait_until(functools.partial(
                    operator.contains, other.received, seq
                ))

        # All at once.
        done = asyncio.Event()
        await asyncio.gather(*(
            chatter.talk(done, pause=0, limit=15) for chatter in chatters
        ))
        await caught_up(chatters, settings['dsn'])
        for chatter in chatters:
            await chatter.stop()
        return chatters

    chatters = asyncio.run(talk())
    assert_history(chatters, settings['dsn'])
    for chatter in chatters:
        assert chatter.received == list(range(1, 37))
        # One connection each, on its own replica, never dropped.
        port = (first if chatter.name.startswith('c') else second).port
        assert chatter.admitted == [port]
        assert chatter.refused == []
        assert chatter.errors == []
        # What one side said keeps its order.
        said = sorted(chatter.acked.items(), key=lambda item: item[1])
        assert [key for key, _ in said][3:] == [
            f'{chatter.name}-{n}' for n in range(15)
        ]
    for replica in replicas:
        assert ' ERROR ' not in replica.log()


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        await asyncio.sleep(0.01)


def test_one_token_admits_one_handshake_across_replicas(
    start_replicas: Replicas, client: TestApp
) -> None:
    """Of 20 concurrent handshakes presenting one token, spread over two
    replicas, exactly one is admitted; the others get 401."""
    replicas = start_replicas(2)
    credentials = fetch_token(client)
    headers = {'Cookie': f'session_id={credentials.cookie}'}

    async def one(replica: ServerProcess) -> str | int:
        try:
            async with connect(
                ws_url(replica, credentials), origin=Origin(ORIGIN),
                additional_headers=headers, open_timeout=15,
            ) as connection:
                hello = json.loads(await connection.recv())
                return str(hello['type'])
        except InvalidStatus as exc:
            return exc.response.status_code

    async def race() -> list[str | int]:
        return await asyncio.gather(*(
            one(replicas[number % 2]) for number in range(20)
        ))

    results = asyncio.run(race())
    assert sorted(results, key=str) == [401] * 19 + ['hello']

    def count(event: str) -> int:
        return sum(
            len(re.findall(event, replica.log())) for replica in replicas
        )

    deadline = time.monotonic() + 10
    while count('event=handshake_refused') < 19:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert count('event=handshake_admitted') == 1
    assert count(
        r'event=handshake_refused reason=(token_not_stored|session_unknown)'
        r' status=401 '
    ) == 19
    for replica in replicas:
        log = replica.log()
        # Both replicas took part in the race, and logged no secret.
        assert 'event=handshake_' in log
        assert credentials.token not in log
        assert credentials.cookie not in log


def test_queue_counts_staff_on_every_replica_and_the_position(
    start_replicas: Replicas, town_app: TownApp
) -> None:
    """A waiting customer's queue message, in the greeting and after each
    change at a liveness sweep, counts the staff members connected to
    any replica (each once) and gives the place in the queue."""
    first, second = start_replicas(2)
    add_staff(town_app, 'alice', 'Alice Staff')
    add_staff(town_app, 'bob', 'Bob Staff')
    carla_web, dora_web = TestApp(town_app), TestApp(town_app)
    alice_web, alice_again_web, bob_web = (
        TestApp(town_app) for _ in range(3)
    )
    carla_chat = start_chat(carla_web, name='Carla')
    start_chat(dora_web, name='Dora')
    log_in(alice_web, 'alice')
    log_in(alice_again_web, 'alice')
    log_in(bob_web, 'bob')

    def queue(position: int, online: int) -> dict[str, Any]:
        return {'type': 'queue', 'position': position, 'staff_online': online}

    async def scene() -> None:
        opened: list[Peer] = []

        async def join(server: ServerProcess, web: TestApp) -> Peer:
            peer = await Peer.connect(server, web)
            opened.append(peer)
            await peer.expect('hello')
            return peer

        try:
            carla = await join(second, carla_web)
            assert await carla.expect('queue') == queue(1, 0)

            # Alice comes in on the first replica.
            alice = await join(first, alice_web)
            assert await carla.expect('queue') == queue(1, 1)

            dora = await join(first, dora_web)
            assert await dora.expect('queue') == queue(2, 1)

            # Alice on the second replica as well, then Bob there too:
            # Alice counts once.
            await join(second, alice_again_web)
            bob = await join(second, bob_web)
            for customer in (carla, dora):
                assert await customer.expect(
                    'queue', staff_online=2
                ) == queue(1 if customer is carla else 2, 2)

            # Alice takes Carla's chat: Dora moves up.
            await alice.send(type='accept', chat_id=carla_chat)
            await alice.expect('accepted')
            assert await dora.expect('queue', position=1) == queue(1, 2)

            # Bob leaves: once his presence expired, one is left.
            await bob.close()
            assert await dora.expect(
                'queue', timeout=20, staff_online=1
            ) == queue(1, 1)
            assert [m for m in dora.inbox if m['type'] == 'queue'] == []
        finally:
            await asyncio.gather(*(peer.close() for peer in opened))

    asyncio.run(scene())
