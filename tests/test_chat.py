"""The chat through real processes: customers, staff, history."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from webtest import TestApp

from conftest import Peer, add_staff, log_in, start_chat
from onegov.chat.models import Chat, Message


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
