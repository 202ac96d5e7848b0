"""Queries over the chat's models."""

from onegov.chat.collections.chats import (
    ChatCollection,
    StoredMessage,
    UserCollection,
)

__all__ = ['ChatCollection', 'StoredMessage', 'UserCollection']
