"""``onegov-chat demo``: its staff account, its front page, its options."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from webtest import TestApp

from onegov.chat.cli import cli
from onegov.chat.collections import UserCollection
from onegov.chat.config import Config, ConfigError, build_config
from onegov.chat.database import session_factory
from onegov.chat.demo import create_demo_app, ensure_demo_account


def check_login(config: Config, username: str, password: str) -> bool:
    factory = session_factory(config.dsn)
    try:
        with factory() as session:
            user = UserCollection(
                session, config.application_id
            ).by_username(username)
            return user is not None and user.check_password(password)
    finally:
        factory.kw['bind'].dispose()


def test_demo_account_is_made_once_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first start creates `staff` with a generated password in a
    file only its owner may read; later starts use the same one."""
    caplog.set_level(logging.INFO, 'onegov.chat.demo')
    config = build_config(data_dir=str(tmp_path))

    first = ensure_demo_account(config)
    assert caplog.messages == ['event=demo_account_created user=staff']
    assert first.password not in caplog.text
    path = tmp_path / 'staff-password'
    assert first.created
    assert first.username == 'staff'
    assert first.path == str(path)
    assert len(first.password) >= 16
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding='ascii').strip() == first.password
    assert check_login(config, 'staff', first.password)

    caplog.clear()
    second = ensure_demo_account(config)
    assert caplog.messages == []
    assert not second.created
    assert second.password == first.password
    assert check_login(config, 'staff', first.password)


def test_demo_account_follows_its_password_file(tmp_path: Path) -> None:
    """If the password file was deleted, the next start makes a new
    password and gives it to the existing account."""
    config = build_config(data_dir=str(tmp_path))
    old = ensure_demo_account(config).password
    (tmp_path / 'staff-password').unlink()

    new = ensure_demo_account(config)
    assert not new.created
    assert new.password != old
    assert check_login(config, 'staff', new.password)
    assert not check_login(config, 'staff', old)


def test_demo_account_refuses_an_empty_password_file(
    tmp_path: Path
) -> None:
    """An empty password file is an error that says how to fix it."""
    config = build_config(data_dir=str(tmp_path))
    (tmp_path / 'staff-password').write_text('\n', encoding='ascii')

    with pytest.raises(ConfigError, match='delete it'):
        ensure_demo_account(config)


def test_demo_front_page_links_both_sides(tmp_path: Path) -> None:
    """The front page leads customers to /chat and staff to the login."""
    app = create_demo_app(build_config(data_dir=str(tmp_path)), 8765)
    try:
        page = TestApp(app).get('/')
    finally:
        app.dispose()

    assert 'href="/chat"' in page.text
    assert 'href="/chat/login"' in page.text
    assert '<script' not in page.text
    assert "default-src 'self'" in page.headers['Content-Security-Policy']


def test_demo_without_server_needs_its_port(tmp_path: Path) -> None:
    """``--no-ws`` with a port left to chance is refused: the pages would
    not know where to connect."""
    result = CliRunner().invoke(cli, [
        'demo', '--no-ws', '--ws-port', '0', '--data-dir', str(tmp_path),
    ])
    assert result.exit_code == 2
    assert 'give --ws-port' in result.output
