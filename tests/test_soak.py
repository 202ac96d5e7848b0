"""``bench/soak.py``: the soak test, run briefly, and its bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import postgres_bindir, require

SCRIPT = Path(__file__).resolve().parent.parent / 'bench' / 'soak.py'


def soak(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def load_soak() -> Any:
    """The script as a module, to test its checks without a run."""
    name = 'bench_soak'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up while being defined.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_nothing() -> None:
    """Five seconds of 60 connections over two replicas, with Redis and
    PostgreSQL of the script's own: nothing is lost, duplicated, out of
    order or stalled, and the report gives each replica's memory."""
    require('redis-server')
    postgres_bindir()

    result = soak('--duration', '5', '--connections', '60')
    assert result.returncode == 0, result.stdout + result.stderr

    first, *rest = result.stdout.splitlines()
    report = json.loads(first)
    assert report['ok'] is True
    assert report['connections'] == 60
    assert report['chats'] == 30
    for key in (
        'lost', 'duplicated', 'out_of_order', 'stalled', 'failed_clients',
        'reconnects',
    ):
        assert report[key] == 0, key
    assert report['acknowledged'] == report['stored'] > 30
    assert report['delivered'] == 2 * report['stored']
    assert len(report['replicas']) == 2
    for replica in report['replicas']:
        assert replica['rss_ready_kb'] > 0
        assert replica['rss_start_kb'] > 0
        assert replica['rss_end_kb'] > 0
        assert replica['exit_code'] == 0
        assert replica['errors_logged'] == 0

    text = '\n'.join(rest)
    assert '60 connections (30 chats) on 2 replicas' in text
    assert 'rss start' in text and 'rss end' in text
    for line in ('lost', 'duplicated', 'out of order'):
        assert f'  {line}' in text
    assert text.rstrip().endswith('result: ok')


def test_soak_counts_what_went_wrong() -> None:
    """The soak's check counts a message missing, received twice, out of
    order or under another seq, and one never acknowledged."""
    module = load_soak()
    stored = {'a': [(1, 'x1'), (2, 'y1'), (3, 'x2')]}

    def client(
        received: list[tuple[int, str]],
        acked: dict[str, int],
        said: set[str],
    ) -> SimpleNamespace:
        return SimpleNamespace(
            chat_id='a', received=received, acked=acked, said=said
        )

    perfect = [(1, 'x1'), (2, 'y1'), (3, 'x2')]
    fine = client(perfect, {'x1': 1, 'x2': 3}, {'x1', 'x2'})
    assert module.check([fine], stored) == {
        'lost': 0, 'duplicated': 0, 'out_of_order': 0, 'stalled': 0,
    }

    # Missing seq 2, seq 1 twice, 3 before 1, 'x3' never acknowledged,
    # and 'y2' acknowledged but not stored.
    broken = client(
        [(1, 'x1'), (3, 'x2'), (1, 'x1')],
        {'x1': 1, 'x2': 3, 'y2': 4},
        {'x1', 'x2', 'x3', 'y2'},
    )
    assert module.check([broken], stored) == {
        'lost': 2, 'duplicated': 1, 'out_of_order': 1, 'stalled': 1,
    }

    # A seq that carries another message than the one stored under it.
    swapped = client([(1, 'x1'), (2, 'x2'), (3, 'y1')], {}, set())
    assert module.check([swapped], stored)['out_of_order'] == 2


def test_soak_is_bounded_and_stays_on_the_loopback() -> None:
    """The soak refuses unbounded counts and durations and backends that
    are not on 127.0.0.1, with exit status 2 and no run."""
    for args in (
        ['--connections', '100000'],
        ['--duration', '0'],
        ['--duration', '1e9'],
        ['--replicas', '1'],
        ['--redis', 'redis://10.0.0.1:6379/0'],
        ['--dsn', 'postgresql+psycopg://u@db.example.org/chat'],
    ):
        result = soak(*args, timeout=60)
        assert result.returncode == 2, args
        assert result.stdout == ''
        assert 'error: --' in result.stderr
