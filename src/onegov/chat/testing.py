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
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def onegov_chat_script() -> str:
    """The installed ``onegov-chat`` command, beside this Python."""
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
            AssertionError: if no line matches within `timeout`; the
                message holds the log (which holds no secret).

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
        raise AssertionError(
            f'no log line matches {pattern!r}:\n{self.log()}'
        )

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Stop the server (killing it after `timeout`); return its exit
        code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_chat_server(
    config: Path, log_path: Path, *args: str, log_level: str = 'INFO'
) -> ChatServerProcess:
    """Start ``onegov-chat serve`` with `config` on a free port.

    The server logs to `log_path`; extra `args` go to ``serve``. Returns
    once the server is ready, with its port.

    """
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(  # noqa: S603 (our own command)
            [onegov_chat_script(), '--config', str(config),
             '--log-level', log_level, 'serve', '--host', '127.0.0.1',
             '--port', '0', *args],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = ChatServerProcess(process, log_path)
    try:
        line = server.wait_for_log(r'event=server_ready .* port=\d+')
    except AssertionError:
        server.stop()
        raise
    server.port = int(line.rsplit('port=', 1)[1].split()[0])
    return server


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


# Real backing services -------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on `port` of 127.0.0.1.

    Raises:
        TimeoutError: if nothing does within `timeout` seconds.

    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(('127.0.0.1', port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f'nothing listens on port {port}')


@dataclass
class RedisServer:
    """A redis-server of one's own on a loopback port.

    With `persistent`, it keeps its data in an append-only file, as a
    production Redis should, so that sessions outlive a restart on the
    same port.

    """

    executable: str
    port: int
    directory: Path
    persistent: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    def start(self) -> None:
        persistence = (
            ['--appendonly', 'yes', '--appendfsync', 'always']
            if self.persistent else ['--appendonly', 'no']
        )
        self.process = subprocess.Popen(  # noqa: S603 (our own command)
            [self.executable, '--port', str(self.port),
             '--bind', '127.0.0.1', '--save', '', *persistence,
             '--dir', str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        """Shut Redis down (SIGTERM) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@dataclass
class PostgresServer:
    """A PostgreSQL server of one's own, in a temporary folder.

    `running` creates, starts and finally removes one. As root, the
    server runs as the ``postgres`` user, since PostgreSQL refuses to
    run as root.

    """

    bindir: Path
    datadir: Path
    port: int
    user: str | None
    #: Settings for speed over safety: a test server needs no fsync.
    options: str = '-c fsync=off'

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, bindir: Path, options: str = '-c fsync=off'
    ) -> Iterator[PostgresServer]:
        # Not under pytest's temporary folder: the server's own user
        # must be able to reach it, and pytest keeps that folder private.
        root = Path(tempfile.mkdtemp(prefix='onegov-chat-pg-'))
        root.chmod(0o755)
        datadir = root / 'data'
        datadir.mkdir()
        user = 'postgres' if os.geteuid() == 0 else None
        if user:
            shutil.chown(datadir, user)
        server = cls(bindir, datadir, free_port(), user, options)
        try:
            server.run(
                'initdb', '-D', str(datadir), '-U', 'postgres',
                '--auth=trust', '--no-sync',
            )
            server.start()
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop('immediate')
            shutil.rmtree(root, ignore_errors=True)

    def run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            command = ['runuser', '-u', self.user, '--', *command]
        subprocess.run(  # noqa: S603 (our own command)
            command, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self.run(
            'pg_ctl', '-D', str(self.datadir), '-w', '-t', '30',
            '-l', str(self.datadir / 'server.log'),
            '-o', f'-p {self.port} -k {self.datadir} '
            f'-c listen_addresses=127.0.0.1 -c max_connections=200 '
            f'{self.options}',
            'start',
        )

    def stop(self, mode: str = 'fast') -> None:
        self.run(
            'pg_ctl', '-D', str(self.datadir), '-w', '-m', mode, 'stop'
        )

    def dsn(self, database: str = 'postgres') -> str:
        return (
            f'postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}'
        )

    def create_database(self, name: str) -> str:
        """Create database `name`; return its URL."""
        import psycopg

        with psycopg.connect(
            f'postgresql://postgres@127.0.0.1:{self.port}/postgres',
            autocommit=True,
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs, if installed."""
    found = sorted(Path('/usr/lib/postgresql').glob('*/bin/pg_ctl'))
    return found[-1].parent if found else None


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
    server = start_chat_server(config, tmp_path / 'onegov-chat.log')
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def chat_browser(chat_app: Any) -> Any:
    """A browser (a WebTest client) of the host's ``chat_app``."""
    from webtest import TestApp

    return TestApp(chat_app, extra_environ={'HTTP_HOST': 'localhost'})
