"""Fixtures: real Redis, real server processes, host apps under WebTest."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from webtest import TestApp

from onegov.chat.framework import Framework
from onegov.chat.integration import ChatApp
from onegov.chat.testing import (
    ChatServerProcess,
    ChatSocket,
    PostgresServer,
    RedisServer,
    free_port,
    onegov_chat_script,
    postgres_bindir,
    start_chat_server,
)

# The example host application has a pytest run of its own
# (test_testing.py), as it would in its own repository.
collect_ignore = ['example_host']

SECRET = 'test-secret-' + 'x' * 40
ORIGIN = 'http://town.test'
TENANT = 'town/govikon'


def require(program: str) -> str:
    """Return the path of `program`; fail in CI, skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        missing(f'{program} is not installed')
    return str(path)


def missing(message: str) -> NoReturn:
    """A service the tests need is not installed: fail in CI, skip
    elsewhere."""
    if os.environ.get('CI'):
        pytest.fail(message)
    pytest.skip(message)


def postgres() -> Path:
    """The folder of PostgreSQL's server programs."""
    require('psql')
    bindir = postgres_bindir()
    if bindir is None:
        missing('the PostgreSQL server is not installed')
    return bindir


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port; yields its URL."""
    server = RedisServer(
        require('redis-server'), free_port(),
        tmp_path_factory.mktemp('redis'),
    )
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope='session')
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a free loopback port."""
    with PostgresServer.running(postgres()) as server:
        yield server


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


#: A running ``onegov-chat serve``, as the test kit starts it.
ServerProcess = ChatServerProcess

#: The installed ``onegov-chat`` command.
onegov_chat = onegov_chat_script


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
        server = start_chat_server(
            config_file, tmp_path / f'server-{len(started)}.log', *args,
            log_level=log_level,
        )
        started.append(server)
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
        app.dispose()


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


class Peer(ChatSocket):
    """The test kit's chat socket, connected through our test app."""

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


# Replicas and faults ------------------------------------------------------


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server for this test alone, to stop and restart.

    It keeps its data in an append-only file, as a production Redis
    should: the sessions outlive a restart.

    """
    directory = tmp_path / 'redis'
    directory.mkdir()
    server = RedisServer(
        require('redis-server'), free_port(), directory, persistent=True
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dedicated_postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for this test alone, to stop and
    restart."""
    with PostgresServer.running(postgres()) as server:
        yield server


@pytest.fixture
def start_replicas(
    config_file: Path, tmp_path: Path
) -> Iterator[Callable[[int], list[ServerProcess]]]:
    """Start `count` ``onegov-chat serve --port 0`` replicas at once.

    They share the configuration file; each logs to a file of its own.
    Whatever still runs after the test is stopped (SIGTERM, then
    SIGKILL).

    """
    started: list[ServerProcess] = []

    def start(count: int) -> list[ServerProcess]:
        replicas = []
        for _ in range(count):
            log_path = tmp_path / f'replica-{len(started)}.log'
            with open(log_path, 'wb') as log:
                process = subprocess.Popen(
                    [onegov_chat(), '--config', str(config_file),
                     'serve', '--host', '127.0.0.1', '--port', '0'],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            replica = ServerProcess(process, log_path)
            started.append(replica)
            replicas.append(replica)
        for replica in replicas:
            line = replica.wait_for_log(
                r'event=server_ready .* port=\d+', timeout=30
            )
            replica.port = int(line.rsplit('port=', 1)[1].split()[0])
        return replicas

    yield start
    for replica in started:
        replica.stop()


def health(server: ServerProcess) -> tuple[int, str]:
    """GET ``/healthz`` of `server`; return the status and the body."""
    import http.client

    connection = http.client.HTTPConnection(
        '127.0.0.1', server.port, timeout=10
    )
    try:
        connection.request('GET', '/healthz')
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def wait_for_health(
    server: ServerProcess, expected: tuple[int, str], timeout: float = 20
) -> None:
    """Poll ``/healthz`` until it answers `expected`."""
    deadline = time.monotonic() + timeout
    answer = health(server)
    while answer != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        answer = health(server)
    assert answer == expected


class Chatter:
    """One side of a chat that rides out faults as the browser does.

    When its connection drops with a code that says so, it fetches a
    fresh token from the web app, connects to the next replica that is
    up and joins with the last seq it saw. `say` sends a message until
    it is acknowledged, again with the same client_id after an error
    ``unavailable`` or a reconnect.

    """

    def __init__(
        self,
        name: str,
        web: TestApp,
        chat_id: str,
        staff: bool,
        replicas: list[ServerProcess],
        first: int = 0,
    ) -> None:
        import asyncio

        self.name = name
        self.web = web
        self.chat_id = chat_id
        self.staff = staff
        self.replicas = replicas
        self.current = first

        #: The seqs of the messages received, in the order received.
        self.received: list[int] = []
        #: The seq of each acknowledged message, by client_id.
        self.acked: dict[str, int] = {}
        #: When each acknowledgement arrived (loop time), by client_id.
        self.ack_times: dict[str, float] = {}
        #: How many times a message was refused as ``unavailable``.
        self.unavailable = 0
        #: Unexpected errors, and the close code of each connection.
        self.errors: list[dict[str, Any]] = []
        self.closes: list[int | None] = []
        #: The status of every refused handshake, and the port of the
        #: replica of every admitted one.
        self.refused: list[int] = []
        self.admitted: list[int] = []

        self.connection: Any = None
        self.ready = asyncio.Event()
        self.waiting: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        #: The client_id of every message `say` was asked to send, and
        #: how many `talk` said.
        self.said: set[str] = set()
        self.sent = 0

    def start(self) -> None:
        import asyncio

        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        self.stopping = True
        if self.connection is not None:
            await self.connection.close()
        if self.task is not None:
            await self.task

    @property
    def replica(self) -> ServerProcess:
        return self.replicas[self.current % len(self.replicas)]

    def move_on(self) -> None:
        """Connect to the next replica that is still running."""
        for _ in self.replicas:
            self.current += 1
            if self.replica.process.poll() is None:
                return

    async def run(self) -> None:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        from onegov.chat.protocol import Close

        while not self.stopping:
            connection = await self.open()
            if connection is None:
                await asyncio.sleep(0.2)
                continue
            self.connection = connection
            self.ready.set()
            try:
                with contextlib.suppress(ConnectionClosed):
                    async for frame in connection:
                        self.handle(frame)
            finally:
                self.ready.clear()
                self.connection = None
                self.closes.append(connection.close_code)
                for future in self.waiting.values():
                    if not future.done():
                        future.set_result(None)
                self.waiting.clear()

            if self.stopping:
                return
            code = connection.close_code
            if code not in Close.RETRY:
                self.errors.append({'type': 'closed', 'code': code})
                return
            if code == 1006 or code == 1001:
                self.move_on()

    async def open(self) -> Any:
        """Connect and join; None to try again (on another replica)."""
        import asyncio
        import json

        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus
        from websockets.typing import Origin

        try:
            credentials = await asyncio.to_thread(fetch_token, self.web)
        except Exception:
            # The web app cannot issue a token (its store is down).
            return None

        replica = self.replica
        try:
            connection = await connect(
                ws_url(replica, credentials),
                origin=Origin(ORIGIN),
                additional_headers={
                    'Cookie': f'session_id={credentials.cookie}'
                },
                open_timeout=15,
            )
        except InvalidStatus as exc:
            self.refused.append(exc.response.status_code)
            return None
        except (OSError, TimeoutError):
            self.move_on()
            return None

        try:
            hello = json.loads(await connection.recv())
            assert hello['type'] == 'hello', hello
            self.admitted.append(replica.port)
            last = self.received[-1] if self.received else 0
            frame: dict[str, Any] = {'type': 'join', 'last_seq': last}
            if self.staff:
                frame['chat_id'] = self.chat_id
            await connection.send(json.dumps(frame))
            while True:
                reply = json.loads(
                    await asyncio.wait_for(connection.recv(), 15)
                )
                if reply['type'] == 'joined':
                    return connection
                if reply['type'] == 'error':
                    # Nothing joined (the database is down): again.
                    self.errors.append(reply)
                    await connection.close()
                    return None
                self.handle_reply(reply)
        except Exception:
            await connection.close()
            return None

    def handle(self, frame: str | bytes) -> None:
        import json

        self.handle_reply(json.loads(frame))

    def handle_reply(self, reply: dict[str, Any]) -> None:
        import asyncio

        kind = reply['type']
        if kind == 'message' and reply['chat_id'] == self.chat_id:
            self.received.append(reply['seq'])
        elif kind in ('ack', 'error'):
            key = reply.get('client_id') or reply.get('ref')
            future = self.waiting.pop(str(key), None)
            if future is not None and not future.done():
                future.set_result(reply)
            elif kind == 'error':
                self.errors.append(reply)
        if kind == 'ack':
            self.ack_times.setdefault(
                reply['client_id'], asyncio.get_running_loop().time()
            )

    async def say(self, text: str, client_id: str) -> int:
        """Send until acknowledged; return the seq."""
        import asyncio
        import json

        from websockets.exceptions import ConnectionClosed

        self.said.add(client_id)
        frame: dict[str, Any] = {
            'type': 'message', 'text': text, 'client_id': client_id,
        }
        if self.staff:
            frame['chat_id'] = self.chat_id
        while True:
            await self.ready.wait()
            connection = self.connection
            if connection is None:
                await asyncio.sleep(0.02)
                continue
            future = asyncio.get_running_loop().create_future()
            self.waiting[client_id] = future
            try:
                await connection.send(json.dumps(frame))
            except ConnectionClosed:
                self.waiting.pop(client_id, None)
                while self.connection is connection:
                    await asyncio.sleep(0.02)
                continue
            reply = await future
            if reply is None:
                continue
            if reply['type'] == 'ack':
                seq: int = reply['seq']
                self.acked[client_id] = seq
                return seq
            if reply['code'] == 'unavailable':
                self.unavailable += 1
                await asyncio.sleep(0.3)
                continue
            raise AssertionError(f'{self.name}: {reply}')

    async def talk(
        self, until: Any, pause: float = 0.05, limit: int = 10_000
    ) -> None:
        """Say numbered messages, one at a time, until `until` is set."""
        import asyncio

        while not until.is_set() and self.sent < limit:
            number = self.sent
            self.sent += 1
            await self.say(
                f'{self.name} says {number}', f'{self.name}-{number}'
            )
            await asyncio.sleep(pause)


def chat_pairs(
    app: TownApp, count: int
) -> list[tuple[TestApp, TestApp, str]]:
    """Start `count` chats; return each customer's and a logged-in staff
    member's browser, and the chat id."""
    pairs = []
    for number in range(count):
        customer, staff = TestApp(app), TestApp(app)
        chat_id = start_chat(customer, name=f'Customer {number}')
        log_in(staff)
        pairs.append((customer, staff, chat_id))
    return pairs


async def accept_chats(
    server: ServerProcess, staff: TestApp, chat_ids: list[str]
) -> None:
    """Accept the chats as the staff member of `staff`."""
    peer = await Peer.connect(server, staff)
    try:
        await peer.expect('hello')
        for chat_id in chat_ids:
            await peer.send(type='accept', chat_id=chat_id)
            await peer.expect('accepted')
    finally:
        await peer.close()


def stored_messages(
    dsn: str, chat_ids: list[str]
) -> dict[str, list[tuple[int, str]]]:
    """The (seq, client_id) of every stored message, by chat."""
    from sqlalchemy import create_engine, select

    from onegov.chat.models import Message

    table = Message.__table__
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(table.c.chat_id, table.c.seq, table.c.client_id)
                .where(table.c.chat_id.in_(chat_ids))
                .order_by(table.c.chat_id, table.c.seq)
            ).all()
    finally:
        engine.dispose()
    found: dict[str, list[tuple[int, str]]] = {key: [] for key in chat_ids}
    for chat_id, seq, client_id in rows:
        found[chat_id].append((seq, client_id))
    return found


async def caught_up(
    chatters: list[Chatter], dsn: str, timeout: float = 30
) -> None:
    """Wait until every chatter received the last stored message."""
    import asyncio

    chat_ids = sorted({chatter.chat_id for chatter in chatters})
    deadline = time.monotonic() + timeout
    while True:
        stored = await asyncio.to_thread(stored_messages, dsn, chat_ids)
        behind = [
            chatter.name for chatter in chatters
            if (chatter.received[-1:] or [0])[0]
            != len(stored[chatter.chat_id])
        ]
        if not behind:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f'still behind: {behind}')
        await asyncio.sleep(0.1)


def assert_history(chatters: list[Chatter], dsn: str) -> None:
    """Every acknowledged message is stored once with the seq of its
    ack, nothing else is stored, and every chatter got the whole chat
    once, in order."""
    chat_ids = sorted({chatter.chat_id for chatter in chatters})
    stored = stored_messages(dsn, chat_ids)
    for chat_id in chat_ids:
        rows = stored[chat_id]
        assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
        acked = {
            client_id: seq
            for chatter in chatters if chatter.chat_id == chat_id
            for client_id, seq in chatter.acked.items()
        }
        assert {client_id: seq for seq, client_id in rows} == acked
        assert len({client_id for _, client_id in rows}) == len(rows)

    for chatter in chatters:
        assert set(chatter.acked) == chatter.said, chatter.name
        assert chatter.received == list(
            range(1, len(stored[chatter.chat_id]) + 1)
        ), chatter.name
