"""A small host application, as a town would write it."""

from __future__ import annotations

import morepath

from onegov.chat import ChatApp
from onegov.chat.framework import Framework


class TownApp(Framework, ChatApp):
    """The town's website, with the chat mixed in."""


class Home:
    pass


@TownApp.path(model=Home, path='/')
def get_home() -> Home:
    return Home()


@TownApp.html(model=Home)
def view_home(self: Home, request: morepath.Request) -> str:
    return '<h1>Govikon</h1><p><a href="/chat">Chat with us</a></p>'
