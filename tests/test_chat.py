"""The chat through real processes: customers, staff, history."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from websockets.asyncio.client import connect as connect_websocket
from websockets.exceptions import ConnectionClosed
from webtest import TestApp

from conftest import (
    ORIGIN,
    Peer,
    TownApp,
    add_staff,
    fetch_token,
    log_in,
    start_chat,
    ws_url,
)
from onegov.chat.models import Chat, Message

CHATS = Chat.__table__
MESSAGES = Message.__table__


@pytest.fixture
def overrides() -> dict[str, Any]:
    """The settings a test changes; see `configured`."""
    return {}


@pytest.fixture
def settings(
    settings: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The shared configuration, with the test's `overrides`."""
    return {**settings, **overrides}


def configured(**values: Any) -> pytest.MarkDecorator:
    """Run a test with `values` in the app's and the server's settings."""
    name = ','.join(f'{key}={value}' for key, value in values.items())
    return pytest.mark.parametrize('overrides', [values], ids=[name])


def snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the chat tables, read on a connection of its own."""
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            return {
                table.name: [
                    tuple(row) for row in connection.execute(
                        select(table).order_by(table.c.id)
                    )
                ]
                for table in (CHATS, MESSAGES)
            }
    finally:
        engine.dispose()


def stored(dsn: str, chat_id: str) -> list[tuple[int, str, str, str]]:
    """The messages of a chat as (seq, role, text, client id)."""
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    MESSAGES.c.seq, MESSAGES.c.role, MESSAGES.c.text,
                    MESSAGES.c.client_id,
                )
                .where(MESSAGES.c.chat_id == chat_id)
                .order_by(MESSAGES.c.seq)
            )
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        engine.dispose()


def chat_row(dsn: str, chat_id: str) -> dict[str, Any]:
    """The stored row of a chat, as a mapping."""
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(CHATS).where(CHATS.c.id == chat_id)
            ).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


#: The types that answer a command; anything else is news.
ANSWERS = frozenset({'ack', 'joined', 'accepted', 'ended', 'pong', 'error'})


async def answer(peer: Peer, timeout: float = 10.0) -> dict[str, Any]:
    """The next answer to a command of `peer`; news stays in its inbox."""
    for index, message in enumerate(peer.inbox):
        if message['type'] in ANSWERS:
            return peer.inbox.pop(index)

    async def wait() -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(
                await peer.connection.recv()
            )
            if message['type'] in ANSWERS:
                return message
            peer.inbox.append(message)

    return await asyncio.wait_for(wait(), timeout)


async def settle(peer: Peer) -> list[dict[str, Any]]:
    """The news `peer` got up to the answer to a ping sent now.

    The server answers a connection's frames in order, so whatever was
    queued for it before the ping arrives before the pong. Queue
    positions are left out: they come whenever the queue moves.

    """
    await peer.send(type='ping')
    pong = await answer(peer)
    assert pong == {'type': 'pong'}, pong
    news = [m for m in peer.inbox if m['type'] != 'queue']
    peer.inbox.clear()
    return news


_opened: ContextVar[list[Any]] = ContextVar('opened')


async def connect(server: Any, web: TestApp) -> Peer:
    """Connect as the browser of `web`; `run` closes the connection."""
    peer = await Peer.connect(server, web)
    _opened.get().append(peer.connection)
    return peer


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario`, closing its connections even when it fails."""

    async def main() -> None:
        opened: list[Any] = []
        _opened.set(opened)
        try:
            await scenario()
        finally:
            await asyncio.gather(*(
                connection.close() for connection in opened
            ))

    asyncio.run(main())


async def closed(peer: Peer, timeout: float = 5.0) -> int | None:
    """Wait until the server closed `peer`; return the close code."""
    await asyncio.wait_for(peer.connection.wait_closed(), timeout)
    code: int | None = peer.connection.close_code
    return code


async def error(peer: Peer, **frame: Any) -> dict[str, Any]:
    """Send `frame`; return the reply, which must be an error."""
    await peer.send(**frame)
    reply = await answer(peer)
    assert reply['type'] == 'error', reply
    return reply


async def say(peer: Peer, text: str, client_id: str, **frame: Any) -> int:
    """Send a message; return the seq of its acknowledgement."""
    await peer.send(type='message', text=text, client_id=client_id, **frame)
    ack = await answer(peer)
    assert ack['type'] == 'ack', ack
    assert ack['client_id'] == client_id
    assert ack['duplicate'] is False
    seq: int = ack['seq']
    return seq


async def open_chat(
    server: Any, customer_web: TestApp, staff_web: TestApp, chat_id: str
) -> tuple[Peer, Peer]:
    """Connect both sides, accept and join the chat; return them."""
    staff = await connect(server, staff_web)
    await staff.expect('hello')
    customer = await connect(server, customer_web)
    await customer.expect('hello')
    await customer.send(type='join', last_seq=0)
    await customer.expect('joined')

    await staff.send(type='accept', chat_id=chat_id)
    await staff.expect('accepted')
    await staff.send(type='join', chat_id=chat_id, last_seq=0)
    await staff.expect('joined')
    await customer.expect('state')

    # What led here (the request, taken, the state) is no news later.
    for peer in (customer, staff):
        await settle(peer)
    return customer, staff


def texts(messages: list[dict[str, Any]]) -> str:
    """All of `messages` as one string, to search for what must not be
    in it."""
    return json.dumps(messages, ensure_ascii=False)


def served_cleanly(server: Any) -> None:
    """Assert the server log shows no failure of ours."""
    log = server.log()
    assert 'event=handler_failed' not in log
    assert 'Traceback' not in log


def test_full_conversation(chat_server: Any, town_app: Any) -> None:
    """A customer and a staff member talk, the chat ends, the transcript
    in the database and the archive is exactly what was sent."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)

    said = [
        ('customer', 'Hello, I need a permit <b>now</b> & fast'),
        ('staff', 'Hi Carla, which kind of permit?'),
        ('customer', 'A "garden shed" one 🏡'),
        ('staff', '<img src=x onerror=alert(1)>'),
    ]

    async def talk() -> None:
        staff = await Peer.connect(chat_server, staff_web)
        hello = await staff.expect('hello')
        assert hello['role'] == 'staff'

        customer = await Peer.connect(chat_server, customer_web)
        hello = await customer.expect('hello')
        assert hello['chat']['id'] == chat_id
        await customer.send(type='join', last_seq=0)
        await customer.expect('joined')

        request = await staff.expect('request')
        assert request['chat']['id'] == chat_id
        await staff.send(type='accept', chat_id=chat_id)
        await staff.expect('accepted')
        await staff.send(type='join', chat_id=chat_id, last_seq=0)
        await staff.expect('joined')
        state = await customer.expect('state')
        assert state['chat']['state'] == 'active'

        peers = {'customer': customer, 'staff': staff}
        for number, (role, text) in enumerate(said, start=1):
            await peers[role].send(
                type='message', text=text, client_id=f'm{number}'
            ) if role == 'customer' else await peers[role].send(
                type='message', text=text, client_id=f'm{number}',
                chat_id=chat_id,
            )
            ack = await peers[role].expect('ack', client_id=f'm{number}')
            assert ack['seq'] == number
            for peer in peers.values():
                message = await peer.expect('message', seq=number)
                assert message['text'] == text
                assert message['role'] == role

        await staff.send(type='end', chat_id=chat_id)
        await staff.expect('ended')
        await customer.expect('state')
        await asyncio.wait_for(customer.connection.wait_closed(), 5)
        assert customer.connection.close_code == 4001
        await staff.close()

    asyncio.run(talk())

    session = town_app.chat_db()
    chat = session.scalars(select(Chat).where(Chat.id == chat_id)).one()
    assert chat.state == 'ended'
    rows = session.scalars(
        select(Message).where(Message.chat_id == chat_id)
        .order_by(Message.seq)
    ).all()
    assert [(m.role, m.text) for m in rows] == said
    assert [m.seq for m in rows] == [1, 2, 3, 4]
    assert rows[0].sender_name == 'Carla Customer'
    assert rows[1].sender_name == 'Alice Staff'

    page = staff_web.get(f'/chat/archive/{chat_id}')
    for _, text in said:
        escaped = (
            text.replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;').replace('"', '&#34;')
        )
        assert escaped in page.text
    assert '<img src=x' not in page.text


# Isolation -----------------------------------------------------------------


def test_customers_are_isolated(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A customer sees nothing of another chat, its join and message act
    on its own chat whatever chat id it sends, and a session without a
    chat gets not_found."""
    add_staff(town_app)
    first_web, second_web = TestApp(town_app), TestApp(town_app)
    staff_web, nobody_web = TestApp(town_app), TestApp(town_app)
    first_id = start_chat(first_web)
    second_id = start_chat(
        second_web, name='Mallory', email='mallory@example.org'
    )
    log_in(staff_web)

    async def talk() -> None:
        first, staff = await open_chat(
            chat_server, first_web, staff_web, first_id
        )
        second = await connect(chat_server, second_web)
        seen = [await second.expect('hello')]
        assert seen[0]['chat']['id'] == second_id

        await second.send(type='join', chat_id=first_id, last_seq=0)
        seen.append(await second.expect('joined'))
        assert seen[-1]['chat']['id'] == second_id

        await say(first, 'first secret', 'a')
        await say(staff, 'staff secret', 'b', chat_id=first_id)
        await first.expect('message', seq=2)

        await second.send(
            type='message', chat_id=first_id, text='let me in',
            client_id='c',
        )
        seen.append(await second.expect('ack', client_id='c'))
        assert seen[-1]['chat_id'] == second_id
        assert seen[-1]['seq'] == 1
        seen.append(await second.expect('message', seq=1))
        assert seen[-1]['chat_id'] == second_id
        seen.extend(await settle(second))

        assert first_id not in texts(seen)
        assert 'secret' not in texts(seen)
        for peer in (first, staff):
            assert 'let me in' not in texts(await settle(peer))

        before = snapshot(settings['dsn'])
        nobody = await connect(chat_server, nobody_web)
        hello = await nobody.expect('hello')
        assert (hello['role'], hello['chat']) == ('customer', None)
        for frame in (
            {'type': 'join', 'last_seq': 0},
            {'type': 'join', 'chat_id': first_id, 'last_seq': 0},
            {'type': 'message', 'text': 'hi', 'client_id': 'n1'},
            {'type': 'message', 'text': 'hi', 'client_id': 'n2',
             'chat_id': first_id},
        ):
            reply = await error(nobody, **frame)
            assert reply['code'] == 'not_found'
            assert reply['ref'] == frame.get('client_id', 'join')
        assert await settle(nobody) == []
        assert snapshot(settings['dsn']) == before

    run(talk)
    assert stored(settings['dsn'], first_id) == [
        (1, 'customer', 'first secret', 'a'),
        (2, 'staff', 'staff secret', 'b'),
    ]
    assert stored(settings['dsn'], second_id) == [
        (1, 'customer', 'let me in', 'c'),
    ]


# Roles ---------------------------------------------------------------------


def test_roles_are_enforced(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A customer sending accept or end gets forbidden, a staff member
    gets not_found for a colleague's chat (conflict for accept), and
    nothing changes in the database."""
    add_staff(town_app)
    add_staff(town_app, 'bob', 'Bob Staff')
    customer_web, alice_web, bob_web = (TestApp(town_app) for _ in 'abc')
    chat_id = start_chat(customer_web)
    log_in(alice_web)
    log_in(bob_web, 'bob')
    dsn = settings['dsn']

    async def customer_refused(customer: Peer) -> None:
        before = snapshot(dsn)
        for kind in ('accept', 'end'):
            for frame in ({}, {'chat_id': chat_id}):
                reply = await error(customer, type=kind, **frame)
                assert reply['code'] == 'forbidden'
                assert reply['ref'] == kind
        assert snapshot(dsn) == before

    async def talk() -> None:
        customer = await connect(chat_server, customer_web)
        await customer.expect('hello')
        await customer_refused(customer)
        assert chat_row(dsn, chat_id)['state'] == 'waiting'
        await customer.close()

        customer, alice = await open_chat(
            chat_server, customer_web, alice_web, chat_id
        )
        await say(customer, 'hi', 'c1')
        await customer_refused(customer)
        row = chat_row(dsn, chat_id)
        assert (row['state'], row['ended']) == ('active', None)
        assert len(stored(dsn, chat_id)) == 1

        bob = await connect(chat_server, bob_web)
        hello = await bob.expect('hello')
        assert hello['active'] == []
        before = snapshot(dsn)
        for frame in (
            {'type': 'join', 'chat_id': chat_id, 'last_seq': 0},
            {'type': 'message', 'chat_id': chat_id, 'text': 'x',
             'client_id': 'b1'},
            {'type': 'end', 'chat_id': chat_id},
        ):
            reply = await error(bob, **frame)
            assert reply['code'] == 'not_found', frame
        reply = await error(bob, type='accept', chat_id=chat_id)
        assert reply['code'] == 'conflict'
        assert snapshot(dsn) == before

        assert await settle(bob) == []
        for peer in (customer, alice):
            received = [
                (m['type'], m.get('text')) for m in await settle(peer)
                if m['type'] in ('message', 'state')
            ]
            assert received == [('message', 'hi')]

    run(talk)


def test_staff_cannot_write_to_waiting_chat(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A staff member sending into a chat nobody accepted yet gets
    forbidden, and nothing is stored."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    before = snapshot(settings['dsn'])

    async def talk() -> None:
        staff = await connect(chat_server, staff_web)
        await staff.expect('hello')
        reply = await error(
            staff, type='message', chat_id=chat_id, text='early',
            client_id='s1',
        )
        assert reply['code'] == 'forbidden'
        assert reply['ref'] == 's1'

    run(talk)
    assert snapshot(settings['dsn']) == before


def test_staff_of_other_tenant_sees_nothing(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """Staff of another tenant on the same server never hear of this
    tenant's requests and get not_found for every command on its chat."""

    class OtherApp(TownApp):
        pass

    OtherApp.commit()
    other = OtherApp()
    other.configure_application(**settings)
    other.set_application_id('town/other')
    try:
        add_staff(town_app)
        add_staff(other, 'carol', 'Carol Elsewhere')
        customer_web, alice_web = TestApp(town_app), TestApp(town_app)
        carol_web, later_web = TestApp(other), TestApp(other)
        log_in(alice_web)
        log_in(carol_web, 'carol')
        log_in(later_web, 'carol')
        chat_id = start_chat(customer_web)
        dsn = settings['dsn']

        async def talk() -> None:
            carol = await connect(chat_server, carol_web)
            hello = await carol.expect('hello')
            assert hello['tenant'] == 'town-other'
            assert hello['active'] == []
            alice = await connect(chat_server, alice_web)
            await alice.expect('hello')
            # The chat waits already: its request comes with the greeting,
            # and again when the customer connects.
            await alice.expect('request')

            customer = await connect(chat_server, customer_web)
            await customer.expect('hello')
            request = await alice.expect('request')
            assert request['chat']['id'] == chat_id

            later = await connect(chat_server, later_web)
            await later.expect('hello')
            assert await settle(later) == []
            assert await settle(carol) == []

            before = snapshot(dsn)
            for frame in (
                {'type': 'accept', 'chat_id': chat_id},
                {'type': 'join', 'chat_id': chat_id, 'last_seq': 0},
                {'type': 'message', 'chat_id': chat_id, 'text': 'x',
                 'client_id': 'o1'},
                {'type': 'end', 'chat_id': chat_id},
            ):
                reply = await error(carol, **frame)
                assert reply['code'] == 'not_found', frame
            assert snapshot(dsn) == before
            assert chat_row(dsn, chat_id)['state'] == 'waiting'

            await alice.send(type='accept', chat_id=chat_id)
            await alice.expect('accepted')
            await alice.expect('taken', chat_id=chat_id)
            for peer in (carol, later):
                assert await settle(peer) == []

        run(talk)
    finally:
        other.dispose()


# Announcements -------------------------------------------------------------


def test_requests_are_announced_to_staff(
    chat_server: Any, town_app: Any
) -> None:
    """Staff connected before the customer get a request when it connects,
    staff connecting later get it in their greeting, and all get taken
    once one of them accepts."""
    add_staff(town_app)
    add_staff(town_app, 'bob', 'Bob Staff')
    customer_web, alice_web, bob_web = (TestApp(town_app) for _ in 'abc')
    log_in(alice_web)
    log_in(bob_web, 'bob')

    async def talk() -> None:
        alice = await connect(chat_server, alice_web)
        await alice.expect('hello')
        chat_id = start_chat(customer_web)
        assert await settle(alice) == []

        customer = await connect(chat_server, customer_web)
        await customer.expect('hello')
        await customer.send(type='join', last_seq=0)
        await customer.expect('joined')
        request = await alice.expect('request')
        assert request['chat']['id'] == chat_id
        assert request['chat']['state'] == 'waiting'
        assert request['chat']['customer_name'] == 'Carla Customer'
        assert 'customer_email' not in request['chat']

        bob = await connect(chat_server, bob_web)
        await bob.expect('hello')
        request = await bob.expect('request')
        assert request['chat']['id'] == chat_id

        await alice.send(type='accept', chat_id=chat_id)
        accepted = await alice.expect('accepted')
        assert accepted['chat']['staff_name'] == 'Alice Staff'
        await bob.expect('taken', chat_id=chat_id)
        state = await customer.expect('state')
        assert state['chat']['state'] == 'active'

        await bob.close()
        bob = await connect(chat_server, bob_web)
        await bob.expect('hello')
        assert await settle(bob) == []

    run(talk)


def test_concurrent_accepts_have_one_winner(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """Two staff members accepting the same chat at the same moment: one
    gets accepted, the other conflict, and the chat is the winner's."""
    ids = {
        'alice': add_staff(town_app),
        'bob': add_staff(town_app, 'bob', 'Bob Staff'),
    }
    webs = {name: TestApp(town_app) for name in ids}
    for name, web in webs.items():
        log_in(web, name)

    async def outcome(peer: Peer, chat_id: str) -> dict[str, Any]:
        message = await answer(peer)
        if message['type'] == 'accepted':
            assert message['chat']['id'] == chat_id
        else:
            assert message['ref'] == chat_id
        return message

    async def race() -> None:
        peers = {
            name: await connect(chat_server, web)
            for name, web in webs.items()
        }
        for peer in peers.values():
            await peer.expect('hello')

        for _ in range(4):
            chat_id = start_chat(TestApp(town_app))
            await asyncio.gather(*(
                peer.send(type='accept', chat_id=chat_id)
                for peer in peers.values()
            ))
            results = {
                name: await outcome(peer, chat_id)
                for name, peer in peers.items()
            }
            kinds = sorted(result['type'] for result in results.values())
            assert kinds == ['accepted', 'error']
            winner, = (
                name for name, result in results.items()
                if result['type'] == 'accepted'
            )
            loser, = set(results) - {winner}
            assert results[loser]['code'] == 'conflict'
            row = chat_row(settings['dsn'], chat_id)
            assert row['state'] == 'active'
            assert row['staff_id'] == ids[winner]


    run(race)


# Delivery ------------------------------------------------------------------


def test_resume_delivers_missed_messages_once(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A customer whose connection dropped joins again with the last seq
    it saw and gets exactly what it missed, in order, then live messages:
    no gap and no duplicate."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    received: list[int] = []

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        assert await say(customer, 'one', 'c1') == 1
        assert await say(staff, 'two', 's2', chat_id=chat_id) == 2
        for _ in range(2):
            received.append((await customer.expect('message'))['seq'])

        # The network drops; the staff member goes on writing.
        customer.connection.transport.abort()
        await closed(customer)
        for number in range(3, 6):
            seq = await say(staff, f'missed {number}', f's{number}',
                            chat_id=chat_id)
            assert seq == number

        async def write_on() -> None:
            for number in range(6, 8):
                await say(staff, f'racing {number}', f's{number}',
                          chat_id=chat_id)

        customer = await connect(chat_server, customer_web)
        await customer.expect('hello')
        await asyncio.gather(
            customer.send(type='join', last_seq=received[-1]), write_on()
        )
        await customer.expect('joined')
        while len(received) < 7:
            received.append((await customer.expect('message'))['seq'])

        assert await say(staff, 'live', 's8', chat_id=chat_id) == 8
        received.append((await customer.expect('message'))['seq'])
        assert [
            m for m in await settle(customer) if m['type'] == 'message'
        ] == []

    run(talk)
    assert received == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [row[0] for row in stored(settings['dsn'], chat_id)] == [
        1, 2, 3, 4, 5, 6, 7, 8
    ]


def test_resent_message_is_stored_once(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A message sent again with the same client_id, also after a
    reconnect, is acknowledged with the same seq as a duplicate, stored
    once and delivered once."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)

    async def resend(peer: Peer) -> None:
        await peer.send(type='message', text='only once', client_id='d-1')
        ack = await answer(peer)
        assert ack == {
            'type': 'ack', 'chat_id': chat_id, 'client_id': 'd-1',
            'seq': 1, 'duplicate': True,
        }

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        assert await say(customer, 'only once', 'd-1') == 1
        await resend(customer)
        await resend(customer)

        customer.connection.transport.abort()
        await closed(customer)
        customer = await connect(chat_server, customer_web)
        await customer.expect('hello')
        await resend(customer)
        assert await say(customer, 'and then', 'd-2') == 2

        messages = [
            (m['seq'], m['text']) for m in await settle(staff)
            if m['type'] == 'message'
        ]
        assert messages == [(1, 'only once'), (2, 'and then')]

    run(talk)
    assert stored(settings['dsn'], chat_id) == [
        (1, 'customer', 'only once', 'd-1'),
        (2, 'customer', 'and then', 'd-2'),
    ]


def test_client_ids_of_both_sides_do_not_collide(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A customer message is stored even when its client_id happens to be
    one the staff member used in the same chat."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        assert await say(staff, 'from staff', 'm1', chat_id=chat_id) == 1
        await customer.send(
            type='message', text='from customer', client_id='m1'
        )
        ack = await answer(customer)
        assert ack['seq'] == 2
        assert ack['duplicate'] is False

    run(talk)
    assert [row[2] for row in stored(settings['dsn'], chat_id)] == [
        'from staff', 'from customer'
    ]


# Bad input -----------------------------------------------------------------


def nested(depth: int) -> str:
    """A JSON object `depth` levels deep."""
    return '{"a":' * depth + '1' + '}' * depth


#: Frames the protocol refuses, with the error code of the reply.
BAD_FRAMES = [
    ('not json', 'bad_json'),
    ('', 'bad_json'),
    ('{"type": "ping"', 'bad_json'),
    ('[]', 'bad_json'),
    ('["ping"]', 'bad_json'),
    ('"ping"', 'bad_json'),
    ('42', 'bad_json'),
    ('null', 'bad_json'),
    ('[' * 100_000, 'bad_json'),
    ('{"type": "join", "last_seq": ' + '9' * 5000 + '}', 'bad_json'),
    ('{}', 'unknown_type'),
    ('{"type": "shout"}', 'unknown_type'),
    ('{"type": null}', 'unknown_type'),
    ('{"type": ["ping"]}', 'unknown_type'),
    ('{"type": "join", "last_seq": "2"}', 'bad_field'),
    ('{"type": "join", "last_seq": true}', 'bad_field'),
    ('{"type": "join", "last_seq": 1.5}', 'bad_field'),
    ('{"type": "join", "last_seq": NaN}', 'bad_field'),
    ('{"type": "join", "last_seq": -1}', 'bad_field'),
    ('{"type": "join", "last_seq": 2147483648}', 'bad_field'),
    ('{"type": "join", "chat_id": "zz"}', 'bad_field'),
    ('{"type": "message", "text": 42, "client_id": "x"}', 'bad_field'),
    ('{"type": "message", "text": null, "client_id": "x"}', 'bad_field'),
    ('{"type": "message", "text": true, "client_id": "x"}', 'bad_field'),
    ('{"type": "message", "text": "", "client_id": "x"}', 'bad_field'),
    ('{"type": "message", "text": " \\n ", "client_id": "x"}', 'bad_field'),
    ('{"type": "message", "text": "a\\u0000b", "client_id": "x"}',
     'bad_field'),
    ('{"type": "message", "text": "\\ud800", "client_id": "x"}',
     'bad_field'),
    ('{"type": "message", "text": "hi"}', 'bad_field'),
    ('{"type": "message", "text": "hi", "client_id": 7}', 'bad_field'),
    ('{"type": "message", "text": "hi", "client_id": "a b"}', 'bad_field'),
    ('{"type": "message", "text": "hi", "client_id": "x", '
     '"role": "staff"}', 'bad_field'),
    ('{"type": "ping", "extra": 1}', 'bad_field'),
    ('{"type": "message", "client_id": "x", "text": ' + nested(50) + '}',
     'bad_field'),
    (json.dumps({
        'type': 'message', 'client_id': 'x', 'text': 'x' * 4001,
    }), 'too_long'),
]


@configured(rate_limit=1000, max_size=256 * 1024)
def test_bad_frames_are_answered_and_change_nothing(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """Each frame the protocol refuses is answered with its error code,
    stores nothing, reaches nobody and leaves the connection open."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    dsn = settings['dsn']

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        before = snapshot(dsn)
        for peer in (customer, staff):
            for frame, code in BAD_FRAMES:
                await peer.connection.send(frame)
                reply = await answer(peer)
                assert (reply['type'], reply['code']) == ('error', code), (
                    frame[:80]
                )
                # The reply never quotes what was sent.
                assert len(json.dumps(reply)) < 200
            assert await settle(peer) == []
        assert snapshot(dsn) == before

        longest = 'x' * 3999 + '🏡'
        assert await say(customer, longest, 'longest') == 1
        message = await staff.expect('message', seq=1)
        assert message['text'] == longest

    run(talk)
    assert stored(dsn, chat_id) == [
        (1, 'customer', 'x' * 3999 + '🏡', 'longest')
    ]
    served_cleanly(chat_server)


#: Frames that end the connection, with the close code.
VIOLATIONS: list[tuple[str | bytes, bool, int]] = [
    ('{"type": "ping", "pad": "' + 'x' * 65_536 + '"}', True, 1009),
    ('[' * 100_000, True, 1009),
    (b'{"type": "ping"}', False, 1003),
    (b'\xff\xfe', True, 1007),
    (b'{"type": "message", "text": "\xc0\xaf"}', True, 1007),
    (b'"\xed\xa0\x80"', True, 1007),
]


def test_protocol_violations_close_the_connection(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """An oversize frame closes with 1009, a binary one with 1003, invalid
    UTF-8 with 1007, never 1011, and the server goes on serving."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    dsn = settings['dsn']

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        await customer.close()
        before = snapshot(dsn)
        for frame, text, code in VIOLATIONS:
            peer = await connect(chat_server, customer_web)
            await peer.expect('hello')
            await peer.connection.send(frame, text=text)
            assert await closed(peer) == code
            assert await settle(staff) == []
        assert snapshot(dsn) == before

        customer = await connect(chat_server, customer_web)
        await customer.send(type='join', last_seq=0)
        await customer.expect('joined')
        assert await say(customer, 'still here', 'c1') == 1
        await staff.expect('message', seq=1)

    run(talk)
    served_cleanly(chat_server)
    assert 'internal error' not in chat_server.log()


# Neither the store nor the database is involved: SQLite only.
@pytest.mark.parametrize('store_url', ['sqlite'], indirect=True)
def test_binary_frame_leaves_no_handler_behind(
    chat_server: Any, town_app: Any
) -> None:
    """Once a connection is closed for a binary frame the server has
    nothing left of it to wait for, and stops within two seconds."""
    web = TestApp(town_app)
    start_chat(web)

    async def talk() -> None:
        peer = await connect(chat_server, web)
        await peer.expect('hello')
        await peer.connection.send(b'{"type": "ping"}')
        assert await closed(peer) == 1003

    run(talk)
    started = time.monotonic()
    chat_server.process.send_signal(signal.SIGTERM)
    chat_server.process.wait(timeout=10)
    assert time.monotonic() - started < 2


# Limits --------------------------------------------------------------------


@configured(rate_limit=5, rate_limit_window=10)
def test_rate_limit(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """Of 8 messages sent at once with a limit of 5 per 10 seconds, 5 are
    stored and 3 refused with retry_after; other customers go on."""
    customer_web, other_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    other_id = start_chat(other_web, name='Otto')

    async def talk() -> None:
        customer = await connect(chat_server, customer_web)
        await customer.expect('hello')
        for number in range(8):
            await customer.send(
                type='message', text=f'spam {number}', client_id=f'r{number}'
            )
        replies = [await answer(customer) for _ in range(8)]

        acks = [r for r in replies if r['type'] == 'ack']
        assert [ack['seq'] for ack in acks] == [1, 2, 3, 4, 5]
        refusals = [r for r in replies if r['type'] == 'error']
        assert [r['code'] for r in refusals] == ['rate_limited'] * 3
        for refusal in refusals:
            assert 0 < refusal['retry_after'] <= 10

        other = await connect(chat_server, other_web)
        await other.expect('hello')
        assert await say(other, 'not me', 'o1') == 1

    run(talk)
    assert [row[2] for row in stored(settings['dsn'], chat_id)] == [
        f'spam {number}' for number in range(5)
    ]
    assert len(stored(settings['dsn'], other_id)) == 1


@configured(max_connections_per_session=2)
def test_connections_per_session_are_capped(
    chat_server: Any, town_app: Any
) -> None:
    """A third connection of one browser session is closed with 4003; the
    first two keep working."""
    web = TestApp(town_app)
    start_chat(web)

    async def talk() -> None:
        first = await connect(chat_server, web)
        second = await connect(chat_server, web)
        for peer in (first, second):
            await peer.expect('hello')

        third = await connect(chat_server, web)
        assert await closed(third) == 4003
        for peer in (first, second):
            assert await settle(peer) == []

        other = await connect(chat_server, TestApp(town_app))
        await other.expect('hello')

    run(talk)
    chat_server.wait_for_log('event=connection_refused '
                             'reason=too_many_connections')


@configured(send_queue_size=8, rate_limit=100_000, max_text_length=60_000)
def test_stalled_reader_does_not_delay_others(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A staff connection that stops reading is given up once its send
    queue is full, while the customer gets every message within two
    seconds."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    sent: dict[int, float] = {}
    arrived: dict[int, float] = {}

    async def stalled() -> Peer:
        # A small receive buffer, and a client that stops reading after
        # it joined: the server's writes soon block.
        credentials = fetch_token(staff_web)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(('127.0.0.1', chat_server.port))
        connection = await connect_websocket(
            ws_url(chat_server, credentials), sock=sock, origin=ORIGIN,
            additional_headers={
                'Cookie': f'session_id={credentials.cookie}'
            },
            max_queue=1, compression=None,
        )
        _opened.get().append(connection)
        peer = Peer(connection)
        await peer.expect('hello')
        await peer.send(type='join', chat_id=chat_id, last_seq=0)
        await peer.expect('joined')
        return peer

    async def read(customer: Peer) -> None:
        while True:
            message = await customer.expect('message')
            arrived[message['seq']] = time.monotonic()

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        slow = await stalled()
        reader = asyncio.create_task(read(customer))

        # Write until the server gives the stalled connection up (the
        # kernel buffers between the two hold some megabytes), and on.
        number, more = 0, 20
        while more:
            number += 1
            assert number <= 500, 'the stalled connection was kept'
            sent[number] = time.monotonic()
            text = f'{number:04} ' + 'x' * 59_000
            assert await say(staff, text, f's{number}', chat_id=chat_id) == (
                number
            )
            if 'event=client_too_slow' in chat_server.log():
                more -= 1

        for _ in range(200):
            if len(arrived) == number:
                break
            await asyncio.sleep(0.01)
        reader.cancel()

        # The stalled connection finds a close frame (4002) or a reset
        # behind what it was sent before.
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(slow.connection.recv(), 10)
        assert slow.connection.close_code in (4002, None)

    run(talk)
    assert list(arrived) == list(range(1, len(sent) + 1))
    delays = [arrived[seq] - sent[seq] for seq in arrived]
    assert max(delays) < 2.0
    assert len(stored(settings['dsn'], chat_id)) == len(sent)
    served_cleanly(chat_server)


# Sessions and ends ---------------------------------------------------------


@configured(liveness_interval=0.5)
def test_logout_closes_staff_socket(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """A staff member who logs out has the open socket closed with 4000
    within seconds, and cannot send into the chat afterwards."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    dsn = settings['dsn']

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        assert await say(staff, 'before', 's1', chat_id=chat_id) == 1

        response = staff_web.post('/chat/logout')
        assert response.status_int == 303
        started = time.monotonic()
        assert await closed(staff, timeout=5) == 4000
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionClosed):
            await say(staff, 'after', 's2', chat_id=chat_id)

        # The browser is someone without a session now.
        again = await connect(chat_server, staff_web)
        hello = await again.expect('hello')
        assert hello['role'] == 'customer'
        reply = await error(
            again, type='message', chat_id=chat_id, text='after',
            client_id='s3',
        )
        assert reply['code'] == 'not_found'

        # The customer stays.
        assert [
            m['seq'] for m in await settle(customer)
            if m['type'] == 'message'
        ] == [1]

    run(talk)
    assert [row[2] for row in stored(dsn, chat_id)] == ['before']
    chat_server.wait_for_log('event=session_ended .* role=staff')


def test_ended_chat(
    chat_server: Any, town_app: Any, settings: dict[str, Any]
) -> None:
    """After end the customer is closed with 4001 and staff get ended; the
    chat is in the archive; a reconnecting customer is told it ended and
    closed, and messages to it get chat_ended."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    dsn = settings['dsn']

    async def talk() -> None:
        customer, staff = await open_chat(
            chat_server, customer_web, staff_web, chat_id
        )
        assert await say(customer, 'thanks & bye', 'c1') == 1
        assert await say(staff, 'bye', 's1', chat_id=chat_id) == 2

        await staff.send(type='end', chat_id=chat_id)
        ended = await answer(staff)
        assert ended['type'] == 'ended'
        assert ended['chat']['state'] == 'ended'
        state = await customer.expect('state')
        assert state['chat']['state'] == 'ended'
        assert await closed(customer) == 4001

        customer = await connect(chat_server, customer_web)
        hello = await customer.expect('hello')
        assert hello['chat']['id'] == chat_id
        assert hello['chat']['state'] == 'ended'
        assert await closed(customer) == 4001

        before = snapshot(dsn)
        reply = await error(
            staff, type='message', chat_id=chat_id, text='late',
            client_id='s2',
        )
        assert reply['code'] == 'chat_ended'
        reply = await error(staff, type='end', chat_id=chat_id)
        assert reply['code'] == 'chat_ended'
        assert snapshot(dsn) == before

    run(talk)
    row = chat_row(dsn, chat_id)
    assert row['state'] == 'ended'
    assert row['ended'] is not None

    archive = staff_web.get('/chat/archive')
    assert f'/chat/archive/{chat_id}"' in archive.text
    assert 'Carla Customer' in archive.text
    transcript = staff_web.get(f'/chat/archive/{chat_id}')
    assert 'thanks &amp; bye' in transcript.text
    assert re.findall(r'data-seq="(\d+)"', transcript.text) == ['1', '2']
    assert customer_web.get('/chat/archive').status_int == 303
