"""Benchmarks of ``onegov-chat serve`` against a bare websockets relay.

    python bench/run.py            # the full run, under ten minutes
    python bench/run.py --smoke    # every scenario, tiny counts, seconds

Each run measures, one server process after the other, the bare relay
(bench/bare_relay.py) and the chat on each backend (the embedded SQLite
default; Redis + PostgreSQL), with the same scenarios:

* ``idle``: the server's RSS before and after opening many admitted
  connections that then stay quiet;
* ``handshakes_sequential`` and ``handshakes_concurrent``: connect with
  a fresh token, cookie and origin each time, close at once;
* ``fanout``: rooms of two (a customer and a staff member) and larger
  rooms (a customer and several staff connections), messages at fixed
  offered rates, every delivery timed.

The results go to ``results.json`` and ``results.md`` in --out
(bench/results by default).

"""

from __future__ import annotations

import argparse
import json
import math
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadgen import LoadGenerator, percentile
from prepare import Preparer, Room, bare_rooms, bare_visitors
from profiling import Recording
from report import markdown, summarise
from services import (
    Postgres,
    Redis,
    ServerProcess,
    cpu_seconds,
    cpu_times,
    load,
    machine,
    rss_kib,
    start_bare,
    start_chat,
    total_cpu,
)

BENCH = Path(__file__).resolve().parent

APPLICATION_ID = 'bench/town'


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does."""

    runs: int
    idle: int
    sequential: int
    concurrent: int
    concurrency: int
    pairs: int
    groups: int
    group_size: int
    rates: list[float] = field(default_factory=list)
    reference: float = 1000.0
    step: float = 2.0
    drain: float = 3.0
    #: How many steps narrow the highest clean rate down.
    refine: int = 2


FULL = Sizes(
    runs=3, idle=1000, sequential=200, concurrent=1500, concurrency=25,
    pairs=100, groups=20, group_size=5,
    rates=[100, 250, 500, 1000, 2000, 4000, 8000], reference=1000, step=2.0,
    drain=3.0,
)

SMOKE = Sizes(
    runs=1, idle=20, sequential=10, concurrent=40, concurrency=4,
    pairs=4, groups=2, group_size=3, rates=[100, 200], reference=200,
    step=0.5, drain=2.0, refine=1,
)

#: Beyond the reference rate, a step this late or lossy ends the ladder.
SATURATED_P99_MS = 1000.0


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` dealt round-robin into `parts` lists."""
    return [items[index::parts] for index in range(parts)]


def latency_figures(latencies: list[float]) -> dict[str, float]:
    return {
        'p50_ms': percentile(latencies, 0.50),
        'p99_ms': percentile(latencies, 0.99),
    }


def wait_quiet(pid: int, timeout: float = 15.0) -> None:
    """Wait until process `pid` uses under a tenth of a core."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.25)
        if cpu_seconds(pid) - before < 0.025:
            return


# Scenarios -----------------------------------------------------------------


class Scenarios:
    """The scenarios against one running server."""

    def __init__(
        self,
        generator: LoadGenerator,
        server: ServerProcess,
        sizes: Sizes,
        backend_pids: list[int],
        profile: Path | None = None,
        profile_rate: float = 0.0,
    ) -> None:
        self.generator = generator
        self.server = server
        self.sizes = sizes
        self.backend_pids = backend_pids
        #: Where profiles go (profile-NAME-*.txt), if they are wanted.
        self.profile = profile
        self.profile_rate = profile_rate

    def record(self, name: str, seconds: float) -> list[Recording]:
        """Start a CPU (GIL) and a wall-time profile of the server."""
        if self.profile is None:
            return []
        base = f'{self.profile.name}-{name}'
        return [
            Recording(
                self.server.pid,
                self.profile.with_name(f'{base}-{kind}.txt'),
                seconds, gil=kind == 'gil',
            )
            for kind in ('gil', 'active')
        ]

    def finish(self, recordings: list[Recording]) -> None:
        for recording in recordings:
            recording.finish()

    @property
    def workers(self) -> int:
        return self.generator.size

    def idle(
        self, warm: list[dict[str, Any]], specs: list[dict[str, Any]],
        greeted: bool,
    ) -> dict[str, Any]:
        """RSS per open, admitted, quiet connection."""
        port, pid = self.server.port, self.server.pid

        # The first connections load code and fill caches once.
        self.generator.call('open_idle', [
            {'port': port, 'specs': part, 'greeted': greeted}
            for part in split(warm, self.workers)
        ])
        self.generator.all('close_idle')
        wait_quiet(pid)

        before = rss_kib(pid)
        opened = self.generator.call('open_idle', [
            {'port': port, 'specs': part, 'greeted': greeted}
            for part in split(specs, self.workers)
        ])
        wait_quiet(pid)
        time.sleep(0.5)
        after = rss_kib(pid)
        self.generator.all('close_idle')
        wait_quiet(pid)

        count = sum(answer['opened'] for answer in opened)
        return {
            'connections': count,
            'failed': merge(answer['failed'] for answer in opened),
            'rss_before_kib': before,
            'rss_after_kib': after,
            'kib_per_connection': (
                (after - before) / count if count else math.nan
            ),
        }

    def handshakes(
        self, specs: list[dict[str, Any]], concurrency: int,
        workers: int,
    ) -> dict[str, Any]:
        """Connect once with each spec, `concurrency` at a time in each
        of `workers` processes; close each connection at once."""
        pid = self.server.pid
        parts: list[dict[str, Any] | None] = [None] * self.workers
        start_at = time.monotonic() + 0.3
        for index, part in enumerate(split(specs, workers)):
            parts[index] = {
                'port': self.server.port, 'specs': part,
                'concurrency': concurrency, 'start_at': start_at,
            }

        recording = self.record('handshakes', 3) if workers > 1 else []
        user, system = cpu_times(pid)
        answers = self.generator.call('handshakes', parts)
        user_after, system_after = cpu_times(pid)
        user, system = user_after - user, system_after - system
        cpu = user + system
        self.finish(recording)

        latencies = [
            value * 1000 for answer in answers
            for value in answer['latencies']
        ]
        window = (
            max(answer['ended'] for answer in answers)
            - min(answer['started'] for answer in answers)
        )
        admitted = len(latencies)
        wait_quiet(pid)
        return {
            'attempted': len(specs),
            'admitted': admitted,
            'refused': merge(answer['refused'] for answer in answers),
            'seconds': window,
            'per_s': admitted / window if window else math.nan,
            **latency_figures(latencies),
            'server_cpu_us': cpu / admitted * 1e6 if admitted else math.nan,
            'server_cpu_share': cpu / window if window else math.nan,
            'server_system_share': system / cpu if cpu else math.nan,
            'loadgen_cpu_max': max(
                answer['cpu'] / window for answer in answers
            ),
        }

    def fanout(self, rooms: list[Room]) -> dict[str, Any]:
        """Delivery latency and CPU at rising offered rates."""
        sizes, pid = self.sizes, self.server.pid
        joined = self.generator.call('join', [
            {'port': self.server.port,
             'rooms': [room.members for room in part]}
            for part in split(rooms, self.workers)
        ])
        wait_quiet(pid)

        steps = []
        for number, rate in enumerate(sizes.rates):
            step = self.step(number, rate)
            steps.append(step)
            wait_quiet(pid)
            if rate >= sizes.reference and (
                step['p99_ms'] > SATURATED_P99_MS or step['closed']
            ):
                break

        # Narrow the highest clean rate down between the last clean step
        # and the first one that was not.
        # and the first one that was not (or below the first step, when
        # none was clean).
        for _ in range(sizes.refine):
            clean_rates = [s['offered'] for s in steps if s['p99_ms'] < 50]
            late_rates = [s['offered'] for s in steps if s['p99_ms'] >= 50]
            if not late_rates:
                break
            low = max(clean_rates) if clean_rates else 0
            above = [rate for rate in late_rates if rate > low]
            if not above or min(above) - low < max(0.1 * low, 20):
                break
            steps.append(self.step(len(steps), round((low + min(above)) / 2)))
            wait_quiet(pid)

        self.generator.all('close_rooms')
        wait_quiet(pid)
        clean = [
            step['delivered_per_s'] for step in steps
            if step['p99_ms'] < 50
        ]
        return {
            'rooms': len(rooms),
            'members': sum(answer['members'] for answer in joined),
            'failed': merge(answer['failed'] for answer in joined),
            'steps': steps,
            'clean_rate': max(clean) if clean else 0.0,
        }

    def step(self, number: int, rate: float) -> dict[str, Any]:
        sizes, pid = self.sizes, self.server.pid
        start_at = time.monotonic() + 0.3
        profiled = self.profile is not None and rate == self.profile_rate
        # A profiled step runs longer, for enough samples.
        duration = max(sizes.step, 8.0) if profiled else sizes.step
        recording = (
            self.record(f'fanout-{rate:g}', duration + 0.3)
            if profiled else []
        )
        user, system = cpu_times(pid)
        backend = total_cpu(self.backend_pids)
        answers = self.generator.all(
            'step', step=number, rate=rate / self.workers,
            duration=duration, start_at=start_at,
            drain_timeout=sizes.drain,
        )
        user_after, system_after = cpu_times(pid)
        user, system = user_after - user, system_after - system
        cpu = user + system
        backend = total_cpu(self.backend_pids) - backend
        self.finish(recording)

        latencies = [
            value for answer in answers for value in answer['latencies_ms']
        ]
        missing = sum(answer['missing'] for answer in answers)
        delivered = len(latencies)
        window = max(
            duration,
            max(answer['last_arrival'] for answer in answers) - start_at,
        )
        # The time the server had work: from the start until the last
        # delivery (or the end of the drain), not the idle rest.
        busy = window + 0.3
        return {
            'offered': rate,
            'sent': sum(answer['sent'] for answer in answers),
            'expected': sum(answer['expected'] for answer in answers),
            'delivered': delivered,
            'missing': missing,
            'stale': sum(answer['stale'] for answer in answers),
            'delivered_per_s': delivered / window,
            **latency_figures(latencies + [math.inf] * missing),
            'server_cpu_us': (
                cpu / delivered * 1e6 if delivered else math.nan
            ),
            'server_cpu_share': cpu / busy,
            # The kernel's part (stime): socket writes and reads, mostly.
            'server_system_share': system / cpu if cpu else math.nan,
            'backend_cpu_us': (
                backend / delivered * 1e6 if delivered else math.nan
            ),
            'loadgen_cpu_max': max(
                answer['cpu'] / busy for answer in answers
            ),
            'send_lag_p99_ms': max(
                answer['send_lag_p99_ms'] for answer in answers
            ),
            'errors': merge(answer['errors'] for answer in answers),
            'closed': merge(answer['closed'] for answer in answers),
        }


def merge(counters: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            merged[key] = merged.get(key, 0) + value
    return merged


# Servers -------------------------------------------------------------------


class Bench:
    """One benchmark run: the backends, the load generator, the rounds."""

    def __init__(self, arguments: argparse.Namespace) -> None:
        self.sizes = SMOKE if arguments.smoke else FULL
        if arguments.runs:
            self.sizes = Sizes(**{**asdict(self.sizes),
                                  'runs': arguments.runs})
        self.backends: list[str] = arguments.backends
        self.workers: int = arguments.workers
        self.out = Path(arguments.out)
        self.mode = 'smoke' if arguments.smoke else 'full'
        self.profile: bool = arguments.profile
        self.profile_rate: float = arguments.profile_rate
        self.work = Path(tempfile.mkdtemp(prefix='onegov-chat-bench-'))
        self.secret = secrets.token_hex(32)
        self.redis: Redis | None = None
        self.postgres: Postgres | None = None

    def settings(self, backend: str, label: str) -> dict[str, Any]:
        """A fresh store and database for one chat server."""
        directory = self.work / label
        directory.mkdir(parents=True)
        settings: dict[str, Any] = {
            'identity_secret': self.secret,
            'application_id': APPLICATION_ID,
            'allowed_origins': ['http://bench.test'],
            'data_dir': str(directory),
            # The benchmark sends far faster than a person types.
            'rate_limit': 100_000,
            'rate_limit_window': 1.0,
            'compression': False,
        }
        if backend == 'sqlite':
            settings['session_store'] = f'sqlite:///{directory}/sessions.db'
            settings['dsn'] = f'sqlite:///{directory}/chat.db'
            return settings

        if self.redis is None:
            self.redis = Redis(self.work)
        if self.postgres is None:
            self.postgres = Postgres()
        self.redis.flush()
        settings['session_store'] = self.redis.url
        settings['dsn'] = self.postgres.create_database(
            f'bench_{uuid.uuid4().hex[:12]}'
        )
        return settings

    def backend_pids(self, backend: str) -> list[int]:
        if backend == 'sqlite' or not self.redis or not self.postgres:
            return []
        return [*self.redis.pids(), *self.postgres.pids()]

    def sizes_of_rooms(self) -> list[int]:
        sizes = self.sizes
        return [2] * sizes.pairs + [sizes.group_size] * sizes.groups

    def profile_of(self, name: str, number: int) -> Path | None:
        """Where the profiles of server `name` go, in the first run."""
        if not self.profile or number:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / f'profile-{name}'

    def run_bare(
        self, generator: LoadGenerator, number: int
    ) -> dict[str, Any]:
        sizes = self.sizes
        server = start_bare(self.work / f'bare-{number}.log')
        try:
            scenarios = Scenarios(
                generator, server, sizes, [],
                self.profile_of('bare', number), self.profile_rate,
            )
            return self.scenarios(
                scenarios,
                warm=bare_visitors(self.workers * 10, 'warm'),
                idle=bare_visitors(sizes.idle, 'idle'),
                hs_warm=bare_visitors(20, 'hw'),
                sequential=bare_visitors(sizes.sequential, 'seq'),
                concurrent=bare_visitors(sizes.concurrent, 'con'),
                rooms=bare_rooms(self.sizes_of_rooms()),
                greeted=False,
            )
        finally:
            server.stop()

    def run_chat(
        self, generator: LoadGenerator, backend: str, number: int
    ) -> dict[str, Any]:
        sizes = self.sizes
        name = f'chat-{backend}'
        label = f'{name}-{number}'
        settings = self.settings(backend, label)
        prepared = time.monotonic()
        preparer = Preparer(settings)
        try:
            warm = preparer.visitors(self.workers * 10)
            idle = preparer.visitors(sizes.idle)
            hs_warm = preparer.visitors(20)
            sequential = preparer.visitors(sizes.sequential)
            concurrent = preparer.visitors(sizes.concurrent)
            rooms = preparer.rooms(self.sizes_of_rooms())
        finally:
            preparer.close()
        prepared = time.monotonic() - prepared

        config = self.work / f'{label}.yml'
        config.write_text(yaml.safe_dump(settings), encoding='utf-8')
        server = start_chat(config, self.work / f'{label}.log')
        try:
            scenarios = Scenarios(
                generator, server, sizes, self.backend_pids(backend),
                self.profile_of(name, number), self.profile_rate,
            )
            result = self.scenarios(
                scenarios, warm=warm, idle=idle, hs_warm=hs_warm,
                sequential=sequential, concurrent=concurrent, rooms=rooms,
                greeted=True,
            )
        finally:
            server.stop()
        result['prepare_seconds'] = prepared
        return result

    def scenarios(
        self,
        scenarios: Scenarios,
        warm: list[dict[str, Any]],
        idle: list[dict[str, Any]],
        hs_warm: list[dict[str, Any]],
        sequential: list[dict[str, Any]],
        concurrent: list[dict[str, Any]],
        rooms: list[Room],
        greeted: bool,
    ) -> dict[str, Any]:
        started = time.monotonic()
        results: dict[str, Any] = {}
        results['idle'] = scenarios.idle(warm, idle, greeted)
        scenarios.handshakes(hs_warm, 1, 1)
        results['handshakes_sequential'] = scenarios.handshakes(
            sequential, 1, 1
        )
        results['handshakes_concurrent'] = scenarios.handshakes(
            concurrent, self.sizes.concurrency, self.workers
        )
        results['fanout'] = scenarios.fanout(rooms)
        results['seconds'] = time.monotonic() - started
        return results

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        load_before = load()
        rounds = []
        loads: list[list[float]] = []
        generator = LoadGenerator(self.workers)
        try:
            for number in range(self.sizes.runs):
                servers: dict[str, Any] = {}
                servers['bare'] = self.run_bare(generator, number)
                loads.append(load())
                log(f'run {number + 1}: bare done, load {loads[-1]}')
                for backend in self.backends:
                    name = f'chat-{backend}'
                    servers[name] = self.run_chat(generator, backend, number)
                    loads.append(load())
                    log(f'run {number + 1}: {name} done, load {loads[-1]}')
                rounds.append({'run': number, 'servers': servers})
        finally:
            generator.close()
            self.close()

        meta = {
            'mode': self.mode,
            'runs': self.sizes.runs,
            'reference': self.sizes.reference,
            'sizes': asdict(self.sizes),
            'workers': self.workers,
            'backends': self.backends,
            'load_before': load_before,
            'load_after': load(),
            #: The 1, 5 and 15 minute load averages after each server.
            'load_during': loads,
            'seconds': time.monotonic() - started,
            'finished': time.strftime('%Y-%m-%d %H:%M:%S %z'),
            'machine': machine(),
            'versions': self.versions(),
            'source': source(),
        }
        return {
            'meta': meta,
            'summary': summarise(rounds, self.sizes.reference),
            'runs': rounds,
        }

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        found = {
            'Python': sys.version.split()[0],
            'websockets': version('websockets'),
            'SQLAlchemy': version('SQLAlchemy'),
            'redis-py': version('redis'),
            'onegov.chat': version('onegov.chat'),
        }
        if self.redis is not None:
            found['redis server'] = self.redis.version()
        if self.postgres is not None:
            found['PostgreSQL'] = self.postgres.version()
        return found

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def source() -> dict[str, Any]:
    """The commit measured, and the source files changed since."""
    git = shutil.which('git')
    if git is None:
        return {}

    def ask(*args: str) -> str:
        return subprocess.run(
            [git, '--no-optional-locks', *args], cwd=BENCH.parent,
            capture_output=True, text=True, check=False,
        ).stdout.strip()

    import onegov.chat

    changed = ask('status', '--porcelain', '--', 'src')
    return {
        'commit': ask('rev-parse', '--short', 'HEAD'),
        'changed': [line[3:] for line in changed.splitlines()],
        # Not the work tree's src when PYTHONPATH points to a copy.
        'package': str(Path(onegov.chat.__file__).parent),
    }


def plain(value: Any) -> Any:
    """`value` as strict JSON: no NaN (None) and no infinity ('inf')."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return 'inf'
        return value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def log(message: str) -> None:
    print(f'[bench] {message}', file=sys.stderr, flush=True)


def default_backends() -> list[str]:
    backends = ['sqlite']
    if shutil.which('redis-server') and any(
        Path('/usr/lib/postgresql').glob('*/bin/pg_ctl')
    ):
        backends.append('redis-postgres')
    return backends


def raise_file_limit() -> None:
    # Thousands of connections, on both ends: the servers and the
    # workers inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description='Benchmark onegov-chat serve against a bare relay.'
    )
    parser.add_argument(
        '--smoke', action='store_true',
        help='every scenario with tiny counts, in seconds',
    )
    parser.add_argument(
        '--runs', type=int, default=0,
        help='how many runs to take the medians of (default: 3, smoke 1)',
    )
    parser.add_argument(
        '--backends', nargs='+', choices=['sqlite', 'redis-postgres'],
        default=None,
        help='default: sqlite, and redis-postgres where both servers are '
        'installed',
    )
    parser.add_argument(
        '--workers', type=int, default=2,
        help='load generator processes (default: 2)',
    )
    parser.add_argument(
        '--out', default=str(BENCH / 'results'),
        help='where results.json and results.md go',
    )
    parser.add_argument(
        '--profile', action='store_true',
        help='record py-spy profiles of each server in the first run '
        '(concurrent handshakes, fan-out at --profile-rate)',
    )
    parser.add_argument(
        '--profile-rate', type=float, default=500,
        help='the offered rate whose fan-out step is profiled (500)',
    )
    arguments = parser.parse_args(argv)
    if arguments.backends is None:
        arguments.backends = default_backends()
    if arguments.workers < 1:
        parser.error('--workers must be at least 1')

    raise_file_limit()
    results = Bench(arguments).run()

    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(
        json.dumps(plain(results), indent=1, allow_nan=False),
        encoding='utf-8',
    )
    table = markdown(results)
    (out / 'results.md').write_text(table, encoding='utf-8')
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
