"""The baseline of the benchmarks: a bare websockets relay.

No authentication, no storage, no protocol beyond "a JSON object in,
the same JSON object out to everyone in the room". The room is named by
the ``room`` query parameter; every member, the sender included, gets
each message, as in the chat. It runs with the same websockets settings
as ``onegov-chat serve`` (no compression, the same frame size limit and
ping interval), so that whatever the chat costs on top of it is what
the chat adds.

    python bench/bare_relay.py --port 0

prints ``event=server_ready port=N`` once it listens and stops on
SIGTERM or SIGINT.

"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: dict[str, set[ServerConnection]] = defaultdict(set)


def room_of(path: str) -> str:
    """The room named by the ``room`` query parameter ('' without)."""
    values = parse_qs(urlsplit(path).query).get('room', [''])
    return values[0]


async def relay(connection: ServerConnection) -> None:
    """Relay every JSON object a member sends to the whole room."""
    room = room_of(connection.request.path if connection.request else '')
    members = rooms[room]
    members.add(connection)
    try:
        async for frame in connection:
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue

            # Encoded once, for every member, as the chat does.
            broadcast(
                members,
                json.dumps(message, ensure_ascii=False, separators=(',', ':')),
            )
    finally:
        members.discard(connection)
        if not members:
            del rooms[room]


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.cancel)

    async with serve(
        relay, host, port,
        compression=None,
        max_size=64 * 1024,
        ping_interval=20,
        ping_timeout=20,
        close_timeout=5,
        server_header=None,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f'event=server_ready host={host} port={bound}', flush=True)
        try:
            await stop
        except asyncio.CancelledError:
            pass


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.host, arguments.port))
