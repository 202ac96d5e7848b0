"""The configuration shared by the web app and ``onegov-chat serve``.

One YAML file, given with ``onegov-chat --config FILE``, configures both
sides; without a file the embedded defaults apply: SQLite files and a
generated secret under the data directory, everything on 127.0.0.1.
Every value is checked here, with a `ConfigError` that says which key is
wrong and how to fix it.

"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from onegov.chat.framework import (
    APPLICATION_ID,
    validate_identity_secret,
)
from onegov.chat.security import DEFAULT_TOKEN_TTL, OriginPolicy
from onegov.chat.session import DEFAULT_SESSION_TTL

#: Where the embedded defaults keep their files, unless told otherwise.
DEFAULT_DATA_DIR = 'onegov-chat-data'


class ConfigError(ValueError):
    """Raised when a configuration value is missing or wrong."""


@dataclass(frozen=True)
class Config:
    """Every setting of onegov.chat, with its default."""

    identity_secret: str
    session_store: str
    dsn: str
    broker: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_origin_patterns: tuple[str, ...] = ()
    allow_missing_origin: bool = False
    token_ttl: float = DEFAULT_TOKEN_TTL
    session_ttl: float = DEFAULT_SESSION_TTL
    application_id: str = 'onegov/chat'
    websocket_host: str = '127.0.0.1'
    websocket_port: int = 8765
    websocket_url: str | None = None
    web_host: str = '127.0.0.1'
    web_port: int = 8080
    max_size: int = 64 * 1024
    open_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    compression: bool = False
    max_text_length: int = 4000
    rate_limit: int = 20
    rate_limit_window: float = 10.0
    max_connections_per_session: int = 5
    send_queue_size: int = 256
    liveness_interval: float = 30.0
    shutdown_timeout: float = 10.0
    data_dir: str = DEFAULT_DATA_DIR
    production: bool = False
    metrics: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def origin_policy(self) -> OriginPolicy:
        return OriginPolicy.from_config(
            self.allowed_origins,
            self.allowed_origin_patterns,
            self.allow_missing_origin,
        )

    def app_settings(self) -> dict[str, Any]:
        """The keyword arguments for ``app.configure_application``."""
        settings = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != 'extra'
        }
        settings.update(self.extra)
        return settings


_NUMBERS: dict[str, tuple[type, float, float]] = {
    'token_ttl': (float, 1, 3600),
    'session_ttl': (float, 60, 365 * 24 * 3600),
    'websocket_port': (int, 0, 65535),
    'web_port': (int, 0, 65535),
    'max_size': (int, 1024, 16 * 1024 * 1024),
    'open_timeout': (float, 0.1, 300),
    'ping_interval': (float, 0.1, 3600),
    'ping_timeout': (float, 0.1, 3600),
    'max_text_length': (int, 1, 1_000_000),
    'rate_limit': (int, 1, 100_000),
    'rate_limit_window': (float, 0.1, 3600),
    'max_connections_per_session': (int, 1, 1000),
    'send_queue_size': (int, 1, 100_000),
    'liveness_interval': (float, 0.1, 3600),
    'shutdown_timeout': (float, 0.1, 3600),
}

_STRINGS = (
    'identity_secret', 'session_store', 'dsn', 'broker', 'application_id',
    'websocket_host', 'websocket_url', 'web_host', 'data_dir',
)

_FLAGS = ('allow_missing_origin', 'compression', 'production', 'metrics')

_LISTS = ('allowed_origins', 'allowed_origin_patterns')


def _number(key: str, value: Any) -> float | int:
    kind, low, high = _NUMBERS[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f'{key} must be a number')
    if kind is int and not isinstance(value, int):
        raise ConfigError(f'{key} must be a whole number')
    if not low <= value <= high:
        raise ConfigError(f'{key} must be between {low:g} and {high:g}')
    return kind(value)  # type: ignore[no-any-return]


def load_secret(data_dir: str) -> str:
    """Return the secret kept in `data_dir`, creating it on first use.

    The secret is written to a temporary file first and then linked into
    place, so that two processes starting at once never read a file that
    is not written yet: one link wins, the other reads its secret.

    """
    path = os.path.join(data_dir, 'identity_secret')
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.exists(path):
        fd, temporary = tempfile.mkstemp(dir=data_dir, prefix='.secret-')
        try:
            with os.fdopen(fd, 'w', encoding='ascii') as handle:
                handle.write(secrets.token_hex(32))
            os.chmod(temporary, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)

    with open(path, encoding='ascii') as handle:
        secret = handle.read().strip()
    if not secret:
        raise ConfigError(
            f'{path} is empty; remove it to have a new secret generated'
        )
    return secret


def build_config(
    values: Mapping[str, Any] | None = None,
    data_dir: str | None = None,
) -> Config:
    """Return a `Config` from `values`, filling in the defaults.

    Raises:
        ConfigError: naming the first key that is wrong.

    """
    values = dict(values or {})
    if data_dir is not None:
        values['data_dir'] = data_dir
    if not isinstance(values.get('data_dir', DEFAULT_DATA_DIR), str):
        raise ConfigError('data_dir must be a string')
    directory = values.setdefault('data_dir', DEFAULT_DATA_DIR)

    known = {f.name for f in dataclasses.fields(Config)} - {'extra'}
    extra = {k: v for k, v in values.items() if k not in known}
    settings: dict[str, Any] = {}

    for key in _STRINGS:
        if key in values and values[key] is not None:
            if not isinstance(values[key], str) or not values[key]:
                raise ConfigError(f'{key} must be a non-empty string')
            settings[key] = values[key]
    for key in _NUMBERS:
        if key in values:
            settings[key] = _number(key, values[key])
    for key in _FLAGS:
        if key in values:
            if not isinstance(values[key], bool):
                raise ConfigError(f'{key} must be true or false')
            settings[key] = values[key]
    for key in _LISTS:
        if key in values:
            items = values[key]
            if items is None:
                items = []
            if not isinstance(items, list | tuple) or not all(
                isinstance(item, str) for item in items
            ):
                raise ConfigError(f'{key} must be a list of strings')
            settings[key] = tuple(items)

    settings.setdefault(
        'session_store', f'sqlite:///{directory}/sessions.db'
    )
    settings.setdefault('dsn', f'sqlite:///{directory}/chat.db')
    if 'identity_secret' not in settings:
        settings['identity_secret'] = load_secret(directory)
    if 'allowed_origins' not in settings:
        settings['allowed_origins'] = own_origins(
            settings.get('web_host', Config.web_host),
            settings.get('web_port', Config.web_port),
        )

    config = Config(**settings, extra=extra)
    validate(config)
    return config


def own_origins(host: str, port: int) -> tuple[str, ...]:
    """Return the origins of a web app on `host` and `port`."""
    if port == 0:
        return ()
    hosts = [host]
    if host in ('127.0.0.1', '0.0.0.0', '::', 'localhost'):  # noqa: S104
        hosts = ['127.0.0.1', 'localhost']
    suffix = '' if port == 80 else f':{port}'
    # An IPv6 address is bracketed in an origin (RFC 3986, 3.2.2).
    return tuple(
        f'http://[{name}]{suffix}' if ':' in name
        else f'http://{name}{suffix}'
        for name in hosts
    )


def validate(config: Config) -> None:
    """Raise `ConfigError` if the settings do not fit together."""
    try:
        validate_identity_secret(config.identity_secret)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not APPLICATION_ID.fullmatch(config.application_id):
        raise ConfigError('application_id must look like namespace/name')
    try:
        config.origin_policy  # noqa: B018 (validates)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not config.session_store.startswith(
        ('sqlite:///', 'redis://', 'rediss://', 'unix://', 'memory://')
    ):
        raise ConfigError(
            'session_store must start with sqlite:///, redis:// or rediss://'
        )
    if '://' not in config.dsn:
        raise ConfigError(
            'dsn must be a database URL such as sqlite:///chat.db or '
            'postgresql+psycopg://user@host/db'
        )
    broker = config.broker
    if broker is not None and not broker.startswith(
        ('redis://', 'rediss://', 'unix://')
    ):
        raise ConfigError('broker must be a redis:// URL (or left out)')
    url = config.websocket_url
    if url is not None and not url.startswith(('ws://', 'wss://')):
        raise ConfigError('websocket_url must start with ws:// or wss://')
    if config.ping_timeout > config.ping_interval * 10:
        raise ConfigError('ping_timeout is far longer than ping_interval')


def load_config(
    path: str | None = None,
    data_dir: str | None = None,
    **overrides: Any,
) -> Config:
    """Read the YAML file at `path`, or use the embedded defaults.

    `overrides` (command line options) take precedence over the file.

    Raises:
        ConfigError: if the file cannot be read or holds wrong values.

    """
    if path is None:
        return build_config(overrides, data_dir)
    try:
        with open(path, encoding='utf-8') as handle:
            values = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(
            f'cannot read configuration file {path}: {exc.strerror}'
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f'configuration file {path} is not valid UTF-8'
        ) from None
    except yaml.YAMLError as exc:
        # The parser's message quotes the offending line, which may be
        # the secret itself: name the position only.
        mark = getattr(exc, 'problem_mark', None)
        where = f' (line {mark.line + 1})' if mark is not None else ''
        raise ConfigError(
            f'configuration file {path} is not valid YAML{where}'
        ) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f'configuration file {path} must hold a mapping')
    values.update(overrides)
    return build_config(values, data_dir)
