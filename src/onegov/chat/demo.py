"""``onegov-chat demo``: a host application and the chat server together.

The demo app is what a OneGov application looks like with the chat mixed
in: `Framework` (the host framework mirror) plus `ChatApp`, served by
waitress, beside ``onegov-chat serve`` in the same process and from the
same configuration.

"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

import morepath

from onegov.chat.config import Config, own_origins
from onegov.chat.framework import Framework
from onegov.chat.integration import ChatApp
from onegov.chat.server import ChatServer, wait_for_signal

logger = logging.getLogger('onegov.chat.demo')


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


async def run_demo(config: Config) -> None:
    """Run both servers until SIGINT or SIGTERM.

    The web app's own origins are always allowed, whatever port it got.

    """
    chat = ChatServer(config)
    await chat.start(config.websocket_host, config.websocket_port)
    ws_port = chat.bound_port()

    app = create_demo_app(config, ws_port)
    web = WebServer(app, config.web_host, config.web_port)
    origins = own_origins(config.web_host, web.port)
    chat.checker.policy = dataclasses.replace(
        chat.checker.policy,
        origins=chat.checker.policy.origins | frozenset(origins),
    )
    web.start()

    url = f'http://{config.web_host}:{web.port}'
    print(
        f'onegov.chat demo is running.\n'
        f'  Web app:          {url}/\n'
        f'  Websocket server: ws://{config.websocket_host}:{ws_port}/chats\n'
        f'  Data directory:   {config.data_dir}\n'
        f'Press Ctrl-C to stop.',
        flush=True,
    )
    logger.info(
        'event=demo_ready web_port=%d ws_port=%d', web.port, ws_port
    )

    try:
        await wait_for_signal()
    finally:
        await asyncio.to_thread(web.stop)
        await chat.close()
    print('onegov.chat demo stopped.', flush=True)


class Root:
    """The demo's front page."""


@DemoApp.path(model=Root, path='/')
def get_root() -> Root:
    return Root()


@DemoApp.html(model=Root)
def view_root(self: Root, request: morepath.Request) -> str:
    return DEMO_PAGE


DEMO_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>onegov.chat demo</title>
</head>
<body>
<main>
<h1>onegov.chat demo</h1>
<p id="status" role="status" aria-live="polite">Connecting…</p>
</main>
<script type="module" src="/chat/static/hello.js"></script>
</body>
</html>
"""
