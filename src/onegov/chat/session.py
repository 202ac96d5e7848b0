"""Server-side browser sessions in a store that several processes share.

The browser only holds a random session id, signed with a key derived
from ``identity_secret`` and the tenant's application id, in the
``session_id`` cookie. The data lives in a store: a SQLite file by
default (no server needed, safe for several processes), Redis in
production, or memory for unit tests. The web app writes to it, the
websocket server reads it and pops tokens from it.

Each session key is stored on its own, so that popping one key (a
websocket token) is a single atomic operation in the store: a ``DELETE
... RETURNING`` in SQLite, a ``MULTI``/``EXEC`` of ``HGET`` and ``HDEL``
in Redis.

"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, Signer

#: The name of the cookie that carries the signed session id.
COOKIE_NAME = 'session_id'

#: How long a session lives without being written to, in seconds.
DEFAULT_SESSION_TTL = 24 * 60 * 60


class SessionStoreError(Exception):
    """Raised when the session store cannot be reached or answers badly.

    The websocket server turns it into a 503: a handshake is never
    admitted without its session check.

    """


def new_session_id() -> str:
    """Return a fresh, unguessable session id."""
    return secrets.token_urlsafe(32)


def derive_key(identity_secret: str, purpose: str, application_id: str) -> str:
    """Derive a key for one purpose and one tenant from the secret.

    Separate keys per tenant mean a cookie signed for one tenant does not
    verify on another, even though all share ``identity_secret``.

    """
    message = f'onegov.chat {purpose} {application_id}'.encode()
    return hmac.new(
        identity_secret.encode(), message, hashlib.sha256
    ).hexdigest()


class CookieSigner:
    """Signs and verifies session ids for one tenant."""

    def __init__(self, identity_secret: str, application_id: str) -> None:
        key = derive_key(identity_secret, 'session', application_id)
        self._signer = Signer(
            key, salt=COOKIE_NAME, digest_method=hashlib.sha256
        )

    def sign(self, session_id: str) -> str:
        return self._signer.sign(session_id).decode('ascii')

    def unsign(self, value: str) -> str | None:
        """Return the session id in `value`, or None if the signature is
        wrong or the value is malformed."""
        try:
            session_id = self._signer.unsign(value).decode('ascii')
        except (BadSignature, UnicodeError, ValueError):
            return None
        return session_id or None


# Stores ----------------------------------------------------------------


class SessionStore(ABC):
    """The shared store behind the browser sessions.

    `namespace` is the tenant's application id; `session_id` the id from
    the cookie. Values are anything JSON can hold.

    """

    def __init__(self, ttl: float = DEFAULT_SESSION_TTL) -> None:
        if ttl <= 0:
            raise ValueError('the session lifetime must be positive')
        self.ttl = ttl

    @abstractmethod
    def load(self, namespace: str, session_id: str) -> dict[str, Any]:
        """Return the session's data; empty if unknown or expired."""

    @abstractmethod
    def write(
        self,
        namespace: str,
        session_id: str,
        changed: Mapping[str, Any],
        deleted: Iterable[str] = (),
    ) -> None:
        """Set `changed`, remove `deleted` and renew the session's life."""

    @abstractmethod
    def pop(self, namespace: str, session_id: str, key: str) -> Any:
        """Remove `key` and return its value (None if absent), atomically."""

    @abstractmethod
    def delete(self, namespace: str, session_id: str) -> None:
        """Remove the whole session."""

    @abstractmethod
    def ping(self) -> None:
        """Raise `SessionStoreError` unless the store answers."""

    @abstractmethod
    def put_status(self, replica: str, status: Any, ttl: float) -> None:
        """Keep what a server replica reports about itself, for `ttl`."""

    @abstractmethod
    def statuses(self) -> list[Any]:
        """What the running replicas reported, newest first."""

    def close(self) -> None:  # noqa: B027 (optional to override)
        """Release connections."""


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(',', ':'))


def _decode(value: str | bytes | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        # A value we cannot read counts as absent; it was not ours.
        return None


def _decode_all(items: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """Decode a session's values, leaving out those we cannot read."""
    data: dict[str, Any] = {}
    for key, value in items:
        try:
            name = key.decode() if isinstance(key, bytes) else key
            data[name] = json.loads(value)
        except ValueError:
            continue
    return data


class MemoryStore(SessionStore):
    """A store in this process only: for unit tests, never for serving."""

    def __init__(self, ttl: float = DEFAULT_SESSION_TTL) -> None:
        super().__init__(ttl)
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self._status: dict[str, tuple[float, Any]] = {}

    def _live(self, namespace: str, session_id: str) -> dict[str, str]:
        expires, data = self._data.get((namespace, session_id), (0.0, {}))
        if expires <= time.time():
            self._data.pop((namespace, session_id), None)
            return {}
        return data

    def load(self, namespace: str, session_id: str) -> dict[str, Any]:
        with self._lock:
            return _decode_all(self._live(namespace, session_id).items())

    def write(
        self,
        namespace: str,
        session_id: str,
        changed: Mapping[str, Any],
        deleted: Iterable[str] = (),
    ) -> None:
        with self._lock:
            data = dict(self._live(namespace, session_id))
            data.update({k: _encode(v) for k, v in changed.items()})
            for key in deleted:
                data.pop(key, None)
            self._data[(namespace, session_id)] = (
                time.time() + self.ttl, data
            )

    def pop(self, namespace: str, session_id: str, key: str) -> Any:
        with self._lock:
            return _decode(self._live(namespace, session_id).pop(key, None))

    def delete(self, namespace: str, session_id: str) -> None:
        with self._lock:
            self._data.pop((namespace, session_id), None)

    def ping(self) -> None:
        return None

    def put_status(self, replica: str, status: Any, ttl: float) -> None:
        with self._lock:
            self._status[replica] = (time.time() + ttl, status)

    def statuses(self) -> list[Any]:
        now = time.time()
        with self._lock:
            return [
                status for expires, status in self._status.values()
                if expires > now
            ]


class SQLiteStore(SessionStore):
    """A store in a SQLite file, shared by every process on the machine.

    One row per session key. SQLite serialises writers, and a single
    ``DELETE ... RETURNING`` statement pops a key atomically, so two
    processes can never both get the same token.

    """

    def __init__(self, path: str, ttl: float = DEFAULT_SESSION_TTL) -> None:
        super().__init__(ttl)
        self.path = path
        self._local = threading.local()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with self._transaction() as connection:
            connection.execute(
                'CREATE TABLE IF NOT EXISTS session_data ('
                ' namespace TEXT NOT NULL,'
                ' session_id TEXT NOT NULL,'
                ' key TEXT NOT NULL,'
                ' value TEXT NOT NULL,'
                ' expires REAL NOT NULL,'
                ' PRIMARY KEY (namespace, session_id, key)'
                ') WITHOUT ROWID'
            )
            connection.execute(
                'CREATE TABLE IF NOT EXISTS replica_status ('
                ' replica TEXT PRIMARY KEY,'
                ' status TEXT NOT NULL,'
                ' expires REAL NOT NULL'
                ')'
            )

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(
            self._local, 'connection', None
        )
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None,
                check_same_thread=False
            )
            connection.execute('PRAGMA journal_mode=WAL')
            connection.execute('PRAGMA synchronous=NORMAL')
            self._local.connection = connection
        return connection

    def _transaction(self) -> _SQLiteTransaction:
        return _SQLiteTransaction(self._connection())

    def load(self, namespace: str, session_id: str) -> dict[str, Any]:
        try:
            rows = self._connection().execute(
                'SELECT key, value FROM session_data'
                ' WHERE namespace = ? AND session_id = ? AND expires > ?',
                (namespace, session_id, time.time()),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SessionStoreError('session store failed') from exc
        return _decode_all(rows)

    def write(
        self,
        namespace: str,
        session_id: str,
        changed: Mapping[str, Any],
        deleted: Iterable[str] = (),
    ) -> None:
        now = time.time()
        expires = now + self.ttl
        with self._transaction() as connection:
            connection.executemany(
                'INSERT INTO session_data VALUES (?, ?, ?, ?, ?)'
                ' ON CONFLICT DO UPDATE SET'
                ' value = excluded.value, expires = excluded.expires',
                [
                    (namespace, session_id, key, _encode(value), expires)
                    for key, value in changed.items()
                ],
            )
            connection.executemany(
                'DELETE FROM session_data'
                ' WHERE namespace = ? AND session_id = ? AND key = ?',
                [(namespace, session_id, key) for key in deleted],
            )
            connection.execute(
                'UPDATE session_data SET expires = ?'
                ' WHERE namespace = ? AND session_id = ? AND expires > ?',
                (expires, namespace, session_id, now),
            )

            # Sweep what expired now and then, rather than on every write.
            if secrets.randbelow(100) == 0:
                connection.execute(
                    'DELETE FROM session_data WHERE expires <= ?', (now,)
                )

    def pop(self, namespace: str, session_id: str, key: str) -> Any:
        try:
            row = self._connection().execute(
                'DELETE FROM session_data'
                ' WHERE namespace = ? AND session_id = ? AND key = ?'
                ' AND expires > ? RETURNING value',
                (namespace, session_id, key, time.time()),
            ).fetchone()
        except sqlite3.Error as exc:
            raise SessionStoreError('session store failed') from exc
        return _decode(row[0]) if row else None

    def delete(self, namespace: str, session_id: str) -> None:
        with self._transaction() as connection:
            connection.execute(
                'DELETE FROM session_data'
                ' WHERE namespace = ? AND session_id = ?',
                (namespace, session_id),
            )

    def ping(self) -> None:
        try:
            self._connection().execute('SELECT 1').fetchone()
        except sqlite3.Error as exc:
            raise SessionStoreError('session store failed') from exc

    def put_status(self, replica: str, status: Any, ttl: float) -> None:
        now = time.time()
        with self._transaction() as connection:
            connection.execute(
                'INSERT INTO replica_status VALUES (?, ?, ?)'
                ' ON CONFLICT DO UPDATE SET'
                ' status = excluded.status, expires = excluded.expires',
                (replica, _encode(status), now + ttl),
            )
            connection.execute(
                'DELETE FROM replica_status WHERE expires <= ?', (now,)
            )

    def statuses(self) -> list[Any]:
        try:
            rows = self._connection().execute(
                'SELECT status FROM replica_status WHERE expires > ?'
                ' ORDER BY expires DESC',
                (time.time(),),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SessionStoreError('session store failed') from exc
        return [_decode(row[0]) for row in rows]

    def close(self) -> None:
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class _SQLiteTransaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any error."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.connection.execute('BEGIN IMMEDIATE')
        except sqlite3.Error as exc:
            raise SessionStoreError('session store failed') from exc
        return self.connection

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.connection.execute('COMMIT')
                return
            except sqlite3.Error as error:
                self.connection.execute('ROLLBACK')
                raise SessionStoreError('session store failed') from error
        self.connection.execute('ROLLBACK')
        if isinstance(exc, sqlite3.Error):
            raise SessionStoreError('session store failed') from exc


class RedisStore(SessionStore):
    """A store in Redis: one hash per session, expiring as a whole."""

    def __init__(
        self,
        url: str,
        ttl: float = DEFAULT_SESSION_TTL,
        prefix: str = 'onegov.chat:session',
    ) -> None:
        super().__init__(ttl)
        import redis

        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0,
            health_check_interval=30
        )
        self.prefix = prefix

    def _key(self, namespace: str, session_id: str) -> str:
        return f'{self.prefix}:{namespace}:{session_id}'

    def load(self, namespace: str, session_id: str) -> dict[str, Any]:
        try:
            data = self.client.hgetall(self._key(namespace, session_id))
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc
        return _decode_all(data.items())

    def write(
        self,
        namespace: str,
        session_id: str,
        changed: Mapping[str, Any],
        deleted: Iterable[str] = (),
    ) -> None:
        key = self._key(namespace, session_id)
        deleted = list(deleted)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                if changed:
                    pipe.hset(key, mapping={
                        k: _encode(v) for k, v in changed.items()
                    })
                if deleted:
                    pipe.hdel(key, *deleted)
                pipe.expire(key, max(1, int(self.ttl)))
                pipe.execute()
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc

    def pop(self, namespace: str, session_id: str, key: str) -> Any:
        name = self._key(namespace, session_id)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hget(name, key)
                pipe.hdel(name, key)
                value, _ = pipe.execute()
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc
        return _decode(value)

    def delete(self, namespace: str, session_id: str) -> None:
        try:
            self.client.delete(self._key(namespace, session_id))
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc

    def ping(self) -> None:
        try:
            self.client.ping()
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc

    def put_status(self, replica: str, status: Any, ttl: float) -> None:
        try:
            self.client.set(
                f'{self.prefix}-replica:{replica}', _encode(status),
                ex=max(1, int(ttl)),
            )
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc

    def statuses(self) -> list[Any]:
        try:
            keys = list(self.client.scan_iter(f'{self.prefix}-replica:*'))
            values = self.client.mget(keys) if keys else []
        except self._errors as exc:
            raise SessionStoreError('session store failed') from exc
        return [_decode(value) for value in values if value is not None]

    def close(self) -> None:
        self.client.close()


def store_from_url(url: str, ttl: float = DEFAULT_SESSION_TTL) -> SessionStore:
    """Return the store named by `url`.

    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
    ``redis://host:port/db`` (or ``rediss://``), or ``memory://`` for
    unit tests.

    Raises:
        ValueError: for any other URL.

    """
    if not isinstance(url, str):
        raise ValueError('session_store must be a URL string')
    scheme = urlsplit(url).scheme
    if scheme == 'sqlite':
        path = url[len('sqlite:///'):] if url.startswith('sqlite:///') else ''
        if not path:
            raise ValueError(
                'session_store sqlite URLs look like sqlite:///path/to/file'
            )
        return SQLiteStore(path, ttl)
    if scheme in ('redis', 'rediss', 'unix'):
        return RedisStore(url, ttl)
    if scheme == 'memory':
        return MemoryStore(ttl)
    raise ValueError(
        'session_store must start with sqlite:///, redis:// or memory://'
    )


# Sessions --------------------------------------------------------------


class StoredSession(MutableMapping[str, Any]):
    """A session as the websocket server sees it: read once, popped live.

    Reads come from the snapshot taken at load; `pop` and deletion go to
    the store at once and atomically, which is what token consumption
    needs.

    """

    def __init__(
        self,
        store: SessionStore,
        namespace: str,
        session_id: str,
        data: dict[str, Any],
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.session_id = session_id
        self._data = data

    @classmethod
    def load(
        cls, store: SessionStore, namespace: str, session_id: str
    ) -> StoredSession:
        return cls(
            store, namespace, session_id, store.load(namespace, session_id)
        )

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.store.write(self.namespace, self.session_id, {key: value})
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        if self.pop(key, None) is None:
            raise KeyError(key)

    def pop(self, key: str, default: Any = None) -> Any:
        self._data.pop(key, None)
        value = self.store.pop(self.namespace, self.session_id, key)
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class BrowserSession(MutableMapping[str, Any]):
    """A session as a web request sees it: changes are written at commit.

    The host framework joins the session to the request's transaction on
    the first change; nothing is written when the request fails. A new
    session gets its id (and its cookie) only once something is stored.

    """

    def __init__(
        self,
        store: SessionStore,
        namespace: str,
        session_id: str | None = None,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.session_id = session_id
        self._data = store.load(namespace, session_id) if session_id else {}
        self._changed: dict[str, Any] = {}
        self._deleted: set[str] = set()
        self._previous_id: str | None = None
        self._invalidated = False
        #: Called on every change; the framework joins the transaction.
        self.on_change: Any = None
        #: The transaction this session has joined, if any.
        self.joined: Any = None

        #: What the response must do with the cookie: None, 'set' or
        #: 'delete'. Filled in once the changes are written.
        self.cookie_action: str | None = None

    def _touch(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._changed[key] = value
        self._deleted.discard(key)
        self._touch()

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._changed.pop(key, None)
        self._deleted.add(key)
        self._touch()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def dirty(self) -> bool:
        return bool(
            self._changed or self._deleted or self._invalidated
            or self._previous_id
        )

    def rotate(self) -> None:
        """Move the data to a new session id at commit.

        Call this on every change of privilege (a login), so that an id
        planted in the browser beforehand is worth nothing afterwards.

        """
        if self.session_id and not self._previous_id:
            self._previous_id = self.session_id
        self.session_id = None
        self._touch()

    def invalidate(self) -> None:
        """Remove the whole session at commit (a logout)."""
        self._data.clear()
        self._changed.clear()
        self._deleted.clear()
        self._invalidated = True
        self._touch()

    def flush(self) -> None:
        """Write the pending changes to the store."""
        if self._invalidated:
            for session_id in (self.session_id, self._previous_id):
                if session_id:
                    self.store.delete(self.namespace, session_id)
            self.session_id = self._previous_id = None
            self._invalidated = False
            if not self._changed:
                self._deleted.clear()
                self.cookie_action = 'delete'
                return
            # What was stored after the logout goes into a fresh session;
            # the old id must not come back to life with it.

        if self._previous_id:
            self.session_id = new_session_id()
            self.store.write(self.namespace, self.session_id, self._data)
            self.store.delete(self.namespace, self._previous_id)
            self._previous_id = None
            self.cookie_action = 'set'
        elif self._changed or self._deleted:
            if self.session_id is None:
                self.session_id = new_session_id()
                self.cookie_action = 'set'
            self.store.write(
                self.namespace, self.session_id, self._changed, self._deleted
            )
        self._changed.clear()
        self._deleted.clear()

    def discard(self) -> None:
        """Forget the pending changes (the transaction was aborted)."""
        self._changed.clear()
        self._deleted.clear()
        self._invalidated = False
        if self._previous_id:
            self.session_id = self._previous_id
            self._previous_id = None
