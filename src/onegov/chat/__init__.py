"""onegov.chat: secure real-time chat for Morepath and OneGov apps."""

# The chat's pages register themselves on ChatApp.
from onegov.chat import views  # noqa: F401
from onegov.chat.integration import ChatApp
from onegov.chat.security import (
    NoWebsocketTokenPresented,
    NoWebsocketTokenStored,
    WebsocketSecurityError,
    WebsocketTokenExpired,
    WebsocketTokenMismatch,
    consume_websocket_token,
)

__all__ = [
    'ChatApp',
    'NoWebsocketTokenPresented',
    'NoWebsocketTokenStored',
    'WebsocketSecurityError',
    'WebsocketTokenExpired',
    'WebsocketTokenMismatch',
    'consume_websocket_token',
]
