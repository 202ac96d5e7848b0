"""`ChatApp`, the mixin a OneGov-style host application adds the chat with.

::

    class TownApp(Framework, ChatApp):
        pass

The mixin brings the ``configure_chat`` hook, the ``websocket_token()``
request method, the ``/chat/token`` view the browser client calls before
every (re)connect, and the websocket endpoint in the page's
Content-Security-Policy. The chat's pages and views are registered on it
too (see `onegov.chat.views`).

"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import urlencode, urlsplit

import morepath
from prometheus_client import Counter
from sqlalchemy.orm import Session

from onegov.chat.security import (
    DEFAULT_TOKEN_TTL,
    OriginPolicy,
    new_websocket_token,
    store_websocket_token,
)

#: The path of the websocket endpoint on the chat server.
WEBSOCKET_PATH = '/chats'

#: Tokens issued by this web app process. It lives in the default
#: Prometheus registry, which the host application exports as it exports
#: its own metrics; the websocket server counts the tokens consumed.
TOKENS_ISSUED = Counter(
    'onegov_chat_tokens_issued_total',
    'One-time websocket tokens issued by the web app.',
)


class ChatRequestMixin:
    """The request methods the chat adds to the host's request class."""

    app: Any
    browser_session: Any

    def websocket_token(self) -> str:
        """Return a new one-time token, stored in the browser session.

        The token is good for one websocket handshake within the
        configured lifetime. Each call issues a new token and keeps the
        ones already issued, so two tabs never spoil each other's
        connect.

        """
        token = new_websocket_token()
        store_websocket_token(
            self.browser_session, token, ttl=self.app.chat_token_ttl
        )
        TOKENS_ISSUED.inc()
        return token


def _with_chat_request(request_class: type[Any]) -> type[Any]:
    if issubclass(request_class, ChatRequestMixin):
        return request_class
    return type(
        request_class.__name__, (ChatRequestMixin, request_class), {}
    )


class ChatApp(morepath.App):
    """The chat, as a mixin for a host application."""

    chat_websocket_url: str | None = None
    chat_websocket_port: int = 8765
    chat_token_ttl: float = DEFAULT_TOKEN_TTL
    chat_max_text_length: int = 4000
    chat_origin_policy: OriginPolicy = OriginPolicy()
    _chat_tables_ready = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The host's framework picks the request class; give it our
        # request methods whatever it is.
        super().__init_subclass__(**kwargs)
        cls.request_class = _with_chat_request(cls.request_class)

    def configure_chat(
        self,
        *,
        websocket_url: str | None = None,
        websocket_port: int = 8765,
        allowed_origins: Iterable[str] = (),
        allowed_origin_patterns: Iterable[str] = (),
        allow_missing_origin: bool = False,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        max_text_length: int = 4000,
        **cfg: Any,
    ) -> None:
        """Take the websocket settings.

        Args:
            websocket_url: the public URL of the websocket endpoint, as
                the browser must use it (``wss://chat.example.org/chats``
                behind a proxy). By default the page's own host name with
                `websocket_port` and the path ``/chats``.
            websocket_port: the port of ``onegov-chat serve``.
            allowed_origins: the exact origins that may connect.
            allowed_origin_patterns: regular expressions that must match
                the whole origin.
            allow_missing_origin: admit handshakes without an origin.
            token_ttl: how long a token is good for, in seconds.
            max_text_length: the longest message, in characters (the
                server enforces it; the pages tell the browser).

        Raises:
            ValueError: for any setting that is wrong.

        """
        if websocket_url is not None:
            parts = urlsplit(websocket_url) if isinstance(
                websocket_url, str) else None
            try:
                # Reading the port checks it (range, digits).
                valid = parts is not None and parts.port != 0
            except ValueError:
                valid = False
            if not valid or parts is None or parts.scheme not in (
                'ws', 'wss'
            ) or not parts.hostname or parts.query or parts.fragment:
                raise ValueError(
                    'websocket_url must look like wss://host[:port]/path, '
                    'without a query string'
                )
        if isinstance(websocket_port, bool) or not isinstance(
            websocket_port, int
        ) or not 0 < websocket_port < 65536:
            raise ValueError('websocket_port must be a port number')
        if isinstance(token_ttl, bool) or not isinstance(
            token_ttl, int | float
        ) or not 1 <= token_ttl <= 3600:
            raise ValueError(
                'token_ttl must be a number of seconds from 1 to 3600'
            )

        self.chat_origin_policy = OriginPolicy.from_config(
            allowed_origins, allowed_origin_patterns, allow_missing_origin
        )
        self.chat_websocket_url = websocket_url
        self.chat_websocket_port = websocket_port
        self.chat_token_ttl = float(token_ttl)
        if isinstance(max_text_length, bool) or not isinstance(
            max_text_length, int
        ) or max_text_length < 1:
            raise ValueError('max_text_length must be a positive number')
        self.chat_max_text_length = max_text_length

    def chat_db(self) -> Session:
        """The host's database session, with the chat's tables in it."""
        session: Session = self.db()  # type: ignore[attr-defined]
        if not self._chat_tables_ready:
            from onegov.chat.database import create_tables

            create_tables(session.get_bind())  # type: ignore[arg-type]
            self._chat_tables_ready = True
        return session

    def websocket_endpoint(self, request: morepath.Request) -> str:
        """Return the websocket URL for a page served by `request`.

        The scheme follows the page: ``wss`` when it was served over
        https, since browsers refuse plain websockets on secure pages.

        """
        secure = request.scheme == 'https'
        if self.chat_websocket_url:
            parts = urlsplit(self.chat_websocket_url)
            scheme = 'wss' if secure else parts.scheme
            return parts._replace(scheme=scheme).geturl()

        host = request.host
        if not host.endswith(']') and ':' in host:
            host = host.rsplit(':', 1)[0]
        scheme = 'wss' if secure else 'ws'
        return f'{scheme}://{host}:{self.chat_websocket_port}{WEBSOCKET_PATH}'

    def websocket_origin(self, request: morepath.Request) -> str:
        """Return the scheme, host and port of the websocket endpoint."""
        parts = urlsplit(self.websocket_endpoint(request))
        return f'{parts.scheme}://{parts.netloc}'


class ChatToken:
    """The model behind ``/chat/token``."""


@ChatApp.path(model=ChatToken, path='/chat/token')
def get_chat_token() -> ChatToken:
    return ChatToken()


@ChatApp.json(model=ChatToken, request_method='GET')
def view_chat_token(
    self: ChatToken, request: morepath.Request
) -> dict[str, str]:
    """Issue a token and say where to connect with it.

    The answer is for this browser only and good for one handshake, so
    no cache may keep it.

    """
    app: Any = request.app
    token = request.websocket_token()
    query = {'token': token}
    schema = getattr(app, 'schema', None)
    if schema:
        query['schema'] = schema

    @request.after
    def no_store(response: morepath.Response) -> None:
        response.headers['Cache-Control'] = 'no-store'
        response.headers['Pragma'] = 'no-cache'

    return {
        'token': token,
        'url': f'{app.websocket_endpoint(request)}?{urlencode(query)}',
    }


@ChatApp.tween_factory()
def chat_csp_tween_factory(
    app: ChatApp, handler: Callable[[Any], morepath.Response]
) -> Callable[[Any], morepath.Response]:
    """Allow the page to connect to the websocket endpoint."""

    def chat_csp_tween(request: Any) -> morepath.Response:
        policy = getattr(request, 'content_security_policy', None)
        if isinstance(policy, dict):
            policy.setdefault('connect-src', {"'self'"}).add(
                app.websocket_origin(request)
            )
        return handler(request)

    return chat_csp_tween


#: The names of the files the chat ships for the browser.
STATIC_NAME = re.compile(r'[a-z0-9][a-z0-9_-]*\.(js|css)')

_MEDIA_TYPES = {
    'js': 'text/javascript; charset=utf-8',
    'css': 'text/css; charset=utf-8',
}


class StaticFile:
    """A file the chat ships for the browser (its client, its styles)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read(self) -> bytes | None:
        if not STATIC_NAME.fullmatch(self.name):
            return None
        path = resources.files('onegov.chat') / 'static' / self.name
        return path.read_bytes() if path.is_file() else None


@ChatApp.path(model=StaticFile, path='/chat/static/{name}')
def get_static_file(name: str) -> StaticFile | None:
    return StaticFile(name) if STATIC_NAME.fullmatch(name) else None


@ChatApp.view(model=StaticFile, request_method='GET')
def view_static_file(
    self: StaticFile, request: morepath.Request
) -> morepath.Response:
    body = self.read()
    if body is None:
        return morepath.Response(status=404)
    return morepath.Response(
        body=body,
        content_type=_MEDIA_TYPES[self.name.rsplit('.', 1)[1]].split(';')[0],
        charset='utf-8',
        cache_control='no-cache',
    )
