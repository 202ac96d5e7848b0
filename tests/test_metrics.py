"""The Prometheus endpoint of ``onegov-chat serve``, during a session."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from webtest import TestApp

from conftest import (
    ORIGIN,
    Peer,
    ServerProcess,
    add_staff,
    fetch_token,
    log_in,
    start_chat,
    ws_url,
)


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Four frames per minute, so that the fifth is refused."""
    return {**settings, 'rate_limit': 4, 'rate_limit_window': 60}


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every sample of the metrics endpoint, by name and labels."""
    url = f'http://127.0.0.1:{server.port}/metrics'
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(
    before: dict[tuple[str, tuple[Any, ...]], float],
    after: dict[tuple[str, tuple[Any, ...]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def refused(server: ServerProcess, url: str, cookie: str,
                  origin: str) -> int:
    try:
        async with connect(
            url, origin=origin,  # type: ignore[arg-type]
            additional_headers={'Cookie': f'session_id={cookie}'},
        ):
            pass
    except InvalidStatus as refusal:
        return int(refusal.response.status_code)
    raise AssertionError('admitted')


def test_counters_follow_a_scripted_session(
    chat_server: ServerProcess, town_app: Any
) -> None:
    """Admitted and refused handshakes, messages and a rate-limit refusal
    each move their counter by exactly the right amount."""
    add_staff(town_app)
    customer_web, staff_web = TestApp(town_app), TestApp(town_app)
    chat_id = start_chat(customer_web)
    log_in(staff_web)
    before = scrape(chat_server)

    async def session() -> dict[tuple[str, tuple[Any, ...]], float]:
        # Two refusals: a foreign origin, then a wrong token.
        credentials = fetch_token(customer_web)
        url = ws_url(chat_server, credentials)
        assert await refused(
            chat_server, url, credentials.cookie, 'https://evil.example'
        ) == 403
        wrong = url.replace(credentials.token, 'x' * 43)
        assert await refused(
            chat_server, wrong, credentials.cookie, ORIGIN
        ) == 401

        # Two admissions, a claimed chat, three messages.
        staff = await Peer.connect(chat_server, staff_web)
        await staff.expect('hello')
        customer = await Peer.connect(chat_server, customer_web)
        await customer.expect('hello')
        await staff.send(type='accept', chat_id=chat_id)
        await staff.expect('accepted')
        await staff.send(type='join', chat_id=chat_id, last_seq=0)
        await staff.expect('joined')
        await customer.send(type='join', last_seq=0)
        await customer.expect('joined')
        for number in (1, 2, 3):
            await customer.send(
                type='message', text=f'hello {number}',
                client_id=f'm{number}',
            )
            await customer.expect('ack', client_id=f'm{number}')
            await staff.expect('message', seq=number)

        # The customer's fifth frame in a minute is refused.
        await customer.send(type='message', text='too much', client_id='m4')
        await customer.expect('error', code='rate_limited')

        during = scrape(chat_server)
        await customer.close()
        await staff.close()
        return during

    during = asyncio.run(session())

    handshakes = 'onegov_chat_handshakes_total'
    assert moved(before, during, handshakes, outcome='admitted',
                 reason='') == 2
    assert moved(before, during, handshakes, outcome='refused',
                 reason='origin_not_allowed') == 1
    assert moved(before, during, handshakes, outcome='refused',
                 reason='token_mismatch') == 1
    assert moved(before, during,
                 'onegov_chat_tokens_consumed_total') == 2
    assert moved(before, during,
                 'onegov_chat_messages_received_total') == 3
    assert moved(before, during,
                 'onegov_chat_messages_stored_total') == 3
    # Each message reaches both members of the chat.
    assert moved(before, during,
                 'onegov_chat_messages_delivered_total') == 6
    assert moved(before, during,
                 'onegov_chat_delivery_latency_seconds_count') == 3
    assert moved(before, during, 'onegov_chat_rate_limited_total') == 1
    assert during[('onegov_chat_connections', (('role', 'customer'),))] == 1
    assert during[('onegov_chat_connections', (('role', 'staff'),))] == 1


def test_expired_tokens_are_counted(
    start_server: Any, make_client: Any
) -> None:
    """A token presented after its lifetime moves the expired counter."""
    server = start_server()
    client = make_client(token_ttl=1)
    credentials = fetch_token(client)
    before = scrape(server)

    async def late() -> int:
        await asyncio.sleep(1.2)
        return await refused(
            server, ws_url(server, credentials), credentials.cookie, ORIGIN
        )

    assert asyncio.run(late()) == 401
    after = scrape(server)
    assert moved(before, after, 'onegov_chat_tokens_expired_total') == 1
    assert moved(before, after, 'onegov_chat_handshakes_total',
                 outcome='refused', reason='token_expired') == 1


def test_health_endpoint(chat_server: ServerProcess) -> None:
    """``/healthz`` answers ``ok`` while store and database answer."""
    url = f'http://127.0.0.1:{chat_server.port}/healthz'
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.read() == b'ok\n'


def test_web_app_counts_issued_tokens(client: TestApp) -> None:
    """Each ``/chat/token`` moves the web app's issued-tokens counter."""
    from prometheus_client import REGISTRY

    name = 'onegov_chat_tokens_issued_total'
    before = REGISTRY.get_sample_value(name) or 0.0
    client.get('/chat/token')
    client.get('/chat/token')
    assert REGISTRY.get_sample_value(name) == before + 2
