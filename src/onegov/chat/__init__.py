"""onegov.chat: secure real-time chat for Morepath and OneGov apps."""

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
