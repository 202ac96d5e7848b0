"""The operator commands, against good and bad configurations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import update
from webtest import TestApp

from conftest import Peer, ServerProcess, add_staff, log_in, start_chat
from onegov.chat.cli import cli
from onegov.chat.models import Chat

GOOD_SECRET = '9f2c4e1a7b3d5f60' * 4


def invoke(config: Path | None, *args: str, **kwargs: Any) -> Any:
    options = ['--config', str(config)] if config else []
    return CliRunner().invoke(cli, [*options, *args], **kwargs)


def write(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / 'check.yml'
    path.write_text(yaml.safe_dump(values), encoding='utf-8')
    return path


@pytest.fixture
def good(tmp_path: Path) -> dict[str, Any]:
    """A production configuration without problems."""
    return {
        'identity_secret': GOOD_SECRET,
        'session_store': f'sqlite:///{tmp_path}/sessions.db',
        'dsn': f'sqlite:///{tmp_path}/chat.db',
        'allowed_origins': ['https://www.govikon.ch'],
        'production': True,
    }


def test_check_config_passes_a_good_configuration(
    tmp_path: Path, good: dict[str, Any]
) -> None:
    """A good configuration exits 0 and says so."""
    result = invoke(write(tmp_path, **good), 'check-config')
    assert result.exit_code == 0, result.output
    assert result.output.endswith('no problems found\n')


@pytest.mark.parametrize(('change', 'line'), [
    ({'identity_secret': None},
     'identity_secret: not set; a secret generated in data_dir would be '
     'used, which other machines do not share'),
    ({'identity_secret': 'short-but-random-Zq8'},
     'identity_secret: too short (20 characters, at least 32 needed)'),
    ({'identity_secret': 'change-me-' + 'a1b2c3d4e5f6g7h8i9j0k'},
     'identity_secret: looks like a placeholder, generate a random one'),
    ({'identity_secret': 'ab' * 20},
     'identity_secret: too little variety to be random'),
    ({'allowed_origins': []},
     'allowed_origins: empty in production; no browser could connect'),
    ({'allowed_origins': ['http://www.govikon.ch']},
     "allowed_origins: 'http://www.govikon.ch' is not https, in "
     'production'),
    ({'allowed_origins': ['https://*.govikon.ch']},
     "allowed_origins: 'https://*.govikon.ch' looks like a wildcard; "
     'origins match exactly'),
    ({'allowed_origin_patterns': ['.*']},
     "allowed_origin_patterns: '.*' admits every origin"),
    ({'session_store': 'redis://127.0.0.1:1/0'},
     'session_store: unreachable'),
    ({'broker': 'redis://127.0.0.1:1/0'}, 'broker: unreachable'),
    ({'dsn': 'postgresql+psycopg://nobody@127.0.0.1:1/chat'},
     'dsn: the database is unreachable'),
    ({'token_ttl': 0}, 'token_ttl must be between 1 and 3600'),
])
def test_check_config_names_each_problem(
    tmp_path: Path, good: dict[str, Any], change: dict[str, Any], line: str
) -> None:
    """Each problem gets its own line, and the exit code is 1."""
    values = {**good, **change}
    values = {key: value for key, value in values.items()
              if value is not None}
    result = invoke(write(tmp_path, **values), 'check-config')
    assert result.exit_code == 1, result.output
    assert line in result.output.splitlines()


def test_check_config_lists_every_problem_at_once(
    tmp_path: Path, good: dict[str, Any]
) -> None:
    """Several problems are reported together, one line each."""
    path = write(tmp_path, **{
        **good, 'allowed_origin_patterns': ['.*'],
        'identity_secret': 'change-me',
    })
    result = invoke(path, 'check-config', '--offline')
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 3


def test_check_config_needs_a_file() -> None:
    """Without --config there is nothing to check: a usage error."""
    result = invoke(None, 'check-config')
    assert result.exit_code == 2
    assert 'check-config needs --config FILE' in result.output


@pytest.mark.parametrize(('origin', 'code', 'line'), [
    ('https://www.govikon.ch', 0, 'admitted: listed in allowed_origins'),
    ('https://www.govikon.ch.evil.org', 1,
     'refused: neither listed nor matched by a pattern'),
    ('null', 1, 'refused: the null origin is refused unless listed'),
    ('https://app.govikon.ch', 0,
     "admitted: matches the whole of pattern "
     "'https://[a-z]+\\\\.govikon\\\\.ch'"),
])
def test_check_origin(
    tmp_path: Path, good: dict[str, Any], origin: str, code: int, line: str
) -> None:
    """check-origin says whether and why the policy admits an origin."""
    path = write(
        tmp_path, **good,
        allowed_origin_patterns=[r'https://[a-z]+\.govikon\.ch'],
    )
    result = invoke(path, 'check-origin', origin)
    assert result.exit_code == code
    assert result.output == f'{line}\n'


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Replicas report their status at every sweep: sweep often."""
    return {**settings, 'liveness_interval': 0.2}


def test_status_shows_connections_by_tenant_and_role(
    chat_server: ServerProcess, town_app: Any, config_file: Path
) -> None:
    """status lists each running replica with its connections by tenant
    and role."""
    add_staff(town_app)
    staff_web = TestApp(town_app)
    log_in(staff_web)

    output = invoke(config_file, 'status').output
    assert f'at 127.0.0.1:{chat_server.port}' in output
    assert '  no connections' in output

    async def connected() -> str:
        staff = await Peer.connect(chat_server, staff_web)
        await staff.expect('hello')
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            output = str(invoke(config_file, 'status').output)
            if 'town/govikon: staff: 1' in output:
                break
            await asyncio.sleep(0.1)
        await staff.close()
        return output

    assert '  town/govikon: staff: 1\n' in asyncio.run(connected())


def test_status_without_replicas(tmp_path: Path, good: dict[str, Any]) -> None:
    """With no replica running, status says so."""
    result = invoke(write(tmp_path, **good), 'status')
    assert result.exit_code == 0
    assert result.output == 'no running replicas\n'


def test_add_user_list_end_and_purge(
    tmp_path: Path, good: dict[str, Any], town_app: Any
) -> None:
    """add-user, list-chats, end-chat and purge do what they say."""
    good['application_id'] = 'town/govikon'
    path = write(tmp_path, **good)

    result = invoke(
        path, 'add-user', 'bob', '--name', 'Bob', '--password-stdin',
        input='a long enough password\n',
    )
    assert result.exit_code == 0, result.output
    assert result.output == 'Added staff user bob to town/govikon.\n'
    again = invoke(
        path, 'add-user', 'bob', '--password-stdin', input='another one!\n'
    )
    assert again.exit_code == 2
    assert "the user 'bob' exists already" in again.output
    short = invoke(path, 'add-user', 'eve', '--password-stdin',
                   input='short\n')
    assert short.exit_code == 2
    assert 'a password needs at least 8 characters' in short.output

    # A chat started through the web app, in the same database.
    town_app.configure_application(**{**good, 'dsn': good['dsn']})
    town_app.set_application_id('town/govikon')
    chat_id = start_chat(TestApp(town_app))

    listed = invoke(path, 'list-chats', '--state', 'waiting')
    assert listed.exit_code == 0
    assert chat_id in listed.output and 'waiting' in listed.output

    ended = invoke(path, 'end-chat', chat_id)
    assert ended.output == f'ended chat {chat_id}\n'
    assert invoke(path, 'end-chat', chat_id).exit_code == 1
    assert invoke(path, 'end-chat', '0' * 32).exit_code == 1
    assert chat_id in invoke(path, 'list-chats', '--state', 'ended').output

    # Not old enough yet; then ended 40 days ago.
    assert invoke(path, 'purge', '--older-than', '30', '--yes').output == (
        'deleted 0 chats\n'
    )
    with town_app.chat_db().get_bind().begin() as connection:
        connection.execute(
            update(Chat).where(Chat.id == chat_id)
            .values(ended=datetime.now(UTC) - timedelta(days=40))
        )
    refused = invoke(path, 'purge', '--older-than', '30', input='n\n')
    assert refused.exit_code == 1
    assert invoke(path, 'purge', '--older-than', '30', '--yes').output == (
        'deleted 1 chats\n'
    )
    assert chat_id not in invoke(path, 'list-chats').output
