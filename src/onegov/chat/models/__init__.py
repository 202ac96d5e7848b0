"""The chat's database models."""

from onegov.chat.models.base import Base
from onegov.chat.models.chat import Chat, ChatState, Message
from onegov.chat.models.user import User

__all__ = ['Base', 'Chat', 'ChatState', 'Message', 'User']
