"""The processes a benchmark runs against, and what /proc says of them.

Redis and PostgreSQL are started as the test suite starts them: on a
free loopback port, PostgreSQL as its own user when we are root, with a
data folder outside any private temporary folder. The servers under
test run as subprocesses whose CPU time and memory are read from /proc,
never from inside.

"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onegov.chat.testing import (
    PostgresServer,
    RedisServer,
    free_port,
    onegov_chat_script,
    postgres_bindir,
)

BENCH = Path(__file__).resolve().parent

_TICKS = os.sysconf('SC_CLK_TCK')


# /proc ---------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of process `pid` (all its threads), in seconds."""
    with open(f'/proc/{pid}/stat', encoding='ascii') as handle:
        fields = handle.read().rsplit(')', 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    return sum(cpu_times(pid))


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB."""
    with open(f'/proc/{pid}/status', encoding='ascii') as handle:
        for line in handle:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise RuntimeError(f'no VmRSS for {pid}')


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', encoding='ascii') as handle:
                fields = handle.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def total_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def machine() -> dict[str, Any]:
    """The machine: cores, CPU model, memory, kernel."""
    model = 'unknown'
    with contextlib.suppress(OSError), open(
        '/proc/cpuinfo', encoding='utf-8'
    ) as handle:
        for line in handle:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError), open(
        '/proc/meminfo', encoding='ascii'
    ) as handle:
        for line in handle:
            if line.startswith('MemTotal:'):
                memory = int(line.split()[1])
                break
    return {
        'nproc': os.cpu_count(),
        'cpu_model': model,
        'memory_gib': round(memory / 1024 / 1024, 1),
        'kernel': os.uname().release,
    }


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# Servers under test --------------------------------------------------------


@dataclass
class ServerProcess:
    """A server under test, with the port it reported."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding='utf-8', errors='replace')

    def wait_ready(self, timeout: float = 30.0) -> None:
        expression = re.compile(r'event=server_ready .*port=(\d+)')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = expression.search(self.log())
            if match:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f'{self.name} did not start:\n{self.log()}')

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_process(
    name: str, command: list[str], log_path: Path
) -> ServerProcess:
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(name, process, log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def start_chat(config_path: Path, log_path: Path) -> ServerProcess:
    return start_process('chat', [
        onegov_chat_script(), '--config', str(config_path), 'serve',
        '--host', '127.0.0.1', '--port', '0',
    ], log_path)


def start_bare(log_path: Path) -> ServerProcess:
    return start_process('bare', [
        sys.executable, str(BENCH / 'bare_relay.py'),
        '--host', '127.0.0.1', '--port', '0',
    ], log_path)


# Backends ------------------------------------------------------------------


class Redis(RedisServer):
    """A redis-server of our own on a free loopback port, started."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which('redis-server')
        if executable is None:
            raise RuntimeError('redis-server is not installed')
        super().__init__(executable, free_port(), directory)
        self.start()

    def version(self) -> str:
        output = subprocess.run(
            [self.executable, '--version'], capture_output=True,
            text=True, check=False,
        ).stdout
        match = re.search(r'v=(\S+)', output)
        return match.group(1) if match else output.strip()

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            client.flushdb()
        finally:
            client.close()

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []


class Postgres:
    """A PostgreSQL server of our own on a free loopback port."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError('the PostgreSQL server is not installed')
        self.stack = contextlib.ExitStack()
        # Commits wait for the OS, not the disk: what SQLite's WAL mode
        # with synchronous=NORMAL does, so the two compare.
        self.server = self.stack.enter_context(PostgresServer.running(
            bindir, options='-c synchronous_commit=off'
        ))
        self.bindir = bindir
        self.datadir = self.server.datadir
        self.port = self.server.port

    def version(self) -> str:
        output = subprocess.run(
            [str(self.bindir / 'postgres'), '--version'],
            capture_output=True, text=True, check=False,
        ).stdout
        match = re.search(r'\(PostgreSQL\) (\S+)', output)
        return match.group(1) if match else 'unknown'

    def create_database(self, name: str) -> str:
        return self.server.create_database(name)

    def pids(self) -> list[int]:
        """The postmaster and its backends."""
        try:
            text = (self.datadir / 'postmaster.pid').read_text()
        except OSError:
            return []
        postmaster = int(text.split()[0])
        return [postmaster, *children_of(postmaster)]

    def stop(self) -> None:
        self.stack.close()
