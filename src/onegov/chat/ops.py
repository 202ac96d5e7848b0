"""What the operator commands check, as plain functions.

`config_problems` reads a configuration the way ``check-config`` does:
it reports every problem at once, one line each, instead of stopping at
the first like `onegov.chat.config.build_config`.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onegov.chat.config import Config, ConfigError, build_config

#: Secrets that appear in examples and must never reach production.
PLACEHOLDER_SECRETS = frozenset({
    'change-me', 'changeme', 'secret', 'identity-secret', 'not-a-secret',
    'test', 'development', 'insecure',
})

#: Fewer distinct characters than this is no random secret.
MIN_DISTINCT_CHARACTERS = 12


def secret_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems with ``identity_secret`` as written in the file."""
    secret = values.get('identity_secret')
    if secret is None:
        return [
            'identity_secret: not set; a secret generated in data_dir would '
            'be used, which other machines do not share'
        ]
    if not isinstance(secret, str):
        return ['identity_secret: must be a string']
    problems = []
    folded = secret.lower()
    if any(word in folded for word in PLACEHOLDER_SECRETS):
        problems.append(
            'identity_secret: looks like a placeholder, generate a random '
            'one'
        )
    if len(secret) < 32:
        problems.append(
            f'identity_secret: too short ({len(secret)} characters, at '
            f'least 32 needed)'
        )
    elif len(set(secret)) < MIN_DISTINCT_CHARACTERS:
        problems.append('identity_secret: too little variety to be random')
    return problems


def origin_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems with the allowed origins as written in the file."""
    problems = []
    origins = values.get('allowed_origins')
    patterns = values.get('allowed_origin_patterns') or []
    production = values.get('production') is True

    if isinstance(origins, list | tuple):
        for origin in origins:
            if isinstance(origin, str) and '*' in origin:
                problems.append(
                    f'allowed_origins: {origin!r} looks like a wildcard; '
                    f'origins match exactly'
                )
            if production and isinstance(origin, str) and (
                origin.startswith('http://')
            ):
                problems.append(
                    f'allowed_origins: {origin!r} is not https, in '
                    f'production'
                )
    if production and not origins and not patterns:
        problems.append(
            'allowed_origins: empty in production; no browser could connect'
        )
    if isinstance(patterns, list | tuple):
        for pattern in patterns:
            if isinstance(pattern, str) and pattern in ('.*', '.+', '*'):
                problems.append(
                    f'allowed_origin_patterns: {pattern!r} admits every '
                    f'origin'
                )
    return problems


def reachability_problems(config: Config) -> list[str]:
    """Problems reaching the session store, the broker and the database."""
    import asyncio

    from sqlalchemy import text

    from onegov.chat.broker import BrokerUnavailable, broker_from_url
    from onegov.chat.database import create_database_engine
    from onegov.chat.session import SessionStoreError, store_from_url

    problems = []
    try:
        store = store_from_url(config.session_store, config.session_ttl)
        try:
            store.ping()
        finally:
            store.close()
    except (SessionStoreError, OSError):
        problems.append('session_store: unreachable')

    if config.broker is not None:
        broker = broker_from_url(config.broker)

        async def ping() -> None:
            try:
                await broker.ping()
            finally:
                await broker.stop()

        try:
            asyncio.run(ping())
        except BrokerUnavailable:
            problems.append('broker: unreachable')

    try:
        engine = create_database_engine(config.dsn)
        try:
            with engine.connect() as connection:
                connection.execute(text('SELECT 1'))
        finally:
            engine.dispose()
    except Exception:
        problems.append('dsn: the database is unreachable')
    return problems


def unknown_key_problems(values: Mapping[str, Any]) -> list[str]:
    """Keys that look like a misspelt setting of onegov.chat.

    Other unknown keys are left alone: they are the host application's
    own settings, passed on to its ``configure_*`` hooks.

    """
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(Config) if f.name != 'extra']
    problems = []
    for key in values:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            problems.append(
                f'{key}: unknown setting, did you mean {close[0]}?'
            )
    return problems


def config_problems(
    values: Mapping[str, Any], data_dir: str | None = None
) -> list[str]:
    """Every problem of a configuration, one line each; empty if none."""
    problems = (
        secret_problems(values) + origin_problems(values)
        + unknown_key_problems(values)
    )

    # What was reported above is left out of the strict check below,
    # which stops at its first error.
    checked = dict(values)
    checked['identity_secret'] = 'x' * 64
    for key in ('allowed_origins', 'allowed_origin_patterns'):
        if isinstance(checked.get(key), list | tuple):
            checked[key] = [
                item for item in checked[key]
                if not (isinstance(item, str) and '*' in item)
                and item not in ('.*', '.+')
            ]
    try:
        config = build_config(checked, data_dir)
    except ConfigError as exc:
        return [*problems, str(exc)]

    return problems + reachability_problems(config)
