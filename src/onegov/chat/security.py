"""The checks that stand between a browser and the chat: tokens and origins.

WebSockets are not covered by the Same-Origin Policy: any page may open
a websocket to us and the browser sends our session cookie along
(OWASP WSTG-CLNT-10, "Testing WebSockets"). Two checks stop such a
cross-site WebSocket hijacking:

* the ``Origin`` header must be on an allowlist (RFC 6455, section 10.2);
* the client must present a one-time token that only our own pages can
  read, much like a CSRF token.

Everything here is pure: the functions take plain values (a path, an
origin string, a mapping acting as session) and return or raise, so the
decisions can be tested without a socket.

"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from onegov.chat.utils import (
    MissingParameter,
    ParameterError,
    param_from_path,
)

#: The default lifetime of a websocket token, in seconds.
DEFAULT_TOKEN_TTL = 60.0

#: How many tokens one browser session may hold at once (one per tab);
#: the oldest are dropped beyond that.
MAX_OUTSTANDING_TOKENS = 8

#: The shape of a token we issue; anything else cannot match.
TOKEN_PATTERN = re.compile(r'[A-Za-z0-9_-]{1,128}')


class WebsocketSecurityError(Exception):
    """Raised when a websocket handshake fails a security check.

    Each subclass names what failed. `reason` is a stable, short slug for
    logs and metrics; `status` is the HTTP status the refusal becomes.
    Messages never contain the token, the cookie or the query string.

    """

    reason = 'security_error'
    status = 401


class NoWebsocketTokenPresented(WebsocketSecurityError):
    """Raised when the handshake URL carries no token."""

    reason = 'token_missing'


class NoWebsocketTokenStored(WebsocketSecurityError):
    """Raised when the session holds no token: never issued, or spent."""

    reason = 'token_not_stored'


class WebsocketTokenMismatch(WebsocketSecurityError):
    """Raised when the presented token differs from the stored one.

    The stored tokens are burnt all the same, so a guess costs the
    session every outstanding token.

    """

    reason = 'token_mismatch'


class WebsocketTokenExpired(WebsocketSecurityError):
    """Raised when the token matched but its lifetime has run out."""

    reason = 'token_expired'


class OriginNotAllowed(WebsocketSecurityError):
    """Raised when the ``Origin`` header is not on the allowlist."""

    reason = 'origin_not_allowed'
    status = 403


class OriginMissing(WebsocketSecurityError):
    """Raised when the ``Origin`` header is absent, empty or ``null``.

    Browsers always send an origin with a websocket handshake; a missing
    one means a non-browser client, or a sandboxed document (``null``).

    """

    reason = 'origin_missing'
    status = 403


def new_websocket_token() -> str:
    """Return a fresh, unguessable token (256 bits from `secrets`)."""
    return secrets.token_urlsafe(32)


def token_key(session_key: str, token: str) -> str:
    """Return the session key under which `token` is stored.

    Each outstanding token has its own key, so that issuing a token in
    one tab never rewrites the token another tab is about to present,
    and so that consuming one is a single atomic pop in the store.

    """
    digest = hashlib.sha256(token.encode('utf-8', 'replace')).hexdigest()
    return f'{session_key}:{digest[:32]}'


def store_websocket_token(
    session: MutableMapping[str, Any],
    token: str,
    ttl: float = DEFAULT_TOKEN_TTL,
    session_key: str = 'websocket_token',
    now: float | None = None,
) -> None:
    """Store `token` in `session`, valid for `ttl` seconds.

    Expired tokens are dropped, and so are the oldest ones beyond
    `MAX_OUTSTANDING_TOKENS`.

    """
    if ttl <= 0:
        raise ValueError('the token lifetime must be positive')
    now = time.time() if now is None else now

    outstanding = []
    for key in list(session.keys()):
        if not key.startswith(f'{session_key}:'):
            continue
        expires = _expiry_of(session.get(key))
        if expires is None or expires <= now:
            del session[key]
        else:
            outstanding.append((expires, key))

    outstanding.sort()
    while len(outstanding) >= MAX_OUTSTANDING_TOKENS:
        _, oldest = outstanding.pop(0)
        del session[oldest]

    session[token_key(session_key, token)] = {
        'token': token,
        'expires': now + ttl,
    }


def consume_websocket_token(
    path: str,
    session: MutableMapping[str, Any],
    session_key: str = 'websocket_token',
    now: float | None = None,
) -> str:
    """Pop the token stored in `session` and check the one in `path`.

    The stored token is removed whatever the outcome, so every token is
    good for one handshake only and a wrong guess burns it. `session`
    may be a plain dict holding the token as a string under
    `session_key`, or a session filled by `store_websocket_token`. With
    a store-backed session the pop is atomic across processes: of many
    handshakes presenting one token, exactly one gets it.

    Returns:
        The token, once it matched and had not expired.

    Raises:
        NoWebsocketTokenPresented: the path carries no token.
        NoWebsocketTokenStored: the session holds no token.
        WebsocketTokenMismatch: the tokens differ, or the path is
            malformed (repeated parameter, invalid encoding).
        WebsocketTokenExpired: the token matched but is too old.

    """
    now = time.time() if now is None else now

    try:
        presented = param_from_path('token', path)
    except MissingParameter:
        raise NoWebsocketTokenPresented('no token presented') from None
    except ParameterError:
        _burn(session, session_key)
        raise WebsocketTokenMismatch('malformed token parameter') from None

    stored: Any = None
    if TOKEN_PATTERN.fullmatch(presented):
        stored = session.pop(token_key(session_key, presented), None)
    if stored is None:
        stored = session.pop(session_key, None)

    if stored is None:
        if _burn(session, session_key):
            raise WebsocketTokenMismatch('token does not match')
        raise NoWebsocketTokenStored('no token stored in the session')

    if isinstance(stored, dict):
        expected, expires = stored.get('token'), _expiry_of(stored)
    else:
        expected, expires = stored, None
    if not isinstance(expected, str):
        raise NoWebsocketTokenStored('no token stored in the session')

    # Compare bytes in constant time; a token we issued is plain ASCII,
    # anything else is encoded so that it can only fail to match.
    if not hmac.compare_digest(
        expected.encode('utf-8', 'replace'),
        presented.encode('utf-8', 'replace'),
    ):
        _burn(session, session_key)
        raise WebsocketTokenMismatch('token does not match')

    if expires is not None and expires <= now:
        raise WebsocketTokenExpired('token expired')

    return presented


def _expiry_of(value: Any) -> float | None:
    if isinstance(value, dict):
        expires = value.get('expires')
        if isinstance(expires, int | float):
            return float(expires)
    return None


def _burn(session: MutableMapping[str, Any], session_key: str) -> int:
    """Remove every token held by `session`; return how many there were."""
    burnt = 0
    for key in list(session.keys()):
        if key == session_key or key.startswith(f'{session_key}:'):
            if session.pop(key, None) is not None:
                burnt += 1
    return burnt


# Origins ---------------------------------------------------------------

_DEFAULT_PORTS = {'http': 80, 'https': 443}
_HOST_PATTERN = re.compile(
    r'(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*'
    r'[a-z0-9])?)*)'
)


def validate_origin(origin: str) -> str:
    """Return `origin` if it is written as a browser sends it.

    That is ``scheme://host[:port]`` in lower case, with ``http`` or
    ``https``, no path, no trailing slash and no default port
    (RFC 6454, section 6.2). Exact matching only works if the allowlist
    uses this form.

    Raises:
        ValueError: naming what is wrong and how to write it instead.

    """
    if not isinstance(origin, str) or not origin:
        raise ValueError('an allowed origin must be a non-empty string')
    if '*' in origin:
        raise ValueError(
            f'allowed origin {origin!r} looks like a wildcard; origins are '
            f'matched exactly, use allowed_origin_patterns for patterns'
        )
    if origin != origin.strip() or origin != origin.lower():
        raise ValueError(
            f'allowed origin {origin!r} must be lower case without spaces, '
            f'as browsers send it'
        )

    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(
            f'allowed origin {origin!r} must start with http:// or https://'
        )
    if parts.path or parts.query or parts.fragment or origin.endswith('/'):
        raise ValueError(
            f'allowed origin {origin!r} must not have a path or a trailing '
            f'slash, write it as scheme://host[:port]'
        )
    if parts.username or parts.password:
        raise ValueError(
            f'allowed origin {origin!r} must not contain user information'
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f'allowed origin {origin!r} has an invalid port'
        ) from None
    host = parts.netloc.rsplit(':', 1)[0] if port else parts.netloc
    if not _HOST_PATTERN.fullmatch(host):
        raise ValueError(f'allowed origin {origin!r} has an invalid host')
    if port == _DEFAULT_PORTS[parts.scheme]:
        raise ValueError(
            f'allowed origin {origin!r} names the default port, which '
            f'browsers omit: write {parts.scheme}://{host}'
        )
    return origin


@dataclass(frozen=True)
class OriginPolicy:
    """Which ``Origin`` header values may open a websocket.

    Exact strings are the default; `patterns` are regular expressions
    that must match the whole origin. A missing or empty origin is only
    admitted with `allow_missing`; ``null`` only if listed literally.

    """

    origins: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()
    allow_missing: bool = False

    @classmethod
    def from_config(
        cls,
        origins: Iterable[str] = (),
        patterns: Iterable[str] = (),
        allow_missing: bool = False,
    ) -> OriginPolicy:
        """Build a policy from configuration values, validating each.

        Raises:
            ValueError: for an origin not written as browsers send it,
                or a pattern that is no valid regular expression.

        """
        if isinstance(origins, str) or isinstance(patterns, str):
            raise ValueError('allowed origins and patterns must be lists')

        exact = set()
        for origin in origins:
            exact.add(origin if origin == 'null' else validate_origin(origin))

        compiled = []
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(
                    'an origin pattern must be a non-empty string'
                )
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ValueError(
                    f'origin pattern {pattern!r} is invalid: {exc}'
                ) from None

        if not isinstance(allow_missing, bool):
            raise ValueError('allow_missing_origin must be true or false')
        return cls(frozenset(exact), tuple(compiled), allow_missing)

    def explain(self, origin: str | None) -> tuple[bool, str]:
        """Return whether `origin` is admitted, and why, in words."""
        if origin is None or origin == '':
            if self.allow_missing:
                return True, 'no origin sent, and missing origins are allowed'
            return False, 'no origin sent, and missing origins are refused'
        if origin in self.origins:
            return True, 'listed in allowed_origins'
        if origin == 'null':
            return False, 'the null origin is refused unless listed'
        for pattern in self.patterns:
            if pattern.fullmatch(origin):
                return True, (
                    f'matches the whole of pattern {pattern.pattern!r}'
                )
        return False, 'neither listed nor matched by a pattern'

    def check(self, origin: str | None) -> None:
        """Raise unless `origin` is admitted.

        Raises:
            OriginMissing: no, an empty or a ``null`` origin (403).
            OriginNotAllowed: any other origin not admitted (403).

        """
        admitted, _ = self.explain(origin)
        if admitted:
            return
        if origin is None or origin in ('', 'null'):
            raise OriginMissing('origin missing')
        raise OriginNotAllowed('origin not allowed')
