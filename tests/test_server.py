"""``onegov-chat serve``: a real server process, a real websocket client.

Every test runs against the SQLite store and a real Redis (see the
``store_url`` fixture). Tokens and cookies come from a real host app
under WebTest, as a browser would get them from ``/chat/token``.

"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin
from webtest import TestApp

from conftest import (
    ORIGIN,
    TENANT,
    Credentials,
    ServerProcess,
    TownApp,
    fetch_token,
    ws_url,
)

SCHEMA = 'town-govikon'

#: What the server says first on an admitted connection. Later versions
#: of the protocol may add fields; these must be there.
HELLO = {
    'type': 'hello', 'protocol': 1, 'role': 'customer', 'tenant': SCHEMA,
}

#: The status and the one-line body of each refusal, by reason.
REFUSALS = {
    'origin_not_allowed': (403, 'origin not allowed'),
    'origin_missing': (403, 'origin missing'),
    'origin_repeated': (403, 'more than one origin'),
    'path_unknown': (404, 'unknown path'),
    'schema_invalid': (400, 'missing or invalid schema'),
    'cookie_missing': (401, 'no session cookie'),
    'cookie_invalid': (401, 'invalid session cookie'),
    'cookie_repeated': (401, 'more than one session cookie'),
    'session_unknown': (401, 'unknown or expired session'),
    'token_missing': (401, 'no token presented'),
    'token_not_stored': (401, 'no token stored in the session'),
    'token_expired': (401, 'token expired'),
    'token_mismatch': (401, 'token does not match'),
}

Then = Callable[[ClientConnection], Awaitable[None]]


@dataclass
class Outcome:
    """What one handshake came to, as the client saw it."""

    #: The client's port: the server logs the peer with it.
    port: int
    #: 101 when admitted.
    status: int
    body: bytes = b''
    hello: dict[str, Any] | None = None


async def handshake(
    url: str,
    cookie: str | None,
    origin: str | None = ORIGIN,
    headers: Sequence[tuple[str, str]] = (),
    then: Then | None = None,
) -> Outcome:
    """Open a websocket to `url`; read the hello and run `then` if it is
    admitted, then close."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    port = sock.getsockname()[1]
    extra = list(headers)
    if cookie is not None:
        extra.append(('Cookie', f'session_id={cookie}'))

    try:
        async with connect(
            url,
            sock=sock,
            origin=None if origin is None else Origin(origin),
            additional_headers=extra,
            open_timeout=10,
        ) as connection:
            hello = json.loads(await connection.recv())
            if then is not None:
                await then(connection)
    except InvalidStatus as exc:
        response = exc.response
        return Outcome(port, response.status_code, bytes(response.body))
    finally:
        sock.close()
    return Outcome(port, 101, hello=hello)


def attempt(url: str, cookie: str | None, **kw: Any) -> Outcome:
    return asyncio.run(handshake(url, cookie, **kw))


def log_line(event: str, port: int) -> str:
    """A pattern for the server's whole log line about one handshake."""
    return (
        rf' INFO onegov\.chat\.server event={event}'
        rf' peer=127\.0\.0\.1:{port}$'
    )


def refuse(
    server: ServerProcess,
    url: str,
    cookie: str | None,
    reason: str,
    **kw: Any,
) -> Outcome:
    """Assert the handshake is refused for `reason`, and logged so."""
    outcome = attempt(url, cookie, **kw)
    status, text = REFUSALS[reason]
    assert (outcome.status, outcome.body) == (status, f'{text}\n'.encode())
    server.wait_for_log(log_line(
        f'handshake_refused reason={reason} status={status}', outcome.port
    ))
    return outcome


def greeting(hello: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of `hello` that every version of it carries."""
    assert hello is not None
    return {key: hello.get(key) for key in HELLO}


def admit(
    server: ServerProcess,
    url: str,
    cookie: str | None,
    role: str = 'customer',
    tenant: str = TENANT,
    **kw: Any,
) -> dict[str, Any]:
    """Assert the handshake is admitted and logged; return the fields of
    the hello that every version carries."""
    outcome = attempt(url, cookie, **kw)
    assert outcome.status == 101, outcome.body
    server.wait_for_log(log_line(
        f'handshake_admitted tenant={tenant} role={role}', outcome.port
    ))
    return greeting(outcome.hello)


def chats_url(
    server: ServerProcess, path: str = '/chats', **params: str
) -> str:
    return f'{server.url}{path}?{urlencode(params)}'


def session_id_of(client: TestApp, credentials: Credentials) -> str:
    session_id: str | None = client.app.cookie_signer.unsign(
        credentials.cookie
    )
    assert session_id is not None
    return session_id


def refusals(server: ServerProcess) -> list[str]:
    """The server's log lines about refused handshakes, in order."""
    return [
        line for line in server.log().splitlines()
        if 'event=handshake_refused' in line
    ]


# Admitted ---------------------------------------------------------------


def test_admitted_with_cookie_origin_and_token(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A handshake with the session cookie, an allowed origin and the
    token is admitted and greeted with the session's role and tenant."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)

    assert admit(chat_server, url, credentials.cookie) == HELLO


def test_two_tabs_of_one_session_both_connect(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """Two tokens issued to one browser session (two tabs) both work, in
    either order."""
    for order in ((0, 1), (1, 0)):
        tabs = [fetch_token(client), fetch_token(client)]
        assert tabs[0].cookie == tabs[1].cookie
        assert tabs[0].token != tabs[1].token

        for tab in (tabs[i] for i in order):
            url = ws_url(chat_server, tab)
            assert admit(chat_server, url, tab.cookie) == HELLO


# Origin -----------------------------------------------------------------


def test_origin_refused_and_token_untouched(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A handshake from an origin not on the allowlist, or from none, is
    refused with 403, and the token it carried still works from the
    right origin."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)

    for origin, reason in [
        # Another site altogether.
        ('http://evil.example', 'origin_not_allowed'),
        # Our host name as the prefix of a foreign one.
        ('http://town.test.evil.example', 'origin_not_allowed'),
        # Our host name as the suffix of a foreign one.
        ('http://eviltown.test', 'origin_not_allowed'),
        # The default port spelt out: browsers never send it.
        ('http://town.test:80', 'origin_not_allowed'),
        # Another scheme is another origin.
        ('https://town.test', 'origin_not_allowed'),
        # The websockets client sends no Origin unless told to.
        (None, 'origin_missing'),
        # An Origin header without a value.
        ('', 'origin_missing'),
        # A sandboxed document, or a privacy-sensitive redirect.
        ('null', 'origin_missing'),
    ]:
        refuse(chat_server, url, credentials.cookie, reason, origin=origin)

    assert admit(chat_server, url, credentials.cookie) == HELLO


def test_repeated_origin_refused_with_403(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """Two Origin headers, even two copies of the allowed one, are
    refused with 403 and logged as origin_repeated."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)

    refuse(
        chat_server, url, credentials.cookie, 'origin_repeated',
        origin=None, headers=[('Origin', ORIGIN), ('Origin', ORIGIN)],
    )


# Path and schema --------------------------------------------------------


def test_unknown_path_or_bad_schema_refused_and_token_untouched(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A path other than /chats is refused with 404, a missing or
    malformed schema with 400, and neither consumes the token."""
    credentials = fetch_token(client)
    token, cookie = credentials.token, credentials.cookie
    base = chat_server.url

    for url, reason in [
        (chats_url(chat_server, '/chat', token=token, schema=SCHEMA),
         'path_unknown'),
        (chats_url(chat_server, '/chats/', token=token, schema=SCHEMA),
         'path_unknown'),
        (chats_url(chat_server, '/', token=token, schema=SCHEMA),
         'path_unknown'),
        (chats_url(chat_server, token=token), 'schema_invalid'),
        (chats_url(chat_server, token=token, schema=''), 'schema_invalid'),
        (chats_url(chat_server, token=token, schema='town'),
         'schema_invalid'),
        (chats_url(chat_server, token=token, schema='town/govikon'),
         'schema_invalid'),
        (chats_url(chat_server, token=token, schema='Town-Govikon'),
         'schema_invalid'),
        (f'{base}/chats?token={token}&schema={SCHEMA}&schema={SCHEMA}',
         'schema_invalid'),
        (f'{base}/chats?token={token}&schema=town-%FF', 'schema_invalid'),
    ]:
        refuse(chat_server, url, cookie, reason)

    url = ws_url(chat_server, credentials)
    assert admit(chat_server, url, cookie) == HELLO


# Cookie -----------------------------------------------------------------


def test_bad_cookie_refused_and_token_untouched(
    chat_server: ServerProcess,
    client: TestApp,
    make_client: Callable[..., TestApp],
) -> None:
    """A handshake whose session cookie is missing, unsigned, tampered
    with, repeated or signed for another tenant is refused with 401, and
    the token still works with the real cookie."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)
    cookie = credentials.cookie
    session_id, signature = cookie.rsplit('.', 1)

    # Change the first character of the signature: the last one carries
    # bits that base64 decoding ignores.
    tampered = ('B' if signature[0] == 'A' else 'A') + signature[1:]

    # Another tenant sharing the store, and its pair presented for ours.
    other = fetch_token(make_client('town/other'))
    other_url = chats_url(chat_server, token=other.token, schema=SCHEMA)

    for case_url, value, headers, reason in [
        (url, None, [], 'cookie_missing'),
        (url, None, [('Cookie', f'other={cookie}')], 'cookie_missing'),
        # The bare session id, as forged from a leaked id.
        (url, session_id, [], 'cookie_invalid'),
        (url, f'{session_id}.', [], 'cookie_invalid'),
        (url, f'{session_id}.{tampered}', [], 'cookie_invalid'),
        # The keys are derived per tenant.
        (other_url, other.cookie, [], 'cookie_invalid'),
        # Two cookies of one name (two paths, or one planted by a
        # sibling domain) are ambiguous, even if both are good.
        (url, None, [('Cookie', f'session_id={cookie}; session_id={cookie}')],
         'cookie_repeated'),
        (url, None, [('Cookie', f'session_id={cookie}')] * 2,
         'cookie_repeated'),
    ]:
        refuse(chat_server, case_url, value, reason, headers=headers)

    assert admit(chat_server, url, cookie) == HELLO

    # On its own tenant the other pair is good: its refusal above was for
    # the tenant alone, and spent nothing.
    hello = admit(
        chat_server, ws_url(chat_server, other), other.cookie,
        tenant='town/other',
    )
    assert hello == {**HELLO, 'tenant': 'town-other'}


# Token ------------------------------------------------------------------


def test_missing_token_refused_and_nothing_burnt(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A handshake without a token, or with an empty one, is refused
    with 401 and does not burn the stored token."""
    credentials = fetch_token(client)
    cookie = credentials.cookie

    for url in [
        chats_url(chat_server, schema=SCHEMA),
        chats_url(chat_server, token='', schema=SCHEMA),
    ]:
        refuse(chat_server, url, cookie, 'token_missing')

    url = ws_url(chat_server, credentials)
    assert admit(chat_server, url, cookie) == HELLO


def test_wrong_token_refused_and_burns_the_stored_one(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A wrong token is refused with 401 and burns the stored one, so the
    right token is refused afterwards."""
    for query, text in [
        # A guess of the right form.
        ('token=8OkHoOS0f8v7ELR0yAYkCQ0M6ZGZcypKQeMbNc6DUsA',
         'token does not match'),
        # Something no token of ours looks like.
        ('token=%21%C3%A4%00', 'token does not match'),
        # The right token, twice: two layers could read either.
        ('token={token}&token={token}', 'malformed token parameter'),
    ]:
        credentials = fetch_token(client)
        query = query.format(token=credentials.token)
        url = f'{chat_server.url}/chats?{query}&schema={SCHEMA}'

        outcome = attempt(url, credentials.cookie)
        assert (outcome.status, outcome.body) == (401, f'{text}\n'.encode())
        chat_server.wait_for_log(log_line(
            'handshake_refused reason=token_mismatch status=401',
            outcome.port,
        ))

        # The token was all the session held, so the session is gone.
        url = ws_url(chat_server, credentials)
        refuse(chat_server, url, credentials.cookie, 'session_unknown')


def test_expired_token_refused(
    chat_server: ServerProcess, make_client: Callable[..., TestApp]
) -> None:
    """A token presented after its lifetime is refused with 401."""
    credentials = fetch_token(make_client(token_ttl=1))
    time.sleep(1.2)

    url = ws_url(chat_server, credentials)
    refuse(chat_server, url, credentials.cookie, 'token_expired')


def test_replayed_token_refused(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A token is good for one handshake: presenting it again is refused
    with 401, whether or not the session outlived it."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)

    assert admit(chat_server, url, credentials.cookie) == HELLO
    # The token was all the session held, so the session is gone too.
    refuse(chat_server, url, credentials.cookie, 'session_unknown')

    # A session with data of its own lives on without its token; the
    # hello names the role it holds.
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)
    client.app.session_store.write(
        TENANT, session_id_of(client, credentials), {'role': 'editor'}
    )

    hello = admit(chat_server, url, credentials.cookie, role='editor')
    assert hello == {**HELLO, 'role': 'editor'}
    refuse(chat_server, url, credentials.cookie, 'token_not_stored')


def test_token_of_another_session_refused(
    chat_server: ServerProcess, client: TestApp, town_app: TownApp
) -> None:
    """A token issued to one browser is refused with 401 when presented
    with another browser's cookie, and burns only that browser's token."""
    alice = fetch_token(client)
    bob = fetch_token(TestApp(town_app))
    assert alice.cookie != bob.cookie

    refuse(
        chat_server, ws_url(chat_server, alice), bob.cookie,
        'token_mismatch',
    )
    assert admit(
        chat_server, ws_url(chat_server, alice), alice.cookie
    ) == HELLO
    refuse(
        chat_server, ws_url(chat_server, bob), bob.cookie,
        'session_unknown',
    )


def test_concurrent_handshakes_with_one_token_admit_one(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """Of 20 concurrent handshakes presenting one token exactly one is
    admitted; the others are refused with 401."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)
    headers = [('Cookie', f'session_id={credentials.cookie}')]

    async def one() -> dict[str, Any] | int:
        try:
            async with connect(
                url, origin=Origin(ORIGIN),
                additional_headers=headers, open_timeout=10,
            ) as connection:
                return greeting(json.loads(await connection.recv()))
        except InvalidStatus as exc:
            return exc.response.status_code

    async def race() -> list[dict[str, Any] | int]:
        return await asyncio.gather(*(one() for _ in range(20)))

    results = asyncio.run(race())
    assert sorted(results, key=str) == [401] * 19 + [HELLO]

    chat_server.wait_for_log('event=handshake_admitted')
    deadline = time.monotonic() + 10
    while len(refusals(chat_server)) < 19 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = refusals(chat_server)
    assert len(lines) == 19
    # Those that loaded the session before the winner popped the token
    # find no token; those after find no session.
    assert all(
        re.search(
            r' reason=(token_not_stored|session_unknown) status=401 ', line
        )
        for line in lines
    ), lines


# Requests the library refuses -------------------------------------------


def test_library_refusal_gets_no_500_and_keeps_the_token(
    chat_server: ServerProcess, client: TestApp
) -> None:
    """A request the websockets library refuses or cannot parse gets its
    error or none, never a 500, and consumes no token."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)
    path = url.removeprefix(chat_server.url)
    upgrade = {
        'Upgrade': 'websocket', 'Connection': 'Upgrade',
        'Sec-WebSocket-Version': '13',
    }

    for method, headers, status in [
        # A browser's address bar: no Upgrade at all.
        ('GET', {}, 426),
        ('POST', {}, 405),
        # An upgrade without a Sec-WebSocket-Key.
        ('GET', upgrade, 400),
    ]:
        connection = http.client.HTTPConnection(
            '127.0.0.1', chat_server.port, timeout=5
        )
        try:
            connection.request(method, path, headers={
                'Origin': ORIGIN,
                'Cookie': f'session_id={credentials.cookie}',
                **headers,
            })
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        assert response.status == status, method

    for garbage in [
        # A TLS client hello, as from https:// to a plain port.
        b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03',
        b'\x00\xff\xfe garbage\r\n\r\n',
        b'GET /chats\r\n\r\n',
        b'GET /chats HTTP/2.0\r\n\r\n',
        b'GET /ch\xe4ts HTTP/1.1\r\nHost: x\r\n\r\n',
        b'GET /chats HTTP/1.1\r\nno colon here\r\n\r\n',
        b'GET /chats HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n',
    ]:
        with socket.create_connection(
            ('127.0.0.1', chat_server.port), timeout=5
        ) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            answer = b''
            while chunk := sock.recv(4096):
                answer += chunk
        assert not answer.startswith(b'HTTP/1.1 5'), (garbage, answer)

    # The server keeps serving, and the token is still good.
    assert admit(chat_server, url, credentials.cookie) == HELLO
    assert not refusals(chat_server)
    assert ' ERROR ' not in chat_server.log()


# Shutdown ---------------------------------------------------------------


@pytest.mark.parametrize(
    'sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT']
)
def test_signal_closes_clients_with_1001(
    chat_server: ServerProcess, client: TestApp, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT closes every connected client with 1001 (going
    away), and the server exits with 0."""
    credentials = fetch_token(client)
    url = ws_url(chat_server, credentials)
    closed: list[ConnectionClosed] = []

    async def stop(connection: ClientConnection) -> None:
        assert await asyncio.to_thread(chat_server.stop, sig) == 0
        try:
            await connection.recv()
        except ConnectionClosed as exc:
            closed.append(exc)

    outcome = attempt(url, credentials.cookie, then=stop)
    assert greeting(outcome.hello) == HELLO
    assert len(closed) == 1
    assert closed[0].rcvd is not None
    assert closed[0].rcvd.code == 1001

    log = chat_server.log()
    assert f'event=server_stopping signal={sig.name}' in log
    assert log.rstrip().endswith('event=server_stopped')


# Logs -------------------------------------------------------------------


def test_debug_log_holds_no_secrets(
    start_server: Callable[..., ServerProcess], client: TestApp
) -> None:
    """Even at DEBUG the log names every refusal but holds no token,
    cookie, session id, query string or chat text."""
    server = start_server(log_level='DEBUG')
    marker = 'chat-text-marker-7f3a'
    first = fetch_token(client)
    url = ws_url(server, first)

    async def chat(connection: ClientConnection) -> None:
        await connection.send(f'hello {marker}')
        await connection.send(json.dumps({
            'type': 'message', 'text': f'hello {marker}', 'client_id': 'c1',
        }))
        # The pong comes after the server has read both frames.
        await (await connection.ping())

    wrong_origin = refuse(
        server, url, first.cookie, 'origin_not_allowed',
        origin='http://evil.example',
    )
    assert attempt(url, first.cookie, then=chat).status == 101
    replay = refuse(server, url, first.cookie, 'session_unknown')

    second = fetch_token(client)
    guess = 'Vv0HUsx2mIM6hKc0hQOWTnUvb4Q4XHd0xB0rC5mAbRc'
    guess_url = chats_url(server, token=guess, schema=SCHEMA)
    wrong_token = refuse(server, guess_url, second.cookie, 'token_mismatch')

    assert server.stop() == 0
    log = server.log()
    session_id, signature = first.cookie.rsplit('.', 1)
    for name, secret in {
        'first token': first.token,
        'second token': second.token,
        'guessed token': guess,
        'cookie': first.cookie,
        'session id': session_id,
        'cookie signature': signature,
        'query string': first.url.split('?', 1)[1],
        'guessed query string': guess_url.split('?', 1)[1],
        'token parameter': 'token=',
        'chat text': marker,
    }.items():
        assert secret not in log, f'the {name} is in the log'

    # The lines that would carry them are there, redacted: the request
    # line, the cookie header and the text frames.
    for redacted in [
        ' DEBUG websockets.server < GET /chats?[redacted] HTTP/1.1\n',
        ' DEBUG websockets.server < Cookie: [redacted]\n',
        ' DEBUG websockets.server < TEXT [',
    ]:
        assert redacted in log

    # And every refusal is named, with its reason.
    assert [line.split(' INFO ', 1)[1] for line in refusals(server)] == [
        f'onegov.chat.server event=handshake_refused reason={reason} '
        f'status={status} peer=127.0.0.1:{outcome.port}'
        for reason, status, outcome in [
            ('origin_not_allowed', 403, wrong_origin),
            ('session_unknown', 401, replay),
            ('token_mismatch', 401, wrong_token),
        ]
    ]


def test_debug_log_of_unparsable_request_holds_no_secrets(
    start_server: Callable[..., ServerProcess], client: TestApp
) -> None:
    """Even at DEBUG, a request the library cannot parse leaves neither
    its token nor its cookie in the log."""
    server = start_server(log_level='DEBUG')
    credentials = fetch_token(client)
    path = ws_url(server, credentials).removeprefix(server.url)
    cookie = f'Cookie: session_id={credentials.cookie}'

    for request in [
        # A protocol version the library does not speak.
        f'GET {path} HTTP/2.0\r\n{cookie}\r\n\r\n',
        # A control character in the cookie's header line.
        f'GET {path} HTTP/1.1\r\n{cookie}\x01\r\n\r\n',
    ]:
        with socket.create_connection(
            ('127.0.0.1', server.port), timeout=5
        ) as sock:
            sock.sendall(request.encode('ascii'))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass

    assert server.stop() == 0
    log = server.log()
    assert credentials.token not in log
    assert credentials.cookie not in log
