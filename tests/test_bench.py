"""The benchmarks' smoke mode: it runs, and it reports every scenario.

No figure is checked: a loaded CI machine makes any timing assertion
flaky, and the benchmarks are for reading, not for gating.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import postgres, require

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = {
    'idle', 'handshakes_sequential', 'handshakes_concurrent', 'fanout',
}


def run_smoke(out: Path, *args: str) -> dict[str, Any]:
    """Run the smoke mode into `out`; return what it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / 'bench' / 'run.py'), '--smoke',
         '--out', str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / 'results.json').read_text(encoding='utf-8'))


def test_smoke_reports_every_scenario(tmp_path: Path) -> None:
    """`bench/run.py --smoke` runs every scenario against the bare relay
    and the chat on SQLite, and writes JSON and Markdown results."""
    results = run_smoke(tmp_path, '--backends', 'sqlite')

    runs = results['runs']
    assert len(runs) == 1
    servers = runs[0]['servers']
    assert set(servers) == {'bare', 'chat-sqlite'}
    for name, scenarios in servers.items():
        assert SCENARIOS <= set(scenarios), name
        assert scenarios['handshakes_sequential']['admitted'] > 0, name
        assert scenarios['handshakes_concurrent']['admitted'] > 0, name
        assert scenarios['idle']['connections'] > 0, name
        assert scenarios['fanout']['steps'], name
        assert all(
            step['delivered'] > 0 for step in scenarios['fanout']['steps']
        ), name

    summary = results['summary']
    assert set(summary['figures']) == {'bare', 'chat-sqlite'}
    assert {target['server'] for target in summary['targets']} == {
        'chat-sqlite'
    }
    assert len(summary['targets']) == 6
    assert results['meta']['machine']['nproc']
    assert results['meta']['versions']['websockets']

    table = (tmp_path / 'results.md').read_text(encoding='utf-8')
    assert '| handshakes/s, concurrent' in table
    assert '## Targets' in table


def test_smoke_with_redis_and_postgres(tmp_path: Path) -> None:
    """The smoke mode also runs the chat on Redis and PostgreSQL, with
    servers of its own."""
    require('redis-server')
    postgres()
    results = run_smoke(tmp_path, '--backends', 'redis-postgres')

    servers = results['runs'][0]['servers']
    assert set(servers) == {'bare', 'chat-redis-postgres'}
    assert SCENARIOS <= set(servers['chat-redis-postgres'])
    assert 'PostgreSQL' in results['meta']['versions']
    assert 'redis server' in results['meta']['versions']
