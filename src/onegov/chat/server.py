"""``onegov-chat serve``: the websocket server in front of the chat.

The origin is checked first, in ``process_request``, for every path but
the health check and the metrics: that check consumes nothing. The
other checks run in ``process_response``, once the websockets library
has found the request to be a valid websocket handshake, so a request it
refuses anyway (no ``Upgrade`` header, a wrong version or method) never
consumes a token.

"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import Frame
from websockets.http11 import Request, Response

from onegov.chat.config import Config
from onegov.chat.handshake import HandshakeChecker, HandshakeRefused, Principal
from onegov.chat.metrics import Metrics
from onegov.chat.service import ChatService
from onegov.chat.session import SessionStore, store_from_url

logger = logging.getLogger('onegov.chat.server')

_SECRET_HEADERS = frozenset({'cookie', 'set-cookie', 'authorization'})


def _redact_path(path: str) -> str:
    base, sep, _ = path.partition('?')
    return f'{base}?[redacted]' if sep else base


def _redact(value: Any) -> Any:
    if isinstance(value, Frame):
        return f'{value.opcode.name} [{len(value.data)} bytes]'
    if isinstance(value, str) and '?' in value:
        return _redact_path(value)
    return value


class RedactingLogger(logging.LoggerAdapter[logging.Logger]):
    """The websockets library's logger, without secrets.

    At DEBUG the library logs the request line (with the query string,
    and so the token), every header (with the cookie) and every frame
    (with chat text). This adapter keeps the lines and drops those
    values.

    """

    def log(self, level: int, msg: object, *args: Any, **kw: Any) -> None:
        if not self.isEnabledFor(level):
            return
        exc_info = kw.pop('exc_info', None)
        if exc_info:
            # An exception's message may quote the raw request line or a
            # header (a parse error does): keep only its type.
            if exc_info is True:
                exc_info = sys.exc_info()[1]
            name = type(exc_info).__name__ if isinstance(
                exc_info, BaseException
            ) else 'error'
            msg = f'{msg} (%s)'
            args = (*args, name)
        if (
            len(args) == 2
            and isinstance(args[0], str)
            and args[0].lower() in _SECRET_HEADERS
        ):
            args = (args[0], '[redacted]')
        else:
            args = tuple(_redact(arg) for arg in args)
        self.logger.log(level, msg, *args, **kw)


def peer_of(connection: ServerConnection) -> str:
    """Return ``host:port`` of the remote end, for the log."""
    try:
        address = connection.remote_address
    except Exception:
        return '-'
    if isinstance(address, tuple) and len(address) >= 2:
        return f'{address[0]}:{address[1]}'
    return '-'


#: The path of the health check a load balancer polls.
HEALTH_PATH = '/healthz'

#: The path of the Prometheus metrics.
METRICS_PATH = '/metrics'

Handler = Callable[[ServerConnection, Principal], Awaitable[None]]


class ChatServer:
    """The websocket server: handshake checks, then the chat."""

    def __init__(
        self,
        config: Config,
        store: SessionStore | None = None,
        handler: Handler | None = None,
    ) -> None:
        self.config = config
        self.store = store or store_from_url(
            config.session_store, config.session_ttl
        )
        self.checker = HandshakeChecker(
            config.identity_secret, self.store, config.origin_policy
        )
        self.metrics = Metrics()
        self.service: ChatService | None = None
        if handler is None:
            self.service = ChatService(config, self.store, self.metrics)
            handler = self.service.handle
        self.handler = handler
        self.server: Server | None = None

    async def process_response(
        self,
        connection: ServerConnection,
        request: Request,
        response: Response,
    ) -> Response | None:
        """Admit or refuse a handshake the library found valid."""
        if response.status_code != 101:
            return None

        headers: Headers = request.headers
        try:
            principal = await asyncio.to_thread(
                self.checker.admit,
                request.path,
                headers.get_all('Origin'),
                headers.get_all('Cookie'),
            )
        except HandshakeRefused as refusal:
            return self.refuse(connection, refusal)

        self.metrics.handshakes.labels('admitted', '').inc()
        self.metrics.tokens_consumed.inc()
        connection.principal = principal  # type: ignore[attr-defined]
        logger.info(
            'event=handshake_admitted tenant=%s role=%s peer=%s',
            principal.application_id, principal.role, peer_of(connection),
        )
        return None

    def refuse(
        self, connection: ServerConnection, refusal: HandshakeRefused
    ) -> Response:
        """Log a refusal with its reason and answer with its status."""
        logger.info(
            'event=handshake_refused reason=%s status=%d peer=%s',
            refusal.reason, refusal.status, peer_of(connection),
        )
        self.metrics.handshakes.labels('refused', refusal.reason).inc()
        if refusal.reason == 'token_expired':
            self.metrics.tokens_expired.inc()
        return connection.respond(refusal.status, f'{refusal.text}\n')

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer the plain HTTP requests: health and metrics."""
        path = request.path.partition('?')[0]
        if path not in (HEALTH_PATH, METRICS_PATH):
            # The origin first, before the library's own checks, so that
            # a refusal names the reason (two Origin headers, say); it
            # consumes nothing.
            try:
                self.checker.check_origin(request.headers.get_all('Origin'))
            except HandshakeRefused as refusal:
                return self.refuse(connection, refusal)
            return None
        if path == HEALTH_PATH:
            failed = await self.health()
            if failed:
                return connection.respond(
                    503, f'unavailable: {", ".join(failed)}\n'
                )
            return connection.respond(200, 'ok\n')
        if path == METRICS_PATH and self.config.metrics:
            response = connection.respond(200, '')
            response.body = body = self.metrics.render()
            # Headers is a multidict: replace, do not add.
            del response.headers['Content-Type']
            del response.headers['Content-Length']
            response.headers['Content-Type'] = CONTENT_TYPE_LATEST
            response.headers['Content-Length'] = str(len(body))
            return response
        return None

    async def health(self) -> list[str]:
        """Return the names of the backends that do not answer."""
        checks: dict[str, Awaitable[Any]] = {
            'store': asyncio.to_thread(self.store.ping),
        }
        if self.service is not None:
            checks['broker'] = self.service.broker.ping()
            checks['database'] = asyncio.to_thread(
                self.service.ping_database
            )

        # All at once: an unreachable backend costs one timeout, not one
        # per check.
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(check, 2.0) for check in checks.values()),
            return_exceptions=True,
        )
        return [
            name for name, outcome in zip(checks, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]

    async def serve_connection(self, connection: ServerConnection) -> None:
        principal: Principal = connection.principal  # type: ignore[attr-defined]
        try:
            await self.handler(connection, principal)
        except Exception:
            # A bug of ours: log it and close politely, but never let the
            # library answer with 1011 for input a client sent.
            logger.error(
                'event=handler_failed peer=%s', peer_of(connection),
                exc_info=True,
            )
            await connection.close(1011, 'internal error')

    async def start(self, host: str, port: int) -> Server:
        config = self.config
        if self.service is not None:
            await self.service.start()
        self.server = await serve(
            self.serve_connection,
            host,
            port,
            process_request=self.process_request,
            process_response=self.process_response,
            max_size=config.max_size,
            open_timeout=config.open_timeout,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=5,
            compression='deflate' if config.compression else None,
            logger=RedactingLogger(logging.getLogger('websockets.server')),
            server_header=None,
        )
        if self.service is not None:
            self.service.address = f'{host}:{self.bound_port()}'
            await self.service.report_status()
        return self.server

    def bound_port(self) -> int:
        if self.server is None:
            raise RuntimeError('the server is not running')
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            # Stop accepting, close every connection with 1001 (clients
            # reconnect elsewhere), and let the handlers finish what they
            # are storing, within the shutdown timeout.
            self.server.close()
            try:
                await asyncio.wait_for(
                    self.server.wait_closed(), self.config.shutdown_timeout
                )
            except TimeoutError:
                logger.warning('event=shutdown_timeout')
        if self.service is not None:
            await self.service.stop()
        self.store.close()


async def wait_for_signal() -> str:
    """Wait for SIGTERM or SIGINT; return the signal's name."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _set, stop, signum)
    try:
        return signal.Signals(await stop).name
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _set(future: asyncio.Future[int], value: int) -> None:
    if not future.done():
        future.set_result(value)


async def run(config: Config, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then close every client with 1001."""
    server = ChatServer(config)
    await server.start(host, port)
    logger.info(
        'event=server_ready host=%s port=%d', host, server.bound_port()
    )
    name = await wait_for_signal()
    logger.info('event=server_stopping signal=%s', name)
    await server.close()
    logger.info('event=server_stopped')
