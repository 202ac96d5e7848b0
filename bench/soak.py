"""Soak test: hundreds of chat connections across replicas, for a while.

Starts Redis and PostgreSQL (or uses the URLs given), two or more
``onegov-chat serve`` replicas sharing them through one configuration
file, and the web app in this process under WebTest. The web app
creates the staff account, the chats and every token, as it would for
browsers. Half of the connections are customers, half staff; each chat
has its customer on one replica and its staff member on the next, and
both sides keep writing for ``--duration`` seconds.

Then every client's history is compared with the database:

* lost: an acknowledged message that is not stored with the seq of its
  acknowledgement, or a stored message a client of the chat never got;
* duplicated: a message a client got twice, or stored twice;
* out of order: a message a client got after one with a higher seq, or
  whose seq belongs to another message.

A message still unacknowledged when the run ends counts as stalled. The
result is one JSON line and a table, with each replica's memory (RSS)
when it was ready, once every connection was open, and at the end.

Exit status: 0 when nothing was lost, duplicated, out of order or
stalled; 1 when something was; 2 when the run itself failed (bad
arguments, a backend or replica that did not start, the time limit).

Everything binds to 127.0.0.1 and stops by itself: the run is bounded in
connections, duration and total time. Not part of the test suite;
``tests/test_soak.py`` runs it briefly. Example::

    python bench/soak.py --duration 60 --connections 300

"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onegov.chat.testing import (
    PostgresServer,
    RedisServer,
    free_port,
    postgres_bindir,
)

#: The origin the soak's browsers pretend to come from.
ORIGIN = 'http://soak.test'

#: The tenant the chats belong to.
TENANT = 'soak/town'

#: The staff login.
STAFF = ('soak-staff', 'soak staff password')

#: The most connections one staff browser session may hold (the
#: default ``max_connections_per_session``).
PER_SESSION = 5

#: How many handshakes are under way at once while connecting.
HANDSHAKES = 20

#: The bounds of the arguments.
MAX_CONNECTIONS = 2000
MAX_DURATION = 24 * 3600.0
MAX_REPLICAS = 8


class SoakFailed(Exception):
    """Raised when the run cannot go on (exit status 2)."""


# Processes ---------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """The resident set size of process `pid`, in kB (0 if gone)."""
    try:
        with open(f'/proc/{pid}/status', encoding='ascii') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """Run a redis-server on a free loopback port; yield its URL."""
    executable = shutil.which('redis-server')
    if executable is None:
        raise SoakFailed('redis-server is not installed (or pass --redis)')
    server = RedisServer(executable, free_port(), directory)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Run a PostgreSQL server on a free loopback port, with a fresh
    database; yield its URL."""
    bindir = postgres_bindir()
    if bindir is None:
        raise SoakFailed('PostgreSQL is not installed (or pass --dsn)')
    with PostgresServer.running(bindir) as server:
        yield server.create_database('soak')


def onegov_chat() -> list[str]:
    """The command that runs ``onegov-chat``."""
    script = Path(sys.executable).parent / 'onegov-chat'
    if script.exists():
        return [str(script)]
    found = shutil.which('onegov-chat')
    if found:
        return [found]
    return [sys.executable, '-c', 'from onegov.chat.cli import cli; cli()']


@dataclass
class Replica:
    """One ``onegov-chat serve --port 0`` process."""

    number: int
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    rss: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f'ws://127.0.0.1:{self.port}'

    def log(self) -> str:
        return self.log_path.read_text(encoding='utf-8', errors='replace')

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r'event=server_ready .* port=(\d+)', self.log())
            if found:
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise SoakFailed(
            f'replica {self.number} did not start:\n{self.log()[-2000:]}'
        )

    def measure(self, moment: str) -> None:
        self.rss[moment] = rss_kb(self.process.pid)

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_replicas(config: Path, count: int, root: Path) -> list[Replica]:
    replicas = []
    for number in range(1, count + 1):
        log_path = root / f'replica-{number}.log'
        with open(log_path, 'wb') as log:
            process = subprocess.Popen(
                [*onegov_chat(), '--config', str(config), 'serve',
                 '--host', '127.0.0.1', '--port', '0'],
                stdout=log, stderr=subprocess.STDOUT,
            )
        replicas.append(Replica(number, process, log_path))
    return replicas


# The web app -------------------------------------------------------------


class Web:
    """The host app in this process, and its browsers under WebTest."""

    def __init__(self, config_path: Path) -> None:
        from onegov.chat.config import load_config
        from onegov.chat.framework import Framework
        from onegov.chat.integration import ChatApp

        class SoakApp(Framework, ChatApp):
            pass

        SoakApp.commit()
        self.app = SoakApp()
        self.app.configure_application(
            **load_config(str(config_path)).app_settings()
        )
        self.app.set_application_id(TENANT)
        # WebTest and the app are called from worker threads while the
        # event loop runs; one call at a time keeps them simple.
        self.lock = threading.Lock()

    def browser(self) -> Any:
        from webtest import TestApp

        return TestApp(self.app)

    def add_staff(self) -> None:
        import transaction

        from onegov.chat.collections import UserCollection

        with transaction.manager:
            UserCollection(self.app.chat_db(), TENANT).add(
                STAFF[0], 'Soak Staff', STAFF[1]
            )

    def start_chat(self, browser: Any, number: int) -> str:
        with self.lock:
            browser.post('/chat', {
                'name': f'Customer {number}',
                'email': f'customer{number}@example.org',
                'topic': 'Soak',
            }, status=303)
            page = browser.get('/chat/conversation')
        found = re.search(r'data-chat="([0-9a-f]{32})"', page.text)
        if found is None:
            raise SoakFailed('the conversation page names no chat')
        return found.group(1)

    def log_in(self, browser: Any) -> None:
        with self.lock:
            browser.post('/chat/login', {
                'username': STAFF[0], 'password': STAFF[1],
            }, status=303)

    def token(self, browser: Any) -> tuple[str, str]:
        """Fetch a token as the browser client does: the query string
        to connect with, and the session cookie."""
        with self.lock:
            answer = browser.get('/chat/token').json
            cookie = browser.cookies['session_id']
        return answer['url'].split('?', 1)[1], cookie

    def dispose(self) -> None:
        self.app.dispose()


# Clients -----------------------------------------------------------------


#: The close codes after which a client reconnects.
RETRY = frozenset({1001, 1006, 1011, 1012, 1013, 4002})


class Client:
    """One side of a chat, connected to a replica; it reconnects (to
    the next replica) and resumes from its last seq when dropped, and
    sends each message until it is acknowledged."""

    def __init__(
        self,
        name: str,
        web: Web,
        browser: Any,
        chat_id: str,
        staff: bool,
        replicas: list[Replica],
        first: int,
    ) -> None:
        self.name = name
        self.web = web
        self.browser = browser
        self.chat_id = chat_id
        self.staff = staff
        self.replicas = replicas
        self.current = first

        self.received: list[tuple[int, str]] = []
        self.acked: dict[str, int] = {}
        self.said: set[str] = set()
        self.reconnects = 0
        self.failure: str | None = None

        self.connection: Any = None
        self.accepted = False
        self.ready = asyncio.Event()
        self.waiting: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> Any:
        """Connect, accept (staff, once) and join; None to retry."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus
        from websockets.typing import Origin

        try:
            query, cookie = await asyncio.to_thread(
                self.web.token, self.browser
            )
        except Exception:
            # The web app could not issue a token; try again later.
            return None
        replica = self.replicas[self.current % len(self.replicas)]
        try:
            connection = await connect(
                f'{replica.url}/chats?{query}',
                origin=Origin(ORIGIN),
                additional_headers={'Cookie': f'session_id={cookie}'},
                open_timeout=30,
            )
        except (InvalidStatus, OSError, TimeoutError):
            self.current += 1
            return None

        try:
            await self.expect(connection, 'hello')
            if self.staff and not self.accepted:
                await connection.send(json.dumps(
                    {'type': 'accept', 'chat_id': self.chat_id}
                ))
                await self.expect(connection, 'accepted')
                self.accepted = True
            last = self.received[-1][0] if self.received else 0
            join: dict[str, Any] = {'type': 'join', 'last_seq': last}
            if self.staff:
                join['chat_id'] = self.chat_id
            await connection.send(json.dumps(join))
            await self.expect(connection, 'joined')
        except Exception:
            await connection.close()
            return None
        return connection

    async def expect(self, connection: Any, kind: str) -> None:
        while True:
            reply = json.loads(await asyncio.wait_for(connection.recv(), 30))
            if reply['type'] == kind:
                return
            if reply['type'] == 'error':
                raise SoakFailed(f'{self.name}: {reply}')
            self.handle(reply)

    async def connect(self) -> None:
        """Open the first connection; raise if that fails."""
        for _ in range(5):
            self.connection = await self.open()
            if self.connection is not None:
                break
            await asyncio.sleep(0.5)
        else:
            raise SoakFailed(f'{self.name} could not connect')
        self.ready.set()
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        while True:
            connection = self.connection
            with contextlib.suppress(ConnectionClosed):
                async for frame in connection:
                    self.handle(json.loads(frame))
            self.ready.clear()
            self.connection = None
            for future in self.waiting.values():
                if not future.done():
                    future.set_result(None)
            self.waiting.clear()
            if self.stopping:
                return
            if connection.close_code not in RETRY:
                self.failure = f'closed with {connection.close_code}'
                return
            while self.connection is None and not self.stopping:
                self.reconnects += 1
                self.connection = await self.open()
                if self.connection is None:
                    await asyncio.sleep(0.5)
            if self.connection is None:
                return
            self.ready.set()

    def handle(self, reply: dict[str, Any]) -> None:
        kind = reply['type']
        if kind == 'message' and reply['chat_id'] == self.chat_id:
            self.received.append((reply['seq'], reply['client_id']))
        elif kind in ('ack', 'error'):
            key = str(reply.get('client_id') or reply.get('ref'))
            future = self.waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def say(self, text: str, client_id: str) -> None:
        """Send a message until it is acknowledged."""
        from websockets.exceptions import ConnectionClosed

        self.said.add(client_id)
        frame: dict[str, Any] = {
            'type': 'message', 'text': text, 'client_id': client_id,
        }
        if self.staff:
            frame['chat_id'] = self.chat_id
        while self.failure is None:
            await self.ready.wait()
            connection = self.connection
            if connection is None:
                await asyncio.sleep(0.05)
                continue
            future = asyncio.get_running_loop().create_future()
            self.waiting[client_id] = future
            try:
                await connection.send(json.dumps(frame))
            except ConnectionClosed:
                self.waiting.pop(client_id, None)
                await asyncio.sleep(0.05)
                continue
            reply = await future
            if reply is None:
                continue
            if reply['type'] == 'ack':
                self.acked[client_id] = reply['seq']
                return
            if reply.get('code') in ('unavailable', 'rate_limited'):
                await asyncio.sleep(float(reply.get('retry_after', 0.5)))
                continue
            self.failure = f'refused: {reply}'

    async def talk(
        self, stop: asyncio.Event, interval: float, rng: random.Random
    ) -> None:
        """Say something every `interval` seconds (on average) until
        `stop` is set."""
        number = 0
        while not stop.is_set() and self.failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), interval * rng.uniform(0.5, 1.5)
                )
            if stop.is_set():
                return
            await self.say(
                f'{self.name} says {number}: ' + 'x' * rng.randrange(80),
                f'{self.name}-{number}',
            )
            number += 1

    async def close(self) -> None:
        self.stopping = True
        if self.connection is not None:
            await self.connection.close()
        if self.task is not None:
            await self.task


# Checking ----------------------------------------------------------------


def stored(dsn: str) -> dict[str, list[tuple[int, str]]]:
    """Every stored message as (seq, client_id), by chat."""
    from sqlalchemy import create_engine, select

    from onegov.chat.models import Message

    table = Message.__table__
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(table.c.chat_id, table.c.seq, table.c.client_id)
                .order_by(table.c.chat_id, table.c.seq)
            ).all()
    finally:
        engine.dispose()
    found: dict[str, list[tuple[int, str]]] = {}
    for chat_id, seq, client_id in rows:
        found.setdefault(chat_id, []).append((seq, client_id))
    return found


def check(
    clients: list[Client], messages: dict[str, list[tuple[int, str]]]
) -> dict[str, int]:
    """Count what was lost, duplicated, out of order and stalled."""
    counts = {
        'lost': 0, 'duplicated': 0, 'out_of_order': 0, 'stalled': 0,
    }
    for chat_id in {client.chat_id for client in clients}:
        rows = messages.get(chat_id, [])
        seqs = [seq for seq, _ in rows]
        ids = [client_id for _, client_id in rows]
        counts['lost'] += len(set(range(1, len(rows) + 1)) - set(seqs))
        counts['duplicated'] += len(ids) - len(set(ids))

    for client in clients:
        by_seq = dict(messages.get(client.chat_id, []))
        by_id = {client_id: seq for seq, client_id in by_seq.items()}
        counts['stalled'] += len(client.said - set(client.acked))
        counts['lost'] += sum(
            1 for client_id, seq in client.acked.items()
            if by_id.get(client_id) != seq
        )

        got = [seq for seq, _ in client.received]
        counts['lost'] += len(set(by_seq) - set(got))
        counts['duplicated'] += len(got) - len(set(got))
        counts['out_of_order'] += sum(
            1 for before, after in itertools.pairwise(got)
            if after < before
        )
        # A seq must carry the message stored under it.
        counts['out_of_order'] += sum(
            1 for seq, client_id in client.received
            if by_seq.get(seq) != client_id
        )
    return counts


# The run -----------------------------------------------------------------


async def soak(
    args: argparse.Namespace, root: Path, redis: str, dsn: str
) -> dict[str, Any]:
    config_path = root / 'onegov-chat.yml'
    config_path.write_text(yaml.safe_dump({
        'identity_secret': secrets.token_hex(32),
        'session_store': redis,
        'broker': redis,
        'dsn': dsn,
        'allowed_origins': [ORIGIN],
        'application_id': TENANT,
        'websocket_host': '127.0.0.1',
        'liveness_interval': 5,
        'data_dir': str(root / 'data'),
    }), encoding='utf-8')

    replicas = start_replicas(config_path, args.replicas, root)
    web: Web | None = None
    clients: list[Client] = []
    try:
        for replica in replicas:
            await asyncio.to_thread(replica.wait_ready)
            replica.measure('ready')

        web = Web(config_path)
        clients = await asyncio.to_thread(
            prepare, web, replicas, args.connections // 2
        )
        limit = asyncio.Semaphore(HANDSHAKES)

        async def connect(client: Client) -> None:
            async with limit:
                await client.connect()

        # Staff first: they accept the chats their customers then join.
        await asyncio.gather(*(connect(c) for c in clients if c.staff))
        await asyncio.gather(*(connect(c) for c in clients if not c.staff))
        for replica in replicas:
            replica.measure('start')

        stop = asyncio.Event()
        rng = random.Random(args.seed)
        started = time.monotonic()
        talking = [
            asyncio.ensure_future(client.talk(
                stop, args.interval, random.Random(rng.random())
            ))
            for client in clients
        ]
        await asyncio.sleep(args.duration)
        stop.set()
        # Every message under way is sent until acknowledged.
        await asyncio.wait(talking, timeout=60)
        elapsed = time.monotonic() - started
        for task in talking:
            task.cancel()

        messages = await settle(clients, dsn)
        for replica in replicas:
            replica.measure('end')
        counts = check(clients, messages)
        for client in clients:
            await client.close()
    finally:
        if web is not None:
            web.dispose()
        codes = [replica.stop() for replica in replicas]

    return {
        'replicas': [
            {
                'replica': replica.number, 'pid': replica.process.pid,
                'port': replica.port,
                'rss_ready_kb': replica.rss.get('ready', 0),
                'rss_start_kb': replica.rss.get('start', 0),
                'rss_end_kb': replica.rss.get('end', 0),
                'exit_code': code,
                'errors_logged': replica.log().count(' ERROR '),
            }
            for replica, code in zip(replicas, codes, strict=True)
        ],
        'connections': len(clients),
        'chats': len(clients) // 2,
        'duration': round(elapsed, 3),
        'acknowledged': sum(len(client.acked) for client in clients),
        'stored': sum(len(rows) for rows in messages.values()),
        'delivered': sum(len(client.received) for client in clients),
        'reconnects': sum(client.reconnects for client in clients),
        'failed_clients': sum(1 for c in clients if c.failure),
        **counts,
    }


def prepare(web: Web, replicas: list[Replica], chats: int) -> list[Client]:
    """Create the staff account and the chats; return their clients."""
    web.add_staff()
    clients = []
    staff_browser = None
    for number in range(chats):
        customer_browser = web.browser()
        chat_id = web.start_chat(customer_browser, number)
        if number % PER_SESSION == 0:
            staff_browser = web.browser()
            web.log_in(staff_browser)
        first = number % len(replicas)
        clients += [
            Client(f'c{number}', web, customer_browser, chat_id, False,
                   replicas, first),
            Client(f's{number}', web, staff_browser, chat_id, True,
                   replicas, first + 1),
        ]
    return clients


async def settle(
    clients: list[Client], dsn: str, timeout: float = 30
) -> dict[str, list[tuple[int, str]]]:
    """Wait (bounded) until every client got its chat's last message;
    return what is stored."""
    deadline = time.monotonic() + timeout
    while True:
        messages = await asyncio.to_thread(stored, dsn)
        behind = [
            client for client in clients
            if (client.received[-1][0] if client.received else 0)
            < len(messages.get(client.chat_id, []))
        ]
        if not behind or time.monotonic() > deadline:
            return messages
        await asyncio.sleep(0.2)


def table(report: dict[str, Any]) -> str:
    """The report, for people."""
    lines = [
        f'soak: {report["connections"]} connections '
        f'({report["chats"]} chats) on {len(report["replicas"])} '
        f'replicas for {report["duration"]:.1f} s',
        '',
    ]
    for key in (
        'acknowledged', 'stored', 'delivered', 'lost', 'duplicated',
        'out_of_order', 'stalled', 'reconnects', 'failed_clients',
    ):
        lines.append(f'  {key.replace("_", " "):<16}{report[key]:>10}')
    lines += [
        '',
        f'  {"replica":<8}{"pid":>8}{"rss ready":>12}{"rss start":>12}'
        f'{"rss end":>12}{"growth":>10}{"exit":>6}',
    ]
    for replica in report['replicas']:
        growth = replica['rss_end_kb'] - replica['rss_start_kb']
        lines.append(
            f'  {replica["replica"]:<8}{replica["pid"]:>8}'
            f'{replica["rss_ready_kb"] / 1024:>9.1f} MB'
            f'{replica["rss_start_kb"] / 1024:>9.1f} MB'
            f'{replica["rss_end_kb"] / 1024:>9.1f} MB'
            f'{growth / 1024:>+7.1f} MB'
            f'{replica["exit_code"]!s:>6}'
        )
    lines += ['', f'  result: {"ok" if report["ok"] else "FAILED"}']
    return '\n'.join(lines)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Soak test of onegov-chat replicas (loopback only).'
    )
    parser.add_argument(
        '--duration', type=float, default=60.0,
        help='seconds of chatting (default 60, at most 86400)',
    )
    parser.add_argument(
        '--connections', type=int, default=300,
        help='websocket connections, half customers, half staff '
        f'(default 300, 2 to {MAX_CONNECTIONS})',
    )
    parser.add_argument(
        '--replicas', type=int, default=2,
        help=f'onegov-chat serve processes (default 2, at most '
        f'{MAX_REPLICAS})',
    )
    parser.add_argument(
        '--interval', type=float, default=2.0,
        help='mean seconds between two messages of one connection '
        '(default 2)',
    )
    parser.add_argument(
        '--redis', default=None,
        help='a redis:// URL to use instead of starting redis-server',
    )
    parser.add_argument(
        '--dsn', default=None,
        help='an empty postgresql+psycopg:// database to use instead of '
        'starting PostgreSQL',
    )
    parser.add_argument('--seed', type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f'--duration must be above 0 and <= {MAX_DURATION:g}')
    if not 2 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f'--connections must be from 2 to {MAX_CONNECTIONS}')
    if not 2 <= args.replicas <= MAX_REPLICAS:
        parser.error(f'--replicas must be from 2 to {MAX_REPLICAS}')
    if not 0.05 <= args.interval <= 3600:
        parser.error('--interval must be from 0.05 to 3600')
    for url in (args.redis, args.dsn):
        if url is not None and not re.match(
            r'\w+(\+\w+)?://([^@/]*@)?(127\.0\.0\.1|localhost|\[::1\])[:/]',
            url,
        ):
            parser.error('--redis and --dsn must point to the loopback')
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    # Everything beyond the chatting itself: starting the backends and
    # the replicas, the handshakes, the settling and the stopping.
    limit = args.duration + 240 + args.connections * 0.5

    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix='onegov-chat-soak-'))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        try:
            redis = args.redis or stack.enter_context(redis_server(root))
            dsn = args.dsn or stack.enter_context(postgres_server())
            report = asyncio.run(
                asyncio.wait_for(soak(args, root, redis, dsn), limit)
            )
        except (SoakFailed, TimeoutError, OSError,
                subprocess.CalledProcessError) as exc:
            print(f'soak failed: {type(exc).__name__}: {exc}',
                  file=sys.stderr)
            return 2

    report['ok'] = not any(report[key] for key in (
        'lost', 'duplicated', 'out_of_order', 'stalled', 'failed_clients',
    ))
    print(json.dumps(report, sort_keys=True))
    print(table(report))
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
