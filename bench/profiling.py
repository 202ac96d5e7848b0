"""Sampling profiles of a server under test, with py-spy.

``python bench/run.py --profile`` records the chat server while it
admits concurrent handshakes and while it delivers messages at the
profiled rate, and writes, beside the results, the collapsed stacks
(``profile-*.txt``, for flame graph tools) and a summary of where the
time goes (``profile-*.md``): the share of the samples in which each
function is on the stack (inclusive) and on top of it (self).

py-spy must be installed in the same virtualenv (``pip install
py-spy``); it attaches to the running process, which needs ptrace
rights (root, or ``kernel.yama.ptrace_scope=0``).

"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: A frame of py-spy's collapsed output: ``function (file:line)``.
FRAME = re.compile(r'^(?P<function>.*?) \((?P<file>[^()]*?)(:\d+)?\)$')


#: Frames on every stack of their thread, left out of the inclusive
#: table.
PLUMBING = (
    'threading.py:', 'click/', 'asyncio/runners.py:', 'onegov-chat:',
    'chat/cli.py:', 'asyncio/base_events.py:BaseEventLoop.run_',
    'asyncio/base_events.py:BaseEventLoop._run_once',
    'concurrent/futures/thread.py:_worker',
    'concurrent/futures/thread.py:_WorkItem.run',
    'bare_relay.py:<module>',
)


def py_spy() -> str | None:
    script = Path(sys.executable).parent / 'py-spy'
    if script.exists():
        return str(script)
    return shutil.which('py-spy')


class Recording:
    """One py-spy recording, running in the background."""

    def __init__(
        self, pid: int, path: Path, seconds: float, gil: bool = False
    ) -> None:
        executable = py_spy()
        if executable is None:
            raise RuntimeError('py-spy is not installed: pip install py-spy')
        self.path = path
        self.gil = gil
        # With --gil, only the thread holding the GIL is sampled: where
        # the Python CPU time goes. Without, every thread that is not
        # idle: where the wall time goes, blocking calls included.
        self.process = subprocess.Popen(
            [executable, 'record', '--pid', str(pid), '--format', 'raw',
             '--rate', '250', '--duration', str(max(1, round(seconds))),
             '--output', str(path),
             *(['--gil'] if gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def finish(self, top: int = 25) -> str:
        """Wait for the recording; write and return its summary."""
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if not self.path.exists():
            return ''
        summary = summarise(self.path, top, self.gil)
        self.path.with_suffix('.md').write_text(summary, encoding='utf-8')
        return summary


def short(frame: str) -> str:
    """``path/module.py:function`` for a frame, as py-spy names the
    file (``chat/service.py``, ``sqlalchemy/orm/session.py``)."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f'{match.group("file")}:{match.group("function")}'


def package(frame: str) -> str:
    """The package a frame's code belongs to, for the self-time table.

    The standard library's event loop, selectors and thread pool are
    told apart, since those are where thread hops cost.
    """
    path = frame.split(':', 1)[0]
    head = path.split('/', 1)[0] if '/' in path else path
    return {
        'base_events.py': 'asyncio', 'selector_events.py': 'asyncio',
        'events.py': 'asyncio', 'queues.py': 'asyncio',
        'tasks.py': 'asyncio', 'selectors.py': 'selectors (epoll)',
        'threading.py': 'threading', 'concurrent': 'thread pool',
        'chat': 'onegov.chat', 'json': 'json',
    }.get(head, head)


def summarise(path: Path, top: int = 25, gil: bool = False) -> str:
    """The functions with the largest shares of the samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding='utf-8').splitlines():
        stack, _, count = line.rpartition(' ')
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [short(frame) for frame in stack.split(';')]
        frames = [
            frame for frame in frames
            if not frame.startswith(('process ', 'thread '))
        ]
        if not frames:
            continue
        total += samples
        own[frames[-1]] += samples
        packages[package(frames[-1])] += samples
        in_pool = frames[0].startswith('threading.py:')
        threads['worker threads' if in_pool else 'event loop'] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    if not total:
        return f'# {path.stem}\n\nno samples\n'
    lines = [
        f'# {path.stem}', '',
        f'{total} samples of '
        f'{"the thread holding the GIL" if gil else "active threads"}'
        ', at 250 Hz: '
        + ', '.join(
            f'{name} {samples / total:.0%}'
            for name, samples in threads.most_common()
        ) + '.', '',
        '| package (self time) | share |', '|---|---|',
    ]
    for name, samples in packages.most_common(12):
        lines.append(f'| {name} | {samples / total:.1%} |')
    lines += ['', '| function | inclusive | self |', '|---|---|---|']
    shown = [
        (frame, samples) for frame, samples in inclusive.most_common()
        if not frame.startswith(PLUMBING)
    ]
    for frame, samples in shown[:top]:
        lines.append(
            f'| `{frame}` | {samples / total:.1%} '
            f'| {own[frame] / total:.1%} |'
        )
    lines += ['', '| function (self time) | self |', '|---|---|']
    for frame, samples in own.most_common(top):
        lines.append(f'| `{frame}` | {samples / total:.1%} |')
    return '\n'.join(lines) + '\n'
