"""Where the memory of an idle connection goes, by allocation site.

    python bench/memory.py [--connections 500] [--out bench/results]

Runs the chat server (embedded SQLite defaults) and then the bare relay
*in this process*, under tracemalloc, opens the same number of idle
connections to each from a load generator process, and compares
snapshots taken before and after: the allocation sites that grew, in
bytes per connection. tracemalloc slows the server down and counts
Python allocations only (not the kernel's socket buffers, not the
allocator's slack), so the totals are below the RSS deltas of
bench/run.py; what it gives is the split. Writes ``memory.md``.

"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from websockets.asyncio.server import serve

from bare_relay import relay
from loadgen import LoadGenerator
from onegov.chat.config import build_config
from onegov.chat.server import ChatServer
from prepare import Preparer, bare_visitors
from run import APPLICATION_ID, raise_file_limit, split

BENCH = Path(__file__).resolve().parent


async def idle_growth(
    generator: LoadGenerator,
    port: int,
    warm: list[dict[str, Any]],
    specs: list[dict[str, Any]],
    greeted: bool,
) -> tuple[list[tracemalloc.StatisticDiff], int]:
    """Open `specs` and keep them open; what grew, and how many."""

    def call(command: str, parts: list[dict[str, Any] | None]) -> Any:
        return generator.call(command, parts)

    def spread(items: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        return [
            {'port': port, 'specs': part, 'greeted': greeted}
            for part in split(items, generator.size)
        ]

    await asyncio.to_thread(call, 'open_idle', spread(warm))
    await asyncio.to_thread(
        call, 'close_idle', [{} for _ in range(generator.size)]
    )
    await asyncio.sleep(0.5)
    gc.collect()
    before = tracemalloc.take_snapshot()

    opened = await asyncio.to_thread(call, 'open_idle', spread(specs))
    await asyncio.sleep(1.0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    await asyncio.to_thread(
        call, 'close_idle', [{} for _ in range(generator.size)]
    )
    await asyncio.sleep(0.5)

    count = sum(answer['opened'] for answer in opened)
    keep = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, '<frozen importlib._bootstrap>'),
    ]
    grown = after.filter_traces(keep).compare_to(
        before.filter_traces(keep), 'traceback'
    )
    return grown, count


async def chat(
    generator: LoadGenerator, connections: int, directory: Path
) -> tuple[list[tracemalloc.StatisticDiff], int]:
    settings = {
        'identity_secret': secrets.token_hex(32),
        'application_id': APPLICATION_ID,
        'allowed_origins': ['http://bench.test'],
        'data_dir': str(directory),
        'session_store': f'sqlite:///{directory}/sessions.db',
        'dsn': f'sqlite:///{directory}/chat.db',
    }
    preparer = Preparer(settings)
    try:
        warm = preparer.visitors(generator.size * 10)
        specs = preparer.visitors(connections)
    finally:
        preparer.close()

    server = ChatServer(build_config(settings))
    await server.start('127.0.0.1', 0)
    try:
        return await idle_growth(
            generator, server.bound_port(), warm, specs, True
        )
    finally:
        await server.close()


async def bare(
    generator: LoadGenerator, connections: int
) -> tuple[list[tracemalloc.StatisticDiff], int]:
    async with serve(
        relay, '127.0.0.1', 0, compression=None, max_size=64 * 1024,
        ping_interval=20, ping_timeout=20, close_timeout=5,
        server_header=None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        return await idle_growth(
            generator, port,
            bare_visitors(generator.size * 10, 'warm'),
            bare_visitors(connections, 'idle'), False,
        )


def table(
    title: str, grown: list[tracemalloc.StatisticDiff], count: int,
    top: int,
) -> list[str]:
    total = sum(stat.size_diff for stat in grown)

    # By allocation site, and the nearest caller in our own code, which
    # tells the chat's share of a library's allocations.
    sites: dict[str, list[int]] = {}
    callers: dict[str, int] = {}
    for stat in grown:
        frames = list(stat.traceback)
        ours = next(
            (frame for frame in reversed(frames)
             if 'onegov/chat/' in frame.filename
             or 'bare_relay' in frame.filename),
            None,
        )
        label = f'`{where(frames[-1])}`'
        if ours is not None and ours is not frames[-1]:
            label += f' ← `{where(ours)}`'
        totals = sites.setdefault(label, [0, 0])
        totals[0] += stat.size_diff
        totals[1] += stat.count_diff
        caller = f'`{where(ours)}`' if ours else 'the libraries alone'
        callers[caller] = callers.get(caller, 0) + stat.size_diff

    lines = [
        f'## {title}', '',
        f'{count} connections; Python allocations grew by '
        f'{total / count / 1024:.2f} KiB per connection.', '',
        '| allocation site | bytes per connection | blocks per connection |',
        '|---|---|---|',
    ]
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])
    for label, (size, blocks) in ranked[:top]:
        lines.append(
            f'| {label} | {size / count:,.0f} | {blocks / count:.1f} |'
        )
    lines += ['', '| nearest own caller | bytes per connection |',
              '|---|---|']
    for caller, size in sorted(callers.items(), key=lambda i: -i[1])[:12]:
        if size >= count:
            lines.append(f'| {caller} | {size / count:,.0f} |')
    return [*lines, '']


def where(frame: tracemalloc.Frame) -> str:
    path = frame.filename
    for marker in ('site-packages/', 'python3.11/', '/src/', '/bench/'):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f'{path}:{frame.lineno}'


async def main(connections: int, out: Path, top: int) -> str:
    raise_file_limit()
    generator = LoadGenerator(2)
    tracemalloc.start(25)
    try:
        with tempfile.TemporaryDirectory(
            prefix='onegov-chat-bench-memory-'
        ) as directory:
            chat_grown, chat_count = await chat(
                generator, connections, Path(directory)
            )
        bare_grown, bare_count = await bare(generator, connections)
    finally:
        tracemalloc.stop()
        generator.close()

    lines = [
        '# Memory per idle connection, by allocation site', '',
        'tracemalloc, by allocation site and the nearest caller in the '
        'server\'s own code; both servers in one '
        'process, one after the other.', '',
        *table('onegov-chat serve (SQLite)', chat_grown, chat_count, top),
        *table('bare relay', bare_grown, bare_count, top),
    ]
    text = '\n'.join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'memory.md').write_text(text, encoding='utf-8')
    return text


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--connections', type=int, default=500)
    parser.add_argument('--top', type=int, default=20)
    parser.add_argument('--out', default=str(BENCH / 'results'))
    arguments = parser.parse_args()
    print(asyncio.run(
        main(arguments.connections, Path(arguments.out), arguments.top)
    ))
    sys.exit(0)
