"""A pytest plugin for host applications that use onegov.chat.

Enable it in the host's ``conftest.py``::

    pytest_plugins = ['onegov.chat.testing']

and define a ``chat_app`` fixture that returns the host's app, configured
with the `chat_settings` fixture::

    @pytest.fixture
    def chat_app(chat_settings):
        app = TownApp()
        app.configure_application(**chat_settings)
        app.set_application_id(chat_settings['application_id'])
        return app

The plugin then gives:

* `chat_settings`: one configuration for the app and the server, on
  SQLite files in a temporary folder;
* `chat_server`: a real ``onegov-chat serve`` process on a free loopback
  port, stopped after the test;
* `chat_browser`: a WebTest client of ``chat_app``, the "browser";
* `ChatServerProcess.connect`: fetch a token through the app (as the
  browser client does) and open a real websocket with it;
* `assert_refused`: the handshake is refused with a status, and the
  server logged the reason.

"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

#: The origin the test browser pretends to come from.
TEST_ORIGIN = 'http://localhost'

#: The tenant of the test app.
TEST_TENANT = 'test/chat'


def _script() -> str:
    script = Path(sys.executable).parent / 'onegov-chat'
    if script.exists():
        return str(script)
    found = shutil.which('onegov-chat')
    if found is None:
        raise RuntimeError('the onegov-chat command is not installed')
    return found


@dataclass
class ChatServerProcess:
    """A running ``onegov-chat serve``, started by the `chat_server`
    fixture."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    origin: str = TEST_ORIGIN
    sockets: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f'ws://127.0.0.1:{self.port}'

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(encoding='utf-8', errors='replace')

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Return the first log line matching `pattern`, waiting for it.

        Raises:
            AssertionError: if no line matches within `timeout`.

        """
        expression = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if expression.search(line):
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f'the server logged no line like {pattern!r}')

    def websocket_url(self, token_url: str) -> str:
        """The URL from ``/chat/token``, pointed at this server."""
        return f'{self.url}/chats?{token_url.split("?", 1)[1]}'

    async def connect(
        self, browser: Any, origin: str | None = None
    ) -> ChatSocket:
        """Connect as the browser `browser` (a WebTest client) would."""
        from websockets.asyncio.client import connect

        answer = browser.get('/chat/token').json
        cookie = browser.cookies['session_id']
        connection = await connect(
            self.websocket_url(answer['url']),
            origin=origin or self.origin,  # type: ignore[arg-type]
            additional_headers={'Cookie': f'session_id={cookie}'},
            open_timeout=10,
        )
        return ChatSocket(connection)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the server; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


class ChatSocket:
    """A websocket speaking the chat protocol."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.inbox: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        await self.connection.send(json.dumps(message))

    async def expect(
        self, kind: str, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """Return the first message of type `kind` whose fields match
        `match`; other messages are kept in `inbox`."""

        def fits(message: dict[str, Any]) -> bool:
            return message.get('type') == kind and all(
                message.get(key) == value for key, value in match.items()
            )

        for index, message in enumerate(self.inbox):
            if fits(message):
                return self.inbox.pop(index)

        async def wait() -> dict[str, Any]:
            while True:
                message = json.loads(await self.connection.recv())
                if fits(message):
                    return dict(message)
                self.inbox.append(message)

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        await self.connection.close()


async def assert_refused(
    server: ChatServerProcess,
    browser: Any,
    status: int,
    reason: str,
    origin: str | None = None,
    token_url: str | None = None,
) -> None:
    """Assert that a handshake is refused with `status`, for `reason`.

    `reason` is the slug the server logs (``origin_not_allowed``,
    ``token_mismatch``, ...). With `token_url`, that URL is used instead
    of a fresh token.

    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    if token_url is None:
        token_url = browser.get('/chat/token').json['url']
    cookie = browser.cookies.get('session_id', '')
    try:
        async with connect(
            server.websocket_url(token_url),
            origin=origin or server.origin,  # type: ignore[arg-type]
            additional_headers={'Cookie': f'session_id={cookie}'},
            open_timeout=10,
        ):
            pass
    except InvalidStatus as refusal:
        if refusal.response.status_code != status:
            raise AssertionError(
                f'refused with {refusal.response.status_code}, not {status}'
            ) from None
    else:
        raise AssertionError('the handshake was admitted')
    server.wait_for_log(
        rf'event=handshake_refused reason={re.escape(reason)} '
        rf'status={status}'
    )


@pytest.fixture
def chat_settings(tmp_path: Path) -> dict[str, Any]:
    """One configuration for the app under test and its chat server."""
    return {
        'identity_secret': secrets.token_hex(32),
        'session_store': f'sqlite:///{tmp_path}/sessions.db',
        'dsn': f'sqlite:///{tmp_path}/chat.db',
        'allowed_origins': [TEST_ORIGIN],
        'application_id': TEST_TENANT,
        'websocket_host': '127.0.0.1',
        'data_dir': str(tmp_path / 'data'),
        'liveness_interval': 1.0,
    }


@pytest.fixture
def chat_server(
    chat_settings: dict[str, Any], tmp_path: Path
) -> Iterator[ChatServerProcess]:
    """A real ``onegov-chat serve`` on a free port, with `chat_settings`."""
    config = tmp_path / 'onegov-chat.yml'
    config.write_text(yaml.safe_dump(chat_settings), encoding='utf-8')
    log_path = tmp_path / 'onegov-chat.log'
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(  # noqa: S603 (our own command)
            [_script(), '--config', str(config), 'serve',
             '--host', '127.0.0.1', '--port', '0'],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = ChatServerProcess(process, log_path)
    try:
        line = server.wait_for_log(r'event=server_ready .* port=\d+')
        server.port = int(line.rsplit('port=', 1)[1].split()[0])
        yield server
    finally:
        server.stop()


@pytest.fixture
def chat_browser(chat_app: Any) -> Any:
    """A browser (a WebTest client) of the host's ``chat_app``."""
    from webtest import TestApp

    return TestApp(chat_app, extra_environ={'HTTP_HOST': 'localhost'})
