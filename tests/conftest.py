"""Fixtures: real Redis, real server processes, host apps under WebTest."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from webtest import TestApp

from onegov.chat.framework import Framework
from onegov.chat.integration import ChatApp

SECRET = 'test-secret-' + 'x' * 40
ORIGIN = 'http://town.test'
TENANT = 'town/govikon'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def require(program: str) -> str:
    """Return the path of `program`; fail in CI, skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        message = f'{program} is not installed'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port; yields its URL."""
    executable = require('redis-server')
    port = free_port()
    directory = tmp_path_factory.mktemp('redis')
    process = subprocess.Popen(
        [executable, '--port', str(port), '--bind', '127.0.0.1',
         '--save', '', '--appendonly', 'no', '--dir', str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f'redis://127.0.0.1:{port}/0'
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(('127.0.0.1', port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f'nothing listens on port {port}')


def postgres_bindir() -> Path:
    """The folder of PostgreSQL's server programs."""
    require('psql')
    found = sorted(Path('/usr/lib/postgresql').glob('*/bin/pg_ctl'))
    if not found:
        message = 'the PostgreSQL server is not installed'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
    return found[-1].parent


@dataclass
class PostgresServer:
    """A PostgreSQL server of the tests' own, in a temporary folder."""

    bindir: Path
    datadir: Path
    port: int
    user: str | None

    def run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            # PostgreSQL refuses to run as root.
            command = ['runuser', '-u', self.user, '--', *command]
        subprocess.run(
            command, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self.run(
            'pg_ctl', '-D', str(self.datadir), '-w', '-t', '30',
            '-l', str(self.datadir / 'server.log'),
            '-o', f'-p {self.port} -k {self.datadir} '
            f'-c listen_addresses=127.0.0.1 -c fsync=off '
            f'-c max_connections=200',
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
        import psycopg

        with psycopg.connect(
            f'postgresql://postgres@127.0.0.1:{self.port}/postgres',
            autocommit=True,
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@pytest.fixture(scope='session')
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a free loopback port."""
    bindir = postgres_bindir()
    # Not under pytest's temporary folder: the server's own user must be
    # able to reach it, and pytest keeps that folder private.
    root = Path(tempfile.mkdtemp(prefix='onegov-chat-pg-'))
    root.chmod(0o755)
    datadir = root / 'data'
    datadir.mkdir()
    user = 'postgres' if os.geteuid() == 0 else None
    if user:
        shutil.chown(datadir, user)
    server = PostgresServer(bindir, datadir, free_port(), user)
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


@pytest.fixture(
    params=['sqlite', 'redis'], ids=['sqlite', 'redis+postgres']
)
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> str:
    """The session store URL: a SQLite file, then a real Redis.

    With Redis, the database is a real PostgreSQL (see `dsn`): the
    embedded default, then the production setup.

    """
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/sessions.db'
    url: str = request.getfixturevalue('redis_server')
    return url


@pytest.fixture
def dsn(
    store_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> str:
    """The database: SQLite beside the SQLite store, a fresh PostgreSQL
    database beside Redis."""
    if store_url.startswith('sqlite'):
        return f'sqlite:///{tmp_path}/chat.db'
    server: PostgresServer = request.getfixturevalue('postgres_server')
    return server.create_database(f'test_{uuid.uuid4().hex}')


@pytest.fixture
def settings(store_url: str, dsn: str, tmp_path: Path) -> dict[str, Any]:
    """The configuration shared by the test app and the server."""
    return {
        'identity_secret': SECRET,
        'session_store': store_url,
        'dsn': dsn,
        'allowed_origins': [ORIGIN],
        'token_ttl': 60,
        'websocket_host': '127.0.0.1',
        'websocket_port': 8765,
        'application_id': TENANT,
        'data_dir': str(tmp_path / 'data'),
    }


def onegov_chat() -> str:
    """The installed ``onegov-chat`` console script."""
    script = Path(sys.executable).parent / 'onegov-chat'
    if script.exists():
        return str(script)
    found = shutil.which('onegov-chat')
    if found is None:
        raise RuntimeError('onegov-chat is not installed')
    return found


@dataclass
class ServerProcess:
    """A running ``onegov-chat serve`` subprocess."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f'ws://127.0.0.1:{self.port}'

    def log(self) -> str:
        return self.log_path.read_text(encoding='utf-8', errors='replace')

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches `pattern`; return the line."""
        deadline = time.monotonic() + timeout
        expression = re.compile(pattern)
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@pytest.fixture
def config_file(settings: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / 'onegov-chat.yml'
    path.write_text(yaml.safe_dump(settings), encoding='utf-8')
    return path


@pytest.fixture
def start_server(
    config_file: Path, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``onegov-chat serve`` processes; stops them after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, log_level: str = 'INFO') -> ServerProcess:
        log_path = tmp_path / f'server-{len(started)}.log'
        with open(log_path, 'wb') as log:
            process = subprocess.Popen(
                [onegov_chat(), '--config', str(config_file),
                 '--log-level', log_level, 'serve',
                 '--host', '127.0.0.1', '--port', '0', *args],
                stdout=log, stderr=subprocess.STDOUT,
            )
        server = ServerProcess(process, log_path)
        started.append(server)
        line = server.wait_for_log(r'event=server_ready .* port=\d+')
        server.port = int(line.rsplit('port=', 1)[1].split()[0])
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def chat_server(
    start_server: Callable[..., ServerProcess]
) -> ServerProcess:
    """One running server with the test configuration."""
    return start_server()


class TownApp(Framework, ChatApp):
    """A host application as a OneGov town would define it."""


@pytest.fixture
def town_app(settings: dict[str, Any]) -> Iterator[TownApp]:
    """A configured tenant of a fresh host app class."""

    class App(TownApp):
        pass

    App.commit()
    app = App()
    app.configure_application(**settings)
    app.set_application_id(settings['application_id'])
    yield app
    app.dispose()


@pytest.fixture
def client(town_app: TownApp) -> TestApp:
    return TestApp(town_app)


@pytest.fixture
def make_client(
    settings: dict[str, Any]
) -> Iterator[Callable[..., TestApp]]:
    """Build clients of further tenants, sharing the store of `settings`.

    ``make_client('town/other', token_ttl=1)`` returns a WebTest client
    of a fresh host app class, configured with `settings` and the given
    overrides, as the tenant ``town/other``.

    """
    apps: list[TownApp] = []

    def make(application_id: str = TENANT, **overrides: Any) -> TestApp:
        class App(TownApp):
            pass

        App.commit()
        app = App()
        app.configure_application(**{**settings, **overrides})
        app.set_application_id(application_id)
        apps.append(app)
        return TestApp(app)

    yield make
    for app in apps:
        app.session_store.close()


@dataclass
class Credentials:
    """What a browser holds after fetching ``/chat/token``."""

    token: str
    url: str
    cookie: str


def fetch_token(client: TestApp) -> Credentials:
    """Fetch a token as the browser client does; return what it holds."""
    response = client.get('/chat/token')
    cookie = client.cookies['session_id']
    return Credentials(
        token=response.json['token'],
        url=response.json['url'],
        cookie=cookie,
    )


def ws_url(server: ServerProcess, credentials: Credentials) -> str:
    """The URL the client would use, pointed at `server`."""
    query = credentials.url.split('?', 1)[1]
    return f'{server.url}/chats?{query}'


# The chat ----------------------------------------------------------------


def add_staff(
    app: TownApp, username: str = 'alice', name: str = 'Alice Staff',
    password: str = 'correct horse battery',
) -> int:
    """Create a staff account in the app's database; return its id."""
    import transaction

    from onegov.chat.collections import UserCollection

    with transaction.manager:
        user = UserCollection(app.chat_db(), app.application_id).add(
            username, name, password
        )
        user_id = user.id
    return user_id


def start_chat(
    client: TestApp, name: str = 'Carla Customer',
    email: str = 'carla@example.org', topic: str = 'Building permit',
) -> str:
    """Start a chat through the customer form; return the chat id."""
    response = client.post('/chat', {
        'name': name, 'email': email, 'topic': topic,
    })
    assert response.status_int == 303
    page = client.get('/chat/conversation')
    match = re.search(r'data-chat="([0-9a-f]{32})"', page.text)
    assert match is not None
    return match.group(1)


def log_in(
    client: TestApp, username: str = 'alice',
    password: str = 'correct horse battery',
) -> None:
    """Log in through the staff login form."""
    response = client.post('/chat/login', {
        'username': username, 'password': password,
    })
    assert response.status_int == 303, response.text


class Peer:
    """A real websockets client speaking the chat protocol."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.inbox: list[dict[str, Any]] = []

    @classmethod
    async def connect(
        cls, server: ServerProcess, client: TestApp, origin: str = ORIGIN
    ) -> Peer:
        from websockets.asyncio.client import connect

        credentials = fetch_token(client)
        connection = await connect(
            ws_url(server, credentials),
            origin=origin,  # type: ignore[arg-type]
            additional_headers={
                'Cookie': f'session_id={credentials.cookie}'
            },
            open_timeout=10,
        )
        return cls(connection)

    async def send(self, **message: Any) -> None:
        import json

        await self.connection.send(json.dumps(message))

    async def expect(
        self, kind: str, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """Return the first message of type `kind` (matching `match`),
        keeping every other message in `inbox`."""
        import asyncio
        import json

        for index, message in enumerate(self.inbox):
            if message['type'] == kind and all(
                message.get(k) == v for k, v in match.items()
            ):
                return self.inbox.pop(index)

        async def wait() -> dict[str, Any]:
            while True:
                message = json.loads(await self.connection.recv())
                if message['type'] == kind and all(
                    message.get(k) == v for k, v in match.items()
                ):
                    return dict(message)
                self.inbox.append(message)

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        await self.connection.close()
