"""Medians, ratios to the bare relay, targets, and the Markdown table.

Each run (a "round") measures the bare relay and the chat on every
backend one after the other; a ratio is taken within a round and the
report gives the median of the figures and the median of the ratios
over the rounds.

"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The headline figures: key, label, unit, which direction is better.
FIGURES: list[tuple[str, str, str, str]] = [
    ('hs_seq_per_s', 'handshakes/s, sequential', '/s', 'higher'),
    ('hs_seq_p50_ms', 'handshake p50, sequential', 'ms', 'lower'),
    ('hs_seq_p99_ms', 'handshake p99, sequential', 'ms', 'lower'),
    ('hs_per_s', 'handshakes/s, concurrent', '/s', 'higher'),
    ('hs_p50_ms', 'handshake p50, concurrent', 'ms', 'lower'),
    ('hs_p99_ms', 'handshake p99, concurrent', 'ms', 'lower'),
    ('hs_cpu_us', 'server CPU per admitted handshake', 'µs', 'lower'),
    ('clean_rate', 'highest delivery rate with p99 < 50 ms', 'msg/s',
     'higher'),
    ('p50_ref_ms', 'delivery p50 at the reference rate', 'ms', 'lower'),
    ('p99_ref_ms', 'delivery p99 at the reference rate', 'ms', 'lower'),
    ('cpu_ref_us', 'server CPU per delivered message', 'µs', 'lower'),
    ('backend_cpu_ref_us', 'Redis + PostgreSQL CPU per delivered message',
     'µs', 'lower'),
    ('idle_kib', 'memory per idle connection', 'KiB', 'lower'),
    ('loadgen_cpu_max', 'busiest load generator process', 'core',
     'lower'),
]


@dataclass(frozen=True)
class Target:
    """A goal for the ratio of a chat figure to the bare relay's."""

    label: str
    figure: str
    check: Callable[[float], bool]
    goal: str


TARGETS = [
    Target('handshakes/s (concurrent)', 'hs_per_s',
           lambda ratio: ratio >= 0.7, '≥ 0.7x'),
    Target('server CPU per admitted handshake', 'hs_cpu_us',
           lambda ratio: ratio <= 2.0, '≤ 2x'),
    Target('server CPU per delivered message (persistence on)',
           'cpu_ref_us', lambda ratio: ratio <= 1.5, '≤ 1.5x'),
    Target('highest delivery rate with p99 < 50 ms', 'clean_rate',
           lambda ratio: ratio >= 0.6, '≥ 0.6x'),
    Target('p99 delivery latency at the reference rate', 'p99_ref_ms',
           lambda ratio: ratio <= 1.5, '≤ 1.5x'),
    Target('memory per idle authenticated connection', 'idle_kib',
           lambda ratio: ratio <= 1.3, '≤ 1.3x'),
]


def median(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return statistics.median(finite) if finite else math.nan


def ratio(value: float, baseline: float) -> float:
    if math.isnan(value) or math.isnan(baseline):
        return math.nan
    if baseline == 0:
        return math.inf if value else 1.0
    return value / baseline


def headline(scenarios: dict[str, Any], reference: float) -> dict[str, float]:
    """The headline figures of one server in one round."""
    sequential = scenarios['handshakes_sequential']
    concurrent = scenarios['handshakes_concurrent']
    fanout = scenarios['fanout']
    idle = scenarios['idle']
    at_reference = next(
        (step for step in fanout['steps'] if step['offered'] == reference),
        None,
    )
    nan = math.nan
    loadgen = [
        step['loadgen_cpu_max'] for step in fanout['steps']
    ] + [concurrent['loadgen_cpu_max']]
    return {
        'hs_seq_per_s': sequential['per_s'],
        'hs_seq_p50_ms': sequential['p50_ms'],
        'hs_seq_p99_ms': sequential['p99_ms'],
        'hs_per_s': concurrent['per_s'],
        'hs_p50_ms': concurrent['p50_ms'],
        'hs_p99_ms': concurrent['p99_ms'],
        'hs_cpu_us': concurrent['server_cpu_us'],
        'clean_rate': fanout['clean_rate'],
        'p50_ref_ms': at_reference['p50_ms'] if at_reference else nan,
        'p99_ref_ms': at_reference['p99_ms'] if at_reference else nan,
        'cpu_ref_us': (
            at_reference['server_cpu_us'] if at_reference else nan
        ),
        'backend_cpu_ref_us': (
            at_reference['backend_cpu_us'] if at_reference else nan
        ),
        'idle_kib': idle['kib_per_connection'],
        'loadgen_cpu_max': max(loadgen),
    }


def summarise(
    rounds: list[dict[str, Any]], reference: float
) -> dict[str, Any]:
    """Medians of the figures and of the ratios, and the targets."""
    names = list(rounds[0]['servers'])
    figures: dict[str, dict[str, list[float]]] = {
        name: {} for name in names
    }
    ratios: dict[str, dict[str, list[float]]] = {
        name: {} for name in names if name != 'bare'
    }
    for one in rounds:
        heads = {
            name: headline(scenarios, reference)
            for name, scenarios in one['servers'].items()
        }
        for name, head in heads.items():
            for key, value in head.items():
                figures[name].setdefault(key, []).append(value)
                if name != 'bare':
                    ratios[name].setdefault(key, []).append(
                        ratio(value, heads['bare'][key])
                    )

    medians = {
        name: {key: median(values) for key, values in by_key.items()}
        for name, by_key in figures.items()
    }
    median_ratios = {
        name: {key: median(values) for key, values in by_key.items()}
        for name, by_key in ratios.items()
    }
    targets = []
    for target in TARGETS:
        for name, by_key in median_ratios.items():
            value = by_key.get(target.figure, math.nan)
            targets.append({
                'target': target.label,
                'server': name,
                'goal': target.goal,
                'ratio': value,
                'met': bool(not math.isnan(value) and target.check(value)),
            })
    return {
        'figures': medians,
        'ratios': median_ratios,
        'targets': targets,
        'ladders': ladders(rounds),
    }


def ladders(rounds: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per server and offered rate: the medians over the rounds."""
    found: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for one in rounds:
        for name, scenarios in one['servers'].items():
            for step in scenarios['fanout']['steps']:
                found.setdefault(name, {}).setdefault(
                    step['offered'], []
                ).append(step)
    keys = (
        'delivered_per_s', 'p50_ms', 'p99_ms', 'server_cpu_us',
        'server_cpu_share', 'server_system_share', 'loadgen_cpu_max',
    )
    return {
        name: [
            {
                'offered': offered,
                'runs': len(steps),
                **{key: median([step[key] for step in steps])
                   for key in keys},
            }
            for offered, steps in sorted(by_rate.items())
        ]
        for name, by_rate in found.items()
    }


def number(value: float) -> str:
    if math.isnan(value):
        return '-'
    if math.isinf(value):
        return '∞'
    if abs(value) >= 100:
        return f'{value:,.0f}'
    if abs(value) >= 10:
        return f'{value:.1f}'
    return f'{value:.2f}'


def percent(value: float) -> str:
    return '-' if math.isnan(value) else f'{value:.0%}'


def max_load(meta: dict[str, Any]) -> str:
    during = [values[0] for values in meta.get('load_during', [])]
    return number(max(during)) if during else '-'


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: figures, targets, ladders, the setup."""
    meta = results['meta']
    summary = results['summary']
    figures = summary['figures']
    ratios = summary['ratios']
    names = list(figures)
    lines = [
        f'# onegov.chat benchmarks ({meta["mode"]})',
        '',
        f'{meta["runs"]} run(s), medians; ratios to the bare relay are '
        f'taken within each run. Reference rate: {number(meta["reference"])}'
        f' msg/s offered. Load average (1, 5, 15 min) before / after: '
        f'{meta["load_before"]} / {meta["load_after"]}; highest 1-minute '
        f'load after a server: {max_load(meta)}. Took '
        f'{meta["seconds"]:.0f} s.',
        '',
    ]

    header = ['figure', 'bare']
    for name in names[1:]:
        header += [name, 'ratio']
    lines += [
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    for key, label, unit, better in FIGURES:
        if key not in figures[names[0]]:
            continue
        row = [f'{label} ({unit}, {better} is better)',
               number(figures['bare'][key])]
        for name in names[1:]:
            row += [number(figures[name][key]), number(ratios[name][key])]
        lines.append('| ' + ' | '.join(row) + ' |')

    lines += ['', '## Targets', '', '| target | server | goal | ratio | |',
              '|---|---|---|---|---|']
    for target in summary['targets']:
        lines.append(
            f'| {target["target"]} | {target["server"]} | {target["goal"]} '
            f'| {number(target["ratio"])} | '
            f'{"met" if target["met"] else "not met"} |'
        )

    lines += ['', '## Fan-out by offered rate', '',
              '| server | offered msg/s | delivered msg/s | p50 ms | p99 ms '
              '| server CPU µs/msg | server CPU (cores) | of it in the kernel '
              '| load generator (cores) |',
              '|---|---|---|---|---|---|---|---|---|']
    for name, steps in summary['ladders'].items():
        for step in steps:
            lines.append(
                f'| {name} | {number(step["offered"])} '
                f'| {number(step["delivered_per_s"])} '
                f'| {number(step["p50_ms"])} | {number(step["p99_ms"])} '
                f'| {number(step["server_cpu_us"])} '
                f'| {number(step["server_cpu_share"])} '
                f'| {percent(step["server_system_share"])} '
                f'| {number(step["loadgen_cpu_max"])} |'
            )

    machine = meta['machine']
    versions = meta['versions']
    lines += [
        '', '## Setup', '',
        f'* Machine: {machine["nproc"]} cores, {machine["cpu_model"]}, '
        f'{machine["memory_gib"]} GiB, Linux {machine["kernel"]}',
        '* Versions: ' + ', '.join(
            f'{name} {version}' for name, version in versions.items()
        ),
        f'* Source: commit {meta.get("source", {}).get("commit", "?")}'
        + (' with changes to '
           + ', '.join(meta['source']['changed'])
           if meta.get('source', {}).get('changed') else ''),
        f'* Sizes: {meta["sizes"]}',
        '',
    ]
    return '\n'.join(lines)
