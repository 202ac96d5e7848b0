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
    if level != 'DEBUG':
        # The library's own INFO lines ("connection open", "connection
        # rejected") say again what our event lines say, with less, at a
        # cost on every handshake; at DEBUG they are all there.
        logging.getLogger('websockets').setLevel(logging.WARNING)


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
    help='Where the SQLite files, the generated secret and the staff '
    'password are kept (default: data_dir, ./onegov-chat-data).',
)
@click.option(
    '--no-ws', 'no_ws', is_flag=True,
    help='Serve the web app only; its pages connect to --ws-port, where '
    'you run the websocket server as a process of its own (see below).',
)
@click.pass_context
def demo(
    ctx: click.Context,
    web_port: int | None,
    ws_port: int | None,
    data_dir: str | None,
    no_ws: bool,
) -> None:
    """Run the demo: the host app and the websocket server together.

    On its first start the demo creates the staff account `staff` with a
    generated password, kept in the file `staff-password` in the data
    directory (readable by its owner only) and used again on every later
    start. It prints that login and the pages to open: customers start
    a chat at /chat, staff log in at /chat/login. Ctrl-C stops both
    servers.

    To see the pages reconnect, run the websocket server apart with
    --no-ws, and stop and start it while the pages stay open. Give both
    processes one configuration file that sets data_dir and web_port, so
    that they share the database, the sessions and the secret, and the
    server admits the pages' origin:

    \b
        onegov-chat --config demo.yml demo --no-ws --ws-port 8765
        onegov-chat --config demo.yml serve --port 8765

    The browser tests run the demo like this.
    """
    from onegov.chat.demo import run_demo

    overrides: dict[str, Any] = {}
    if web_port is not None:
        overrides['web_port'] = web_port
    if ws_port is not None:
        overrides['websocket_port'] = ws_port
    config = _config(ctx, data_dir=data_dir, **overrides)
    try:
        asyncio.run(run_demo(config, websocket_server=not no_ws))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


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

    config = _config(ctx)
    if password_stdin:
        password = sys.stdin.readline().rstrip('\n')
    else:
        password = click.prompt(
            'Password', hide_input=True, confirmation_prompt=True
        )

    with _database(config)() as session:
        try:
            UserCollection(session, config.application_id).add(
                username, name or username, password
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        session.commit()
    click.echo(f'Added staff user {username} to {config.application_id}.')


def _database(config: Config) -> Any:
    from onegov.chat.database import create_tables, session_factory

    factory = session_factory(config.dsn)
    create_tables(factory.kw['bind'])
    return factory


@cli.command('check-config')
@click.option(
    '--offline', is_flag=True,
    help='Do not try to reach the store, the broker and the database.',
)
@click.pass_context
def check_config(ctx: click.Context, offline: bool) -> None:
    """Check a configuration file; one line per problem, exit 1 if any."""
    import yaml

    from onegov.chat.ops import (
        config_problems,
        origin_problems,
        secret_problems,
        unknown_key_problems,
    )

    path = ctx.obj['config_path']
    if path is None:
        raise click.UsageError('check-config needs --config FILE')
    try:
        with open(path, encoding='utf-8') as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise click.UsageError(
            f'cannot read {path}: {exc.strerror}'
        ) from None
    except yaml.YAMLError:
        raise click.UsageError(f'{path} is not valid YAML') from None
    if not isinstance(values, dict):
        raise click.UsageError(f'{path} must hold a mapping')

    if offline:
        problems = (
            secret_problems(values) + origin_problems(values)
            + unknown_key_problems(values)
        )
    else:
        problems = config_problems(values)
    for problem in problems:
        click.echo(problem)
    if problems:
        ctx.exit(1)
    click.echo(f'{path}: no problems found')


@cli.command('check-origin')
@click.argument('origin')
@click.pass_context
def check_origin(ctx: click.Context, origin: str) -> None:
    """Say whether the configured policy admits ORIGIN, and why."""
    config = _config(ctx)
    admitted, reason = config.origin_policy.explain(origin)
    click.echo(f'{"admitted" if admitted else "refused"}: {reason}')
    if not admitted:
        ctx.exit(1)


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the connections of each running replica, by tenant and role."""
    from onegov.chat.session import SessionStoreError, store_from_url

    config = _config(ctx)
    store = store_from_url(config.session_store, config.session_ttl)
    try:
        replicas = store.statuses()
    except SessionStoreError:
        raise click.ClickException(
            'the session store is unreachable'
        ) from None
    finally:
        store.close()

    if not replicas:
        click.echo('no running replicas')
        return
    for replica in replicas:
        click.echo(
            f'replica {replica["replica"]} at {replica["address"]} '
            f'(pid {replica["pid"]})'
        )
        connections = replica.get('connections') or {}
        if not connections:
            click.echo('  no connections')
        for tenant, roles in sorted(connections.items()):
            counts = ', '.join(
                f'{role}: {count}' for role, count in sorted(roles.items())
            )
            click.echo(f'  {tenant}: {counts}')


@cli.command('list-chats')
@click.option(
    '--state', type=click.Choice(['waiting', 'active', 'ended', 'all']),
    default='all', show_default=True,
)
@click.pass_context
def list_chats(ctx: click.Context, state: str) -> None:
    """List the chats of the configured tenant."""
    from onegov.chat.collections import ChatCollection

    config = _config(ctx)
    with _database(config)() as session:
        chats = ChatCollection(session, config.application_id)
        found = {
            'waiting': chats.waiting, 'active': chats.active,
            'ended': chats.archived,
        }
        lists = [found[state]()] if state != 'all' else [
            chats.waiting(), chats.active(), chats.archived(),
        ]
        for chat in (chat for listed in lists for chat in listed):
            click.echo(
                f'{chat.id}  {chat.state.value:<7}  '
                f'{chat.created:%Y-%m-%d %H:%M}  {chat.topic}'
            )


@cli.command('end-chat')
@click.argument('chat_id')
@click.pass_context
def end_chat(ctx: click.Context, chat_id: str) -> None:
    """End an open chat (its clients see it ended when they next act)."""
    from onegov.chat.collections import ChatCollection

    config = _config(ctx)
    with _database(config)() as session:
        chats = ChatCollection(session, config.application_id)
        if chats.by_id(chat_id) is None:
            raise click.ClickException(f'no chat {chat_id}')
        if not chats.end(chat_id):
            raise click.ClickException(f'chat {chat_id} has ended already')
        session.commit()
    click.echo(f'ended chat {chat_id}')


@cli.command()
@click.option(
    '--older-than', required=True, type=click.IntRange(min=1),
    metavar='DAYS', help='Delete ended chats that ended before this.',
)
@click.option('--yes', is_flag=True, help='Do not ask before deleting.')
@click.pass_context
def purge(ctx: click.Context, older_than: int, yes: bool) -> None:
    """Delete the transcripts of chats that ended DAYS ago or earlier."""
    from datetime import UTC, datetime, timedelta

    from onegov.chat.collections import ChatCollection

    config = _config(ctx)
    if not yes:
        click.confirm(
            f'Delete every chat of {config.application_id} that ended more '
            f'than {older_than} days ago?', abort=True,
        )
    cutoff = datetime.now(UTC) - timedelta(days=older_than)
    with _database(config)() as session:
        count = ChatCollection(session, config.application_id).purge(cutoff)
        session.commit()
    click.echo(f'deleted {count} chats')


if __name__ == '__main__':  # pragma: no cover
    cli()
