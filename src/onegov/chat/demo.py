"""``onegov-chat demo``: the product tour on one machine.

The demo app is what a OneGov application looks like with the chat mixed
in: `Framework` (the host framework mirror) plus `ChatApp`, served by
waitress, beside ``onegov-chat serve`` in the same process and from the
same configuration. On its first start it creates a staff account, so
that both sides of a chat can be tried at once: customers at ``/chat``,
staff at ``/chat/login``.

With ``--no-ws`` the demo serves the web app only, and its pages connect
to a websocket server that runs as a process of its own (``onegov-chat
serve`` with the same configuration file). That server can be stopped
and started again while the pages stay open, which is how the browser
tests check that the pages reconnect by themselves.

"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import threading
from typing import Any

import morepath

from onegov.chat.config import Config, ConfigError, own_origins
from onegov.chat.framework import Framework
from onegov.chat.integration import ChatApp
from onegov.chat.server import ChatServer, wait_for_signal

logger = logging.getLogger('onegov.chat.demo')

#: The user name of the demo's staff account.
STAFF_USERNAME = 'staff'

#: The name customers see for the demo's staff account.
STAFF_DISPLAY_NAME = 'Demo Staff'

#: The file in the data directory that keeps the account's password.
PASSWORD_FILE = 'staff-password'  # noqa: S105 (a file name)


class DemoApp(Framework, ChatApp):
    """The demo host application."""


def create_demo_app(config: Config, websocket_port: int) -> DemoApp:
    """Return a configured demo app for the tenant of `config`."""
    DemoApp.commit()
    app = DemoApp()
    settings = config.app_settings()
    settings['websocket_port'] = websocket_port
    app.configure_application(**settings)
    app.set_application_id(config.application_id)
    return app


@dataclasses.dataclass(frozen=True)
class DemoAccount:
    """The demo's staff login."""

    username: str
    password: str
    #: Where the password is kept.
    path: str
    #: True if this start created the account.
    created: bool


def load_password(data_dir: str) -> tuple[str, str]:
    """Return the demo password kept in `data_dir` and the file's path.

    The first call creates the file, readable by its owner only; later
    calls read it.

    Raises:
        ConfigError: if the file is there but holds no password.

    """
    path = os.path.join(data_dir, PASSWORD_FILE)
    os.makedirs(data_dir, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding='ascii') as handle:
            password = handle.read().strip()
        if len(password) < 8:
            raise ConfigError(
                f'{path} holds no usable password; delete it and the demo '
                f'makes a new one'
            ) from None
        return password, path
    with os.fdopen(fd, 'w', encoding='ascii') as handle:
        password = secrets.token_urlsafe(12)
        handle.write(password + '\n')
    return password, path


def ensure_demo_account(config: Config) -> DemoAccount:
    """Make sure the staff account ``staff`` exists; return its login.

    The password file in the data directory is the account's source of
    truth: if the account is missing, it is created with that password,
    and if its password differs (the file was deleted and made anew), it
    is set to the one in the file.

    Raises:
        ConfigError: if the password file holds no usable password.

    """
    from onegov.chat.collections import UserCollection
    from onegov.chat.database import create_tables, session_factory

    password, path = load_password(config.data_dir)

    factory = session_factory(config.dsn)
    engine = factory.kw['bind']
    try:
        create_tables(engine)
        with factory() as session:
            users = UserCollection(session, config.application_id)
            user = users.by_username(STAFF_USERNAME)
            created = user is None
            if user is None:
                users.add(STAFF_USERNAME, STAFF_DISPLAY_NAME, password)
            elif not user.check_password(password):
                user.set_password(password)
            session.commit()
    finally:
        engine.dispose()

    if created:
        logger.info('event=demo_account_created user=%s', STAFF_USERNAME)
    return DemoAccount(STAFF_USERNAME, password, path, created)


class WebServer:
    """waitress in a thread, stoppable from the event loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        from waitress.server import create_server

        self.server = create_server(
            app, host=host, port=port, threads=4, ident=None,
            clear_untrusted_proxy_headers=True,
        )
        self.thread = threading.Thread(
            target=self.server.run, name='waitress', daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.close()
        self.server.task_dispatcher.shutdown()
        self.thread.join(timeout=5)


def welcome(
    config: Config,
    account: DemoAccount,
    web_port: int,
    ws_port: int,
    ws_here: bool,
) -> str:
    """The text the demo prints once both servers listen."""
    url = f'http://{config.web_host}:{web_port}'
    ws_url = f'ws://{config.websocket_host}:{ws_port}/chats'
    if ws_here:
        ws_line = f'  Websocket server:  {ws_url}'
    else:
        ws_line = (
            f'  Websocket server:  not started (--no-ws); the pages expect\n'
            f'                     `onegov-chat serve` at {ws_url}'
        )
    return (
        f'onegov.chat demo is running.\n'
        f'  Front page:        {url}/\n'
        f'  Customers:         {url}/chat\n'
        f'  Staff login:       {url}/chat/login\n'
        f'    user name:       {account.username}\n'
        f'    password:        {account.password}\n'
        f'    (kept in {account.path})\n'
        f'{ws_line}\n'
        f'  Data directory:    {config.data_dir}\n'
        f'Open the customer page and the staff login in two different '
        f'browsers\n(or a private window), so that each has a session of '
        f'its own.\n'
        f'Press Ctrl-C to stop.'
    )


async def run_demo(config: Config, websocket_server: bool = True) -> None:
    """Run the web app, and the websocket server, until SIGINT or SIGTERM.

    The web app's own origins are always allowed, whatever port it got.
    Without `websocket_server`, the pages connect to
    ``config.websocket_port``, where a separate ``onegov-chat serve``
    is expected.

    Raises:
        ConfigError: if the demo account cannot be set up, or the
            websocket port is left to chance without a server here.

    """
    if not websocket_server and config.websocket_port == 0:
        raise ConfigError(
            'without its own websocket server the demo needs the port of '
            'the separate one: give --ws-port'
        )
    account = await asyncio.to_thread(ensure_demo_account, config)

    chat: ChatServer | None = None
    ws_port = config.websocket_port
    if websocket_server:
        chat = ChatServer(config)
        await chat.start(config.websocket_host, config.websocket_port)
        ws_port = chat.bound_port()

    app = create_demo_app(config, ws_port)
    web = WebServer(app, config.web_host, config.web_port)
    if chat is not None:
        origins = own_origins(config.web_host, web.port)
        chat.checker.policy = dataclasses.replace(
            chat.checker.policy,
            origins=chat.checker.policy.origins | frozenset(origins),
        )
    web.start()

    print(
        welcome(config, account, web.port, ws_port, chat is not None),
        flush=True,
    )
    logger.info(
        'event=demo_ready web_port=%d ws_port=%d', web.port, ws_port
    )

    try:
        await wait_for_signal()
    finally:
        await asyncio.to_thread(web.stop)
        if chat is not None:
            await chat.close()
        app.dispose()
    print('onegov.chat demo stopped.', flush=True)


class Root:
    """The demo's front page."""


@DemoApp.path(model=Root, path='/')
def get_root() -> Root:
    return Root()


@DemoApp.view(model=Root, request_method='GET')
def view_root(self: Root, request: morepath.Request) -> morepath.Response:
    from onegov.chat.views import render

    return render(request, 'demo.html')
