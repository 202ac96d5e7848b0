"""The JSON protocol spoken on an admitted connection, version 1.

Every frame is a JSON object with a ``type``. This module turns a frame
into a `Command` or raises `ProtocolError` with the code of the error
reply; it does no I/O. The full description, with every reply and close
code, is in ``docs/protocol.md``.

"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: The version of the protocol; ``hello`` carries it.
PROTOCOL_VERSION = 1

#: What a client message id looks like.
CLIENT_ID = re.compile(r'[A-Za-z0-9_-]{1,64}')

#: What a chat id looks like.
CHAT_ID = re.compile(r'[0-9a-f]{32}')


class Close:
    """The close codes of the protocol, and whether to reconnect."""

    #: Normal closure; do not reconnect.
    NORMAL = 1000
    #: The server is shutting down or draining; reconnect.
    GOING_AWAY = 1001
    #: A binary frame was sent; do not reconnect (a client bug).
    UNSUPPORTED_DATA = 1003
    #: A text frame was not valid UTF-8; do not reconnect (set by the
    #: websockets library).
    INVALID_DATA = 1007
    #: A frame was larger than ``max_size``; do not reconnect (set by
    #: the websockets library).
    TOO_BIG = 1009
    #: The server cannot serve now (its database is down); reconnect.
    TRY_AGAIN_LATER = 1013
    #: The session ended: logged out, expired, or its role changed; do
    #: not reconnect without logging in again.
    SESSION_ENDED = 4000
    #: The customer's chat ended; do not reconnect.
    CHAT_ENDED = 4001
    #: The client did not read its messages fast enough; reconnect.
    TOO_SLOW = 4002
    #: Too many connections for this session; do not reconnect.
    TOO_MANY_CONNECTIONS = 4003

    #: The codes after which a client should reconnect, with back-off.
    RETRY = frozenset({1001, 1006, 1011, 1012, 1013, 4002})


class ProtocolError(Exception):
    """Raised for a frame the protocol does not accept.

    `code` is the ``code`` of the error reply; `ref` the client message
    id or the command type it refers to, if known. The message never
    quotes what the client sent.

    """

    def __init__(self, code: str, message: str, ref: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            'type': 'error', 'code': self.code, 'message': self.message,
        }
        if self.ref is not None:
            reply['ref'] = self.ref
        return reply


@dataclass(frozen=True)
class Command:
    """A frame the protocol accepted."""

    type: str
    chat_id: str | None = None
    last_seq: int = 0
    text: str = ''
    client_id: str = ''


#: The fields each command may carry, with their type.
_FIELDS: dict[str, dict[str, type]] = {
    'join': {'chat_id': str, 'last_seq': int},
    'message': {'chat_id': str, 'text': str, 'client_id': str},
    'accept': {'chat_id': str},
    'end': {'chat_id': str},
    'ping': {},
}

#: The commands only staff may send.
STAFF_COMMANDS = frozenset({'accept', 'end'})


def parse_command(frame: str, max_text_length: int) -> Command:
    """Return the command in `frame`.

    Raises:
        ProtocolError: ``bad_json`` for anything that is not a JSON
            object, ``unknown_type`` for an unknown ``type``,
            ``bad_field`` for a field of the wrong type or form,
            ``too_long`` for text over `max_text_length` characters.

    """
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        raise ProtocolError('bad_json', 'frames must be JSON') from None
    if not isinstance(data, dict):
        raise ProtocolError('bad_json', 'frames must be JSON objects')

    kind = data.get('type')
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError('unknown_type', 'unknown message type')
    fields = _FIELDS[kind]

    ref = data.get('client_id')
    ref = ref if isinstance(ref, str) and CLIENT_ID.fullmatch(ref) else kind

    values: dict[str, Any] = {}
    for name, value in data.items():
        if name == 'type':
            continue
        expected = fields.get(name)
        if expected is None:
            raise ProtocolError('bad_field', f'unknown field {name}', ref)
        if value is None and name == 'chat_id':
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ProtocolError(
                'bad_field', f'{name} must be {expected.__name__}', ref
            )
        values[name] = value

    chat_id = values.get('chat_id')
    if chat_id is not None and not CHAT_ID.fullmatch(chat_id):
        raise ProtocolError('bad_field', 'chat_id is malformed', ref)

    last_seq = values.get('last_seq', 0)
    if not 0 <= last_seq < 2**31:
        raise ProtocolError('bad_field', 'last_seq is out of range', ref)

    if kind == 'message':
        if not CLIENT_ID.fullmatch(values.get('client_id', '')):
            raise ProtocolError(
                'bad_field', 'client_id must be 1-64 of A-Z a-z 0-9 _ -', ref
            )
        text = values.get('text', '')
        if not text.strip():
            raise ProtocolError('bad_field', 'text must not be empty', ref)
        if len(text) > max_text_length:
            raise ProtocolError(
                'too_long',
                f'text is longer than {max_text_length} characters', ref,
            )
        if '\x00' in text or _has_lone_surrogate(text):
            raise ProtocolError('bad_field', 'text is not valid text', ref)

    return Command(type=kind, **values)


def _has_lone_surrogate(text: str) -> bool:
    # JSON may encode lone surrogates as \\ud800 escapes; databases and
    # browsers refuse them.
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return True
    return False


def encode(message: dict[str, Any]) -> str:
    """Encode a server message once, for every receiver."""
    return json.dumps(message, ensure_ascii=False, separators=(',', ':'))
