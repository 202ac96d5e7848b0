"""Tests of onegov.chat.config: defaults, the YAML file and its errors."""

from __future__ import annotations

import re
import stat
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml

from onegov.chat.config import (
    Config,
    ConfigError,
    build_config,
    load_config,
    load_secret,
    own_origins,
)

SECRET = 'test-secret-' + 'x' * 40


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / 'data'


def write_yaml(path: Path, values: Any) -> Path:
    path.write_text(yaml.safe_dump(values), encoding='utf-8')
    return path


# Defaults ------------------------------------------------------------


def test_defaults(data_dir: Path) -> None:
    """Without a file, SQLite files and a secret under data_dir are used."""
    config = load_config(data_dir=str(data_dir))

    assert config.data_dir == str(data_dir)
    assert config.session_store == f'sqlite:///{data_dir}/sessions.db'
    assert config.dsn == f'sqlite:///{data_dir}/chat.db'
    assert config.application_id == 'onegov/chat'
    assert config.websocket_host == config.web_host == '127.0.0.1'
    assert (config.websocket_port, config.web_port) == (8765, 8080)
    assert config.websocket_url is None
    assert config.token_ttl == 60.0
    assert config.allow_missing_origin is False
    assert config.production is False
    assert config.extra == {}


def test_default_data_dir_is_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default data directory is onegov-chat-data in the cwd."""
    monkeypatch.chdir(tmp_path)

    config = load_config()

    assert config.data_dir == 'onegov-chat-data'
    assert config.session_store == 'sqlite:///onegov-chat-data/sessions.db'
    assert (tmp_path / 'onegov-chat-data' / 'identity_secret').is_file()


def test_generated_secret(data_dir: Path) -> None:
    """A secret is generated in data_dir, private, and kept for next time."""
    first = load_config(data_dir=str(data_dir))
    path = data_dir / 'identity_secret'

    assert re.fullmatch(r'[0-9a-f]{64}', first.identity_secret)
    assert path.read_text(encoding='ascii') == first.identity_secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    second = load_config(data_dir=str(data_dir))

    assert second.identity_secret == first.identity_secret
    assert load_secret(str(data_dir)) == first.identity_secret


def test_secrets_differ_by_data_dir(tmp_path: Path) -> None:
    """Each data directory gets a secret of its own."""
    one = load_config(data_dir=str(tmp_path / 'one'))
    two = load_config(data_dir=str(tmp_path / 'two'))

    assert one.identity_secret != two.identity_secret


def test_kept_secret_is_used(data_dir: Path) -> None:
    """A secret already in data_dir is read, not replaced."""
    data_dir.mkdir()
    (data_dir / 'identity_secret').write_text(SECRET + '\n')

    assert load_config(data_dir=str(data_dir)).identity_secret == SECRET


def test_configured_secret_writes_no_file(data_dir: Path) -> None:
    """A configured secret is used and none is generated."""
    config = load_config(data_dir=str(data_dir), identity_secret=SECRET)

    assert config.identity_secret == SECRET
    assert not (data_dir / 'identity_secret').exists()


def test_default_origins_are_the_web_apps(data_dir: Path) -> None:
    """By default the web app's own origins may connect, and no other."""
    config = load_config(data_dir=str(data_dir))

    assert config.allowed_origins == (
        'http://127.0.0.1:8080', 'http://localhost:8080'
    )
    policy = config.origin_policy
    policy.check('http://localhost:8080')
    policy.check('http://127.0.0.1:8080')
    assert not policy.explain('http://localhost:8081')[0]
    assert not policy.explain(None)[0]


def test_default_origins_follow_web_host_and_port(data_dir: Path) -> None:
    """The default origins use the configured web host and port."""
    config = load_config(
        data_dir=str(data_dir), web_host='town.test', web_port=80
    )

    assert config.allowed_origins == ('http://town.test',)


@pytest.mark.parametrize(('host', 'port', 'origins'), [
    ('127.0.0.1', 8080, ('http://127.0.0.1:8080', 'http://localhost:8080')),
    ('0.0.0.0', 80, ('http://127.0.0.1', 'http://localhost')),  # noqa: S104
    ('::', 8080, ('http://127.0.0.1:8080', 'http://localhost:8080')),
    ('localhost', 8080, ('http://127.0.0.1:8080', 'http://localhost:8080')),
    ('town.test', 8080, ('http://town.test:8080',)),
    ('::1', 8080, ('http://[::1]:8080',)),
    ('town.test', 0, ()),
])
def test_own_origins(host: str, port: int, origins: tuple[str, ...]) -> None:
    """The origins of a web app are written as browsers send them."""
    assert own_origins(host, port) == origins


def test_ipv6_web_host_is_valid(data_dir: Path) -> None:
    """An IPv6 web host gives a valid, bracketed default origin."""
    config = load_config(data_dir=str(data_dir), web_host='::1')

    assert config.allowed_origins == ('http://[::1]:8080',)


def test_explicit_empty_origins_stay_empty(data_dir: Path) -> None:
    """An explicitly empty allowlist is not filled with defaults."""
    for empty in ([], None):
        config = build_config({'allowed_origins': empty}, str(data_dir))
        assert config.allowed_origins == ()


# The YAML file -------------------------------------------------------


def test_load_yaml(tmp_path: Path, data_dir: Path) -> None:
    """The file's values are used, unknown keys are kept as extra."""
    path = write_yaml(tmp_path / 'chat.yml', {
        'identity_secret': SECRET,
        'session_store': 'redis://127.0.0.1:6379/0',
        'dsn': 'postgresql+psycopg://chat@db/chat',
        'allowed_origins': ['https://town.test'],
        'allowed_origin_patterns': [r'https://[a-z]+\.town\.test'],
        'token_ttl': 30,
        'websocket_port': 9000,
        'websocket_url': 'wss://chat.town.test/chats',
        'application_id': 'town/govikon',
        'compression': True,
        'town_name': 'Govikon',
    })

    config = load_config(str(path), data_dir=str(data_dir))

    assert config.identity_secret == SECRET
    assert config.session_store == 'redis://127.0.0.1:6379/0'
    assert config.dsn == 'postgresql+psycopg://chat@db/chat'
    assert config.allowed_origins == ('https://town.test',)
    assert config.token_ttl == 30.0
    assert isinstance(config.token_ttl, float)
    assert config.websocket_port == 9000
    assert config.websocket_url == 'wss://chat.town.test/chats'
    assert config.application_id == 'town/govikon'
    assert config.compression is True
    assert config.extra == {'town_name': 'Govikon'}
    assert config.origin_policy.explain('https://www.town.test')[0]
    assert not (data_dir / 'identity_secret').exists()


def test_app_settings(data_dir: Path) -> None:
    """The app settings hold every setting and the extra keys, flat."""
    config = build_config(
        {'identity_secret': SECRET, 'town_name': 'Govikon'}, str(data_dir)
    )

    settings = config.app_settings()

    assert settings['identity_secret'] == SECRET
    assert settings['town_name'] == 'Govikon'
    assert 'extra' not in settings
    assert set(settings) >= {'session_store', 'dsn', 'token_ttl'}


def test_empty_yaml_file_means_defaults(
    tmp_path: Path, data_dir: Path
) -> None:
    """An empty file is the embedded defaults."""
    path = tmp_path / 'chat.yml'
    path.write_text('# nothing configured yet\n', encoding='utf-8')

    config = load_config(str(path), data_dir=str(data_dir))

    assert config == load_config(data_dir=str(data_dir))


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    """Command line overrides and data_dir take precedence over the file."""
    path = write_yaml(tmp_path / 'chat.yml', {
        'identity_secret': SECRET,
        'web_port': 8000,
        'websocket_port': 9000,
        'data_dir': str(tmp_path / 'from-file'),
    })

    config = load_config(
        str(path), data_dir=str(tmp_path / 'given'), web_port=0,
        websocket_port=9001,
    )

    assert (config.web_port, config.websocket_port) == (0, 9001)
    assert config.data_dir == str(tmp_path / 'given')
    assert config.dsn == f'sqlite:///{tmp_path}/given/chat.db'


def test_config_is_frozen(data_dir: Path) -> None:
    """A configuration cannot be changed once built."""
    config = load_config(data_dir=str(data_dir))

    with pytest.raises(AttributeError):
        config.token_ttl = 1  # type: ignore[misc]
    assert isinstance(config, Config)


# Errors --------------------------------------------------------------


@pytest.mark.parametrize(('values', 'message'), [
    ({'token_ttl': 'soon'}, 'token_ttl must be a number'),
    ({'token_ttl': True}, 'token_ttl must be a number'),
    ({'token_ttl': None}, 'token_ttl must be a number'),
    ({'token_ttl': [60]}, 'token_ttl must be a number'),
    ({'websocket_port': 8080.5}, 'websocket_port must be a whole number'),
    ({'websocket_port': '8080'}, 'websocket_port must be a number'),
    ({'compression': 'yes'}, 'compression must be true or false'),
    ({'production': 1}, 'production must be true or false'),
    ({'allow_missing_origin': 'no'}, 'allow_missing_origin must be true'),
    ({'allowed_origins': 'http://town.test'}, 'must be a list of strings'),
    ({'allowed_origins': [1]}, 'allowed_origins must be a list of strings'),
    ({'allowed_origin_patterns': {'a': 1}}, 'must be a list of strings'),
    ({'identity_secret': 1234}, 'identity_secret must be a non-empty'),
    ({'identity_secret': ''}, 'identity_secret must be a non-empty'),
    ({'session_store': ['x']}, 'session_store must be a non-empty string'),
    ({'dsn': ''}, 'dsn must be a non-empty string'),
    ({'websocket_host': 80}, 'websocket_host must be a non-empty string'),
])
def test_wrong_types(
    data_dir: Path, values: dict[str, Any], message: str
) -> None:
    """A value of the wrong type names its key."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(values, str(data_dir))


def test_data_dir_must_be_a_string() -> None:
    """A data_dir that is no string is refused before anything is written."""
    with pytest.raises(ConfigError, match='data_dir must be a string'):
        build_config({'data_dir': 5})


@pytest.mark.parametrize(('values', 'message'), [
    ({'token_ttl': 0}, 'token_ttl must be between 1 and 3600'),
    ({'token_ttl': 3601}, 'token_ttl must be between 1 and 3600'),
    ({'session_ttl': 59}, 'session_ttl must be between 60 and'),
    ({'websocket_port': -1}, 'websocket_port must be between 0 and 65535'),
    ({'web_port': 65536}, 'web_port must be between 0 and 65535'),
    ({'max_size': 1023}, 'max_size must be between 1024 and'),
    ({'open_timeout': float('nan')}, 'open_timeout must be between'),
    ({'ping_interval': float('inf')}, 'ping_interval must be between'),
    ({'max_text_length': 0}, 'max_text_length must be between'),
    ({'rate_limit': 100_001}, 'rate_limit must be between'),
    ({'max_connections_per_session': 0}, 'must be between 1 and 1000'),
    ({'ping_interval': 1, 'ping_timeout': 11}, 'ping_timeout is far'),
])
def test_out_of_range(
    data_dir: Path, values: dict[str, Any], message: str
) -> None:
    """A number out of its range names the key and the range."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(values, str(data_dir))


def test_short_secret(data_dir: Path) -> None:
    """A short secret is refused without being quoted."""
    secret = 'short-s3cret-' + 'z' * 18

    with pytest.raises(ConfigError, match='at least 32 characters') as info:
        build_config({'identity_secret': secret}, str(data_dir))
    assert secret not in str(info.value)


@pytest.mark.parametrize(('values', 'message'), [
    ({'allowed_origins': ['http://town.test/']}, 'must not have a path'),
    ({'allowed_origins': ['*']}, 'looks like a wildcard'),
    ({'allowed_origins': ['HTTP://town.test']}, 'must be lower case'),
    ({'allowed_origins': ['https://town.test:443']}, 'default port'),
    ({'allowed_origin_patterns': ['(']}, 'is invalid'),
    ({'allowed_origin_patterns': ['']}, 'non-empty string'),
    ({'application_id': 'chat'}, 'application_id must look like'),
    ({'application_id': 'Town/Govikon'}, 'application_id must look like'),
    ({'application_id': 'town/govikon/x'}, 'application_id must look like'),
    ({'websocket_url': 'http://chat.town.test'}, 'websocket_url must start'),
])
def test_bad_values(
    data_dir: Path, values: dict[str, Any], message: str
) -> None:
    """Bad origins, patterns, ids and URLs are refused with the fix."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(values, str(data_dir))


def test_config_error_is_a_value_error() -> None:
    """Configuration errors are ValueErrors, never assertions."""
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize('text', [
    '- a list\n- of things\n',
    'just some text\n',
    '42\n',
])
def test_yaml_must_hold_a_mapping(
    tmp_path: Path, data_dir: Path, text: str
) -> None:
    """A file that holds no mapping is refused."""
    path = tmp_path / 'chat.yml'
    path.write_text(text, encoding='utf-8')

    with pytest.raises(ConfigError, match='must hold a mapping'):
        load_config(str(path), data_dir=str(data_dir))


def test_wrong_values_in_the_file(tmp_path: Path, data_dir: Path) -> None:
    """Wrong values in the file are refused like wrong arguments."""
    path = write_yaml(tmp_path / 'chat.yml', {'token_ttl': 0})

    with pytest.raises(ConfigError, match='token_ttl must be between'):
        load_config(str(path), data_dir=str(data_dir))


def test_invalid_yaml_does_not_quote_the_secret(
    tmp_path: Path, data_dir: Path
) -> None:
    """The error for broken YAML gives the line, never the line's text."""
    secret = 's3cret-' + 'q' * 25
    path = tmp_path / 'chat.yml'
    path.write_text(
        f'web_port: 8080\nidentity_secret: "{secret}\n', encoding='utf-8'
    )
    with pytest.raises(yaml.YAMLError) as parsed:
        yaml.safe_load(path.read_text(encoding='utf-8'))
    assert secret in str(parsed.value)

    with pytest.raises(ConfigError) as info:
        load_config(str(path), data_dir=str(data_dir))

    assert str(info.value) == (
        f'configuration file {path} is not valid YAML (line 3)'
    )
    assert secret not in ''.join(traceback.format_exception(info.value))


def test_invalid_utf8(tmp_path: Path, data_dir: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a crash."""
    path = tmp_path / 'chat.yml'
    path.write_bytes('# Gr\u00fc\u00dfe\nweb_port: 8080\n'.encode('latin-1'))

    with pytest.raises(ConfigError, match='is not valid UTF-8'):
        load_config(str(path), data_dir=str(data_dir))


@pytest.mark.parametrize('name', ['missing.yml', '.'])
def test_unreadable_file(tmp_path: Path, data_dir: Path, name: str) -> None:
    """A missing file or a directory cannot be read."""
    path = tmp_path / name

    with pytest.raises(ConfigError, match='cannot read configuration file'):
        load_config(str(path), data_dir=str(data_dir))
