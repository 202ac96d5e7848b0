"""The ``onegov-chat`` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from onegov.chat.config import Config, ConfigError, load_config


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format='%(asctime)s %(levelname)s %(name)s %(message)s',
    )


def _config(
    ctx: click.Context, data_dir: str | None = None, **overrides: Any
) -> Config:
    try:
        return load_config(ctx.obj['config_path'], data_dir, **overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.option(
    '--config', 'config_path', type=click.Path(dir_okay=False),
    default=None, envvar='ONEGOV_CHAT_CONFIG',
    help='The YAML configuration file (default: embedded defaults).',
)
@click.option(
    '--log-level', default='INFO', show_default=True,
    type=click.Choice(['DEBUG', 'INFO', 'WARNING', 'ERROR']),
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """onegov.chat: secure real-time chat for Morepath applications."""
    ctx.ensure_object(dict)
    ctx.obj['config_path'] = config_path
    setup_logging(log_level)


@cli.command()
@click.option('--host', default=None, help='Overrides websocket_host.')
@click.option(
    '--port', default=None, type=click.IntRange(0, 65535),
    help='Overrides websocket_port (0 picks a free port).',
)
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the websocket server."""
    from onegov.chat.server import run

    config = _config(ctx)
    asyncio.run(run(
        config,
        host if host is not None else config.websocket_host,
        port if port is not None else config.websocket_port,
    ))


@cli.command()
@click.option(
    '--web-port', default=None, type=click.IntRange(0, 65535),
    help='The port of the web app (default: web_port, 8080).',
)
@click.option(
    '--ws-port', default=None, type=click.IntRange(0, 65535),
    help='The port of the websocket server (default: websocket_port, 8765).',
)
@click.option(
    '--data-dir', default=None, type=click.Path(file_okay=False),
    help='Where the SQLite files and the generated secret are kept '
    '(default: data_dir, ./onegov-chat-data).',
)
@click.pass_context
def demo(
    ctx: click.Context,
    web_port: int | None,
    ws_port: int | None,
    data_dir: str | None,
) -> None:
    """Run the demo host app and the websocket server together."""
    from onegov.chat.demo import run_demo

    overrides: dict[str, Any] = {}
    if web_port is not None:
        overrides['web_port'] = web_port
    if ws_port is not None:
        overrides['websocket_port'] = ws_port
    asyncio.run(run_demo(_config(ctx, data_dir=data_dir, **overrides)))


@cli.command('add-user')
@click.argument('username')
@click.option('--name', default=None, help='The name customers see.')
@click.option(
    '--password-stdin', is_flag=True,
    help='Read the password from standard input instead of prompting.',
)
@click.pass_context
def add_user(
    ctx: click.Context,
    username: str,
    name: str | None,
    password_stdin: bool,
) -> None:
    """Create a staff account for the configured tenant."""
    from onegov.chat.collections import UserCollection
    from onegov.chat.database import session_factory
    from onegov.chat.models import Base

    config = _config(ctx)
    if password_stdin:
        password = sys.stdin.readline().rstrip('\n')
    else:
        password = click.prompt(
            'Password', hide_input=True, confirmation_prompt=True
        )

    factory = session_factory(config.dsn)
    Base.metadata.create_all(factory.kw['bind'])
    with factory() as session:
        try:
            UserCollection(session, config.application_id).add(
                username, name or username, password
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        session.commit()
    click.echo(f'Added staff user {username} to {config.application_id}.')


if __name__ == '__main__':  # pragma: no cover
    cli()
