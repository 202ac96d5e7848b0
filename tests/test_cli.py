"""Tests of the ``onegov-chat`` command line."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import onegov_chat
from onegov.chat.cli import cli
from onegov.chat.session import CookieSigner

SECRET_LINE = 'identity_secret: "s3cret-qqqqqqqqqqqqqqqqqqqqqqqqq\n'


@pytest.fixture(autouse=True)
def isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Run in a temporary folder, and undo the command's logging setup.

    The embedded defaults write to ./onegov-chat-data.

    """
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env or None)


@pytest.mark.parametrize(('args', 'options'), [
    ([], ['--config', '--log-level', 'serve', 'demo']),
    (['serve'], ['--host', '--port']),
    (['demo'], ['--web-port', '--ws-port', '--data-dir']),
])
def test_help_lists_the_options(args: list[str], options: list[str]) -> None:
    """Each command's help lists its documented options."""
    result = invoke(*args, '--help')

    assert result.exit_code == 0
    for option in options:
        assert re.search(rf'(^|\s){option}\b', result.output), option


def assert_usage_error(result: Result, message: str) -> None:
    """Assert exit code 2 and exactly one one-line error saying `message`."""
    assert result.exit_code == 2
    errors = [
        line for line in result.output.splitlines()
        if line.startswith('Error:')
    ]
    assert errors == [f'Error: {message}']
    assert result.output.rstrip('\n').splitlines()[-1] == errors[0]
    assert 'Traceback' not in result.output


@pytest.mark.parametrize('command', ['serve', 'demo'])
@pytest.mark.parametrize(('text', 'message'), [
    (SECRET_LINE, 'configuration file {path} is not valid YAML (line 2)'),
    ('- a list\n', 'configuration file {path} must hold a mapping'),
    ('token_ttl: 0\n', 'token_ttl must be between 1 and 3600'),
])
def test_bad_config_is_a_usage_error(
    tmp_path: Path, command: str, text: str, message: str
) -> None:
    """A bad configuration file stops the command with a one-line error."""
    path = tmp_path / 'chat.yml'
    path.write_text(text, encoding='utf-8')

    result = invoke('--config', str(path), command)

    assert_usage_error(result, message.format(path=path))
    assert 's3cret' not in result.output


def test_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    """A configuration file that is not there is a usage error."""
    path = tmp_path / 'missing.yml'

    result = invoke('--config', str(path), 'serve')

    assert_usage_error(
        result,
        f'cannot read configuration file {path}: No such file or directory',
    )


def test_config_from_the_environment(tmp_path: Path) -> None:
    """ONEGOV_CHAT_CONFIG names the file when --config is not given."""
    path = tmp_path / 'chat.yml'
    path.write_text('- a list\n', encoding='utf-8')

    result = invoke('serve', ONEGOV_CHAT_CONFIG=str(path))

    assert_usage_error(
        result, f'configuration file {path} must hold a mapping'
    )


@pytest.mark.parametrize('args', [
    ['serve', '--port', '65536'],
    ['demo', '--web-port', '-1'],
    ['--log-level', 'LOUD', 'serve'],
])
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    """Options out of range are refused before anything starts."""
    assert invoke(*args).exit_code == 2


# The demo, for real --------------------------------------------------


def fetch(url: str) -> tuple[int, Message, bytes]:
    """GET `url` from the demo; return the status, headers and body."""
    assert url.startswith('http://127.0.0.1:')
    # The URL is the loopback one the demo printed, never a file: URL.
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return response.status, response.headers, response.read()


class Lines:
    """The lines a process writes to stdout, read in a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(
            target=self._read, args=(process,), daemon=True
        )
        self.thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Return the first match of `pattern` in a line, waiting for it."""
        deadline = time.monotonic() + timeout
        expression = re.compile(pattern)
        for line in self.seen:
            if match := expression.search(line):
                return match
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := expression.search(line):
                return match
        raise AssertionError(
            f'no line matches {pattern!r}:\n{"".join(self.seen)}'
        )

    def rest(self, process: subprocess.Popen[str]) -> str:
        """Return every line, once the process has ended."""
        self.thread.join(timeout=15)
        assert process.stdout is not None
        process.stdout.close()
        while not self.queue.empty():
            line = self.queue.get()
            if line is not None:
                self.seen.append(line)
        return ''.join(self.seen)


def test_demo_serves_and_stops(tmp_path: Path) -> None:
    """The demo serves its page and tokens, and stops cleanly on SIGINT."""
    data_dir = tmp_path / 'data'
    log_path = tmp_path / 'demo.log'
    env = {k: v for k, v in os.environ.items() if k != 'ONEGOV_CHAT_CONFIG'}
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(
            [onegov_chat(), 'demo', '--web-port', '0', '--ws-port', '0',
             '--data-dir', str(data_dir)],
            stdout=subprocess.PIPE, stderr=log, cwd=tmp_path, env=env,
            text=True,
        )

    lines = Lines(process)
    try:
        web = lines.wait_for(r'(http://127\.0\.0\.1:\d+)/').group(1)
        ws = lines.wait_for(r'(ws://127\.0\.0\.1:\d+/chats)').group(1)

        status, headers, _ = fetch(f'{web}/')
        assert status == 200
        assert 'text/html' in headers['Content-Type']
        assert ws.rsplit('/', 1)[0] in headers['Content-Security-Policy']

        status, headers, body = fetch(f'{web}/chat/token')
        assert status == 200
        assert headers['Cache-Control'] == 'no-store'
        cookie = headers['Set-Cookie']
        answer = json.loads(body)

        token = answer['token']
        assert answer['url'] == f'{ws}?token={token}&schema=onegov-chat'

        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = lines.rest(process)

    log_text = log_path.read_text(encoding='utf-8')
    assert process.returncode == 0, output + log_text
    assert 'stopped' in output.strip().splitlines()[-1]
    assert 'Traceback' not in log_text
    assert token not in output + log_text

    # The cookie was signed with the secret generated in the data dir.
    secret = (data_dir / 'identity_secret').read_text(encoding='ascii')
    value = cookie.split(';', 1)[0].split('=', 1)[1]
    assert CookieSigner(secret, 'onegov/chat').unsign(value)
