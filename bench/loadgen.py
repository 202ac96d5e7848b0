"""The load generator: asyncio websocket clients in worker processes.

`LoadGenerator` starts a few worker processes (one per core is enough:
each one runs an event loop with many connections) and hands them
commands over a pipe; each command is bounded in count and in time, and
answers with what it measured and the CPU time the worker spent on it,
so that a report can tell when the generator, not the server, was the
limit. Every connection goes to 127.0.0.1 only.

Latencies are measured against the time a message was *due*, not the
time it was sent: a sender that falls behind (the coordinated-omission
problem) shows up as latency instead of hiding it.

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
)
from websockets.typing import Origin

#: The origin every client sends; the chat server's allowlist has it.
ORIGIN = 'http://bench.test'

#: The only host a client connects to.
HOST = '127.0.0.1'

#: What a benchmark message says after its step and due time.
TEXT = 'Good morning, I have a question about my building permit.'

#: How many connections one worker opens at once while setting up.
SETUP_CONCURRENCY = 20


@dataclass
class Member:
    """One connection of a room."""

    spec: dict[str, Any]
    connection: ClientConnection
    waiters: dict[str, asyncio.Event] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    def expect(self, kind: str) -> asyncio.Event:
        event = self.waiters.get(kind)
        if event is None:
            event = self.waiters[kind] = asyncio.Event()
        return event


async def open_connection(
    port: int, spec: dict[str, Any], timeout: float = 30.0
) -> ClientConnection:
    """Connect as a browser would: the origin, the cookie, the token."""
    headers = {'Cookie': spec['cookie']} if spec.get('cookie') else None
    return await connect(
        f'ws://{HOST}:{port}{spec["path"]}',
        origin=Origin(ORIGIN),
        additional_headers=headers,
        compression=None,
        open_timeout=timeout,
        ping_interval=None,
        close_timeout=5,
        max_size=2**20,
    )


async def sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of `values` (inf counts as a value)."""
    if not values:
        return float('nan')
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))
    return ordered[rank]


class Worker:
    """The event loop of one worker process."""

    def __init__(self, pipe: Connection, index: int) -> None:
        self.pipe = pipe
        self.index = index
        self.idle: list[ClientConnection] = []
        self.rooms: list[list[Member]] = []
        self.closing = False
        self.reset_step(-1, 0)

    def reset_step(self, step: int, expected: int) -> None:
        self.step = step
        self.expected = expected
        self.received = 0
        self.stale = 0
        self.latencies: list[int] = []
        self.last_arrival = 0
        self.errors: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.done = asyncio.Event() if step >= 0 else None

    async def serve(self) -> None:
        while True:
            command, arguments = await asyncio.to_thread(self.pipe.recv)
            if command == 'quit':
                await self.do_close_rooms()
                await self.do_close_idle()
                self.pipe.send({})
                return

            cpu, wall = time.process_time(), time.monotonic()
            try:
                result = await getattr(self, f'do_{command}')(**arguments)
            except Exception as exc:
                result = {'failure': f'{type(exc).__name__}: {exc}'}
            result['cpu'] = time.process_time() - cpu
            result['wall'] = time.monotonic() - wall
            self.pipe.send(result)

    # Handshakes ---------------------------------------------------------

    async def do_handshakes(
        self,
        port: int,
        specs: list[dict[str, Any]],
        concurrency: int,
        start_at: float,
    ) -> dict[str, Any]:
        """Connect once with each spec, `concurrency` at a time; close
        each connection as soon as it is open."""
        latencies: list[float] = []
        refused: Counter[str] = Counter()
        pending = iter(specs)

        async def connect_in_turn() -> None:
            for spec in pending:
                started = time.monotonic()
                try:
                    connection = await open_connection(port, spec)
                except InvalidStatus as exc:
                    refused[str(exc.response.status_code)] += 1
                    continue
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    refused[type(exc).__name__] += 1
                    continue
                latencies.append(time.monotonic() - started)
                await connection.close()

        await sleep_until(start_at)
        started = time.monotonic()
        await asyncio.gather(
            *(connect_in_turn() for _ in range(concurrency))
        )
        return {
            'latencies': latencies,
            'refused': dict(refused),
            'started': started,
            'ended': time.monotonic(),
        }

    # Idle connections ---------------------------------------------------

    async def do_open_idle(
        self, port: int, specs: list[dict[str, Any]], greeted: bool
    ) -> dict[str, Any]:
        """Open a connection with each spec and keep it open; with
        `greeted`, wait for the server's first frame (its hello)."""
        failed: Counter[str] = Counter()
        pending = iter(specs)

        async def open_in_turn() -> None:
            for spec in pending:
                try:
                    connection = await open_connection(port, spec)
                    if greeted:
                        await asyncio.wait_for(connection.recv(), 30)
                except InvalidStatus as exc:
                    failed[str(exc.response.status_code)] += 1
                    continue
                except (
                    OSError, InvalidHandshake, TimeoutError,
                    ConnectionClosed,
                ) as exc:
                    failed[type(exc).__name__] += 1
                    continue
                self.idle.append(connection)

        await asyncio.gather(
            *(open_in_turn() for _ in range(SETUP_CONCURRENCY))
        )
        return {'opened': len(self.idle), 'failed': dict(failed)}

    async def do_close_idle(self) -> dict[str, Any]:
        idle, self.idle = self.idle, []
        await asyncio.gather(
            *(connection.close() for connection in idle),
            return_exceptions=True,
        )
        return {'closed': len(idle)}

    # Rooms --------------------------------------------------------------

    async def do_join(
        self, port: int, rooms: list[list[dict[str, Any]]]
    ) -> dict[str, Any]:
        """Connect every member of `rooms` and join it to its chat."""
        self.closing = False
        failed: Counter[str] = Counter()
        joined: list[list[Member | None]] = [
            [None] * len(room) for room in rooms
        ]
        pending = iter([
            (r, m, spec)
            for r, room in enumerate(rooms)
            for m, spec in enumerate(room)
        ])

        async def join_in_turn() -> None:
            for r, m, spec in pending:
                try:
                    joined[r][m] = await self.join(port, spec)
                except InvalidStatus as exc:
                    failed[str(exc.response.status_code)] += 1
                except (
                    OSError, InvalidHandshake, TimeoutError,
                    ConnectionClosed,
                ) as exc:
                    failed[type(exc).__name__] += 1

        await asyncio.gather(
            *(join_in_turn() for _ in range(SETUP_CONCURRENCY))
        )
        self.rooms = [
            [member for member in room if member is not None]
            for room in joined
        ]
        return {
            'members': sum(len(room) for room in self.rooms),
            'failed': dict(failed),
        }

    async def join(self, port: int, spec: dict[str, Any]) -> Member:
        connection = await open_connection(port, spec)
        member = Member(spec, connection)
        join = spec.get('join')
        if join is not None:
            hello = member.expect('hello')
        member.reader = asyncio.get_running_loop().create_task(
            self.read(member)
        )
        if join is not None:
            await asyncio.wait_for(hello.wait(), 30)
            joined = member.expect('joined')
            await connection.send(json.dumps(join))
            await asyncio.wait_for(joined.wait(), 30)
        return member

    async def read(self, member: Member) -> None:
        try:
            async for frame in member.connection:
                self.on_frame(member, frame)
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                self.closed[str(member.connection.close_code)] += 1
                if self.done is not None:
                    # Nothing more arrives on this one: do not wait.
                    self.done.set()

    def on_frame(self, member: Member, frame: str | bytes) -> None:
        data = json.loads(frame)
        kind = data.get('type')
        if kind == 'message':
            step, due, _ = data['text'].split(':', 2)
            if int(step) != self.step:
                self.stale += 1
                return
            now = time.monotonic_ns()
            self.latencies.append(now - int(due))
            self.last_arrival = now
            self.received += 1
            if self.received >= self.expected and self.done is not None:
                self.done.set()
            return
        if kind == 'error':
            self.errors[str(data.get('code'))] += 1
        waiter = member.waiters.pop(kind, None)
        if waiter is not None:
            waiter.set()

    async def do_step(
        self,
        step: int,
        rate: float,
        duration: float,
        start_at: float,
        drain_timeout: float,
    ) -> dict[str, Any]:
        """Send `rate` messages a second for `duration` seconds, spread
        over the rooms and, in each room, over its members in turn, then
        wait up to `drain_timeout` for every delivery."""
        rooms = [room for room in self.rooms if room]
        count = round(rate * duration) if rooms else 0
        plan = [
            (rooms[k % len(rooms)], k // len(rooms)) for k in range(count)
        ]
        expected = sum(len(room) for room, _ in plan)
        self.reset_step(step, expected)
        assert self.done is not None
        if not expected:
            self.done.set()

        base = int(start_at * 1e9)
        interval = 1e9 / rate
        lags: list[int] = []
        await sleep_until(start_at)
        k = 0
        while k < count:
            now = time.monotonic_ns()
            due = base + int(k * interval)
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                continue
            # Send everything that is due now, in one go.
            while k < count and (due := base + int(k * interval)) <= now:
                room, turn = plan[k]
                member = room[turn % len(room)]
                frame: dict[str, Any] = {
                    'type': 'message',
                    'text': f'{step}:{due}:{TEXT}',
                    'client_id': f'w{self.index}s{step}n{k}',
                }
                if member.spec.get('chat_id'):
                    frame['chat_id'] = member.spec['chat_id']
                lags.append(now - due)
                with contextlib.suppress(ConnectionClosed):
                    await member.connection.send(json.dumps(frame))
                k += 1
        sent_until = time.monotonic()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), drain_timeout)
        # Whatever is still missing counts as infinitely late.
        missing = max(0, expected - self.received)
        return {
            'sent': count,
            'expected': expected,
            'received': self.received,
            'missing': missing,
            'stale': self.stale,
            'latencies_ms': [value / 1e6 for value in self.latencies],
            'send_lag_p99_ms': percentile(
                [value / 1e6 for value in lags], 0.99
            ) if lags else 0.0,
            'started': start_at,
            'sent_until': sent_until,
            'last_arrival': self.last_arrival / 1e9,
            'errors': dict(self.errors),
            'closed': dict(self.closed),
        }

    async def do_close_rooms(self) -> dict[str, Any]:
        self.closing = True
        members = [member for room in self.rooms for member in room]
        self.rooms = []
        await asyncio.gather(
            *(member.connection.close() for member in members),
            return_exceptions=True,
        )
        for member in members:
            if member.reader is not None:
                member.reader.cancel()
        return {'closed': len(members)}


def worker_main(pipe: Connection, index: int) -> None:
    """The entry point of a worker process."""
    asyncio.run(Worker(pipe, index).serve())


class LoadGenerator:
    """A few worker processes, driven in lock step."""

    def __init__(self, workers: int, timeout: float = 180.0) -> None:
        context = multiprocessing.get_context('spawn')
        self.timeout = timeout
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for index in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, args=(theirs, index), daemon=True
            )
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)

    @property
    def size(self) -> int:
        return len(self.pipes)

    def call(
        self, command: str, arguments: list[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        """Send `command` to each worker with arguments (None: skip it);
        return the answers of those that got it."""
        asked = []
        for pipe, argument in zip(self.pipes, arguments, strict=True):
            if argument is not None:
                pipe.send((command, argument))
                asked.append(pipe)
        answers = []
        for pipe in asked:
            if not pipe.poll(self.timeout):
                raise TimeoutError(f'a worker did not answer {command}')
            answer: dict[str, Any] = pipe.recv()
            if 'failure' in answer:
                raise RuntimeError(f'{command} failed: {answer["failure"]}')
            answers.append(answer)
        return answers

    def all(self, command: str, **arguments: Any) -> list[dict[str, Any]]:
        return self.call(command, [arguments] * self.size)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(('quit', {}))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
