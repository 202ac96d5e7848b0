"""The admission decision for a websocket handshake, without I/O.

`HandshakeChecker` runs the checks in the order the security model
gives, each refusal with its own HTTP status:

1. the ``Origin`` header against the allowlist (403);
2. the path and the tenant's ``schema`` parameter (404, 400);
3. the ``session_id`` cookie, present and correctly signed for that
   tenant (401);
4. the session, loaded from the shared store (401; 503 when the store is
   down: never admitted unchecked);
5. the one-time token, popped from the session (401).

The token is consumed last, so a refusal for any other reason leaves it
untouched. The store calls are blocking; the server runs `admit` in a
thread.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from onegov.chat.framework import application_id_for
from onegov.chat.integration import WEBSOCKET_PATH
from onegov.chat.security import (
    OriginPolicy,
    WebsocketSecurityError,
    consume_websocket_token,
)
from onegov.chat.session import (
    COOKIE_NAME,
    CookieSigner,
    SessionStore,
    SessionStoreError,
    StoredSession,
)
from onegov.chat.utils import ParameterError, param_from_path


class HandshakeRefused(Exception):
    """Raised when a handshake is not admitted.

    `reason` is a stable slug for logs and metrics, `status` the HTTP
    status of the answer, `text` its one-line body. None of them holds a
    token, a cookie or a query string.

    """

    def __init__(self, reason: str, status: int, text: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Principal:
    """Who an admitted connection belongs to, from the server session."""

    application_id: str
    schema: str
    session_id: str
    data: dict[str, Any]

    @property
    def role(self) -> str:
        role = self.data.get('role')
        return role if isinstance(role, str) and role else 'customer'


def cookie_values(headers: Sequence[str], name: str) -> list[str]:
    """Return every value of cookie `name` in the ``Cookie`` headers."""
    values = []
    for header in headers:
        for pair in header.split(';'):
            key, sep, value = pair.strip().partition('=')
            if sep and key.strip() == name:
                values.append(value.strip().strip('"'))
    return values


class HandshakeChecker:
    """Decides whether a handshake request is admitted."""

    def __init__(
        self,
        identity_secret: str,
        store: SessionStore,
        policy: OriginPolicy,
    ) -> None:
        self.identity_secret = identity_secret
        self.store = store
        self.policy = policy
        self._signers: dict[str, CookieSigner] = {}

    def signer(self, application_id: str) -> CookieSigner:
        signer = self._signers.get(application_id)
        if signer is None:
            signer = CookieSigner(self.identity_secret, application_id)
            self._signers[application_id] = signer
        return signer

    def check_origin(self, origins: Sequence[str]) -> None:
        """Raise `HandshakeRefused` unless the origin is admitted."""
        if len(origins) > 1:
            raise HandshakeRefused(
                'origin_repeated', 403, 'more than one origin'
            )
        try:
            self.policy.check(origins[0] if origins else None)
        except WebsocketSecurityError as exc:
            raise HandshakeRefused(exc.reason, exc.status, str(exc)) from None

    def tenant(self, path: str) -> tuple[str, str]:
        """Return the schema and application id named by `path`."""
        if path.partition('?')[0] != WEBSOCKET_PATH:
            raise HandshakeRefused('path_unknown', 404, 'unknown path')
        try:
            schema = param_from_path('schema', path)
            return schema, application_id_for(schema)
        except (ParameterError, ValueError):
            raise HandshakeRefused(
                'schema_invalid', 400, 'missing or invalid schema'
            ) from None

    def session_id(self, application_id: str, cookies: Sequence[str]) -> str:
        """Return the verified session id from the ``Cookie`` headers."""
        values = cookie_values(cookies, COOKIE_NAME)
        if not values:
            raise HandshakeRefused(
                'cookie_missing', 401, 'no session cookie'
            )
        if len(values) > 1:
            raise HandshakeRefused(
                'cookie_repeated', 401, 'more than one session cookie'
            )
        session_id = self.signer(application_id).unsign(values[0])
        if session_id is None:
            raise HandshakeRefused(
                'cookie_invalid', 401, 'invalid session cookie'
            )
        return session_id

    def admit(
        self, path: str, origins: Sequence[str], cookies: Sequence[str]
    ) -> Principal:
        """Run every check in order; return who is admitted.

        Raises:
            HandshakeRefused: with the reason and status of the first
                check that failed.

        """
        self.check_origin(origins)
        schema, application_id = self.tenant(path)
        session_id = self.session_id(application_id, cookies)

        try:
            session = StoredSession.load(
                self.store, application_id, session_id
            )
            if not session:
                raise HandshakeRefused(
                    'session_unknown', 401, 'unknown or expired session'
                )
            consume_websocket_token(path, session)
        except WebsocketSecurityError as exc:
            raise HandshakeRefused(exc.reason, exc.status, str(exc)) from None
        except SessionStoreError:
            raise HandshakeRefused(
                'store_unavailable', 503, 'session store unavailable'
            ) from None

        return Principal(
            application_id=application_id,
            schema=schema,
            session_id=session_id,
            data={
                key: value for key, value in session.items()
                if not key.startswith('websocket_token')
            },
        )
