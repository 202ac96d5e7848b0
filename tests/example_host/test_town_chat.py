"""The town tests its chat page with nothing but onegov.chat's test kit."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from onegov.chat.testing import assert_refused


def start_chat(browser: Any) -> str:
    browser.post('/chat', {
        'name': 'Hans Muster', 'email': 'hans@example.org',
        'topic': 'Waste collection',
    })
    page = browser.get('/chat/conversation')
    match = re.search(r'data-chat="([0-9a-f]{32})"', page.text)
    assert match is not None
    return match.group(1)


def test_home_links_to_the_chat(chat_browser: Any) -> None:
    """The town's home page links to the chat's start page."""
    assert 'href="/chat"' in chat_browser.get('/').text
    assert 'Start a chat' in chat_browser.get('/chat').text


def test_customer_connects_to_own_chat(
    chat_browser: Any, chat_server: Any
) -> None:
    """A customer who started a chat is greeted with that chat."""
    chat_id = start_chat(chat_browser)

    async def connect() -> dict[str, Any]:
        socket = await chat_server.connect(chat_browser)
        hello = await socket.expect('hello')
        await socket.close()
        return hello

    hello = asyncio.run(connect())
    assert hello['role'] == 'customer'
    assert hello['chat']['id'] == chat_id
    assert hello['chat']['topic'] == 'Waste collection'


def test_other_sites_are_refused(
    chat_browser: Any, chat_server: Any
) -> None:
    """A page on another site cannot open the town's chat socket."""
    start_chat(chat_browser)
    asyncio.run(assert_refused(
        chat_server, chat_browser, 403, 'origin_not_allowed',
        origin='https://evil.example',
    ))


def test_a_token_works_once(chat_browser: Any, chat_server: Any) -> None:
    """A replayed token is refused."""
    start_chat(chat_browser)
    url = chat_browser.get('/chat/token').json['url']

    async def twice() -> None:
        from websockets.asyncio.client import connect

        cookie = chat_browser.cookies['session_id']
        async with connect(
            chat_server.websocket_url(url), origin=chat_server.origin,
            additional_headers={'Cookie': f'session_id={cookie}'},
        ):
            pass
        await assert_refused(
            chat_server, chat_browser, 401, 'token_not_stored',
            token_url=url,
        )

    asyncio.run(twice())
