"""A small mirror of the parts of OneGov's host framework the chat needs.

``onegov.core`` cannot be installed on current Python, so this module
gives the chat, its tests and its demo the same shape:

* `Framework`, a Morepath app with more.transaction, whose requests have
  a server-side `browser_session` that is written when the request's
  transaction commits, and nothing of it when the request fails;
* ``app.configure_application(**cfg)``, which calls every
  ``configure_<name>(**cfg)`` hook of the app and its mixins;
* multi-tenancy: one app class, many instances, each with its own
  application id (``namespace/name``) and schema (``namespace-name``);
  session data and signing keys are separate for each tenant.

"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import morepath
import transaction
from more.transaction.main import transaction_tween_factory
from morepath.reify import reify

from onegov.chat.session import (
    COOKIE_NAME,
    BrowserSession,
    CookieSigner,
    SessionStore,
    store_from_url,
)

if not TYPE_CHECKING:
    from more.transaction import TransactionApp
else:
    from sqlalchemy.orm import Session, scoped_session

    # more.transaction has no type information; to the type checker its
    # app is a plain Morepath app, which is all it adds to the API.
    TransactionApp = morepath.App

#: An application id: ``namespace/name``, lower case.
APPLICATION_ID = re.compile(r'([a-z0-9_]+)/([a-z0-9_][a-z0-9_-]*)')

#: The schema form of an application id: ``namespace-name``.
SCHEMA = re.compile(r'([a-z0-9_]+)-([a-z0-9_][a-z0-9_-]*)')

#: The smallest ``identity_secret`` we accept, in characters.
MIN_SECRET_LENGTH = 32


def schema_for(application_id: str) -> str:
    """Return the schema form of `application_id`.

    Raises:
        ValueError: if `application_id` is not ``namespace/name``.

    """
    if not APPLICATION_ID.fullmatch(application_id or ''):
        raise ValueError(
            'an application id looks like namespace/name, in lower case '
            'letters, digits, underscores (and hyphens in the name)'
        )
    return application_id.replace('/', '-', 1)


def application_id_for(schema: str) -> str:
    """Return the application id whose schema form is `schema`.

    Raises:
        ValueError: if `schema` is not ``namespace-name``.

    """
    if not SCHEMA.fullmatch(schema or ''):
        raise ValueError('invalid schema')
    return schema.replace('-', '/', 1)


def validate_identity_secret(secret: Any) -> str:
    """Return `secret` if it is long enough to sign with.

    Raises:
        ValueError: if it is missing or shorter than 32 characters.

    """
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f'identity_secret must be a random string of at least '
            f'{MIN_SECRET_LENGTH} characters, for example the output of '
            f'python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return secret


class CoreRequest(morepath.Request):
    """The request of a `Framework` app."""

    app: Framework

    @reify
    def browser_session(self) -> BrowserSession:
        """The server-side session of this browser, for this tenant."""
        app = self.app
        session_id = None
        cookie = self.cookies.get(COOKIE_NAME)
        if cookie:
            session_id = app.cookie_signer.unsign(cookie)

        session = BrowserSession(
            app.session_store, app.application_id, session_id
        )
        session.on_change = _join_transaction
        return session

    @reify
    def content_security_policy(self) -> dict[str, set[str]]:
        """The directives of this response's Content-Security-Policy.

        Mixins add their sources here (the chat adds its websocket
        endpoint to ``connect-src``); the header is written at the end of
        the request.

        """
        return {
            'default-src': {"'self'"},
            'connect-src': {"'self'"},
            'img-src': {"'self'", 'data:'},
            'frame-ancestors': {"'none'"},
            'base-uri': {"'self'"},
            'form-action': {"'self'"},
            'object-src': {"'none'"},
        }

    def db(self) -> Session:
        """The database session of this request's tenant."""
        return self.app.db()


class Framework(TransactionApp):
    """The base of a OneGov-style host application.

    Instances are tenants: configure one with `configure_application`,
    then give it its id with `set_application_id`.

    """

    request_class = CoreRequest

    application_id: str
    schema: str
    identity_secret: str
    session_store: SessionStore
    cookie_signer: CookieSigner
    dsn: str | None = None
    _db: scoped_session[Session] | None = None

    def configure_application(self, **cfg: Any) -> None:
        """Call every ``configure_<name>(**cfg)`` hook, once each.

        Hooks run in reverse method resolution order: those of the
        classes furthest from the app class first. Each takes what it
        needs from `cfg` and ignores the rest.

        """
        # Each class after its own bases, bases left to right: in
        # ``class TownApp(Framework, ChatApp)`` the framework's hooks run
        # before the mixin's. The reversed MRO would put ChatApp's first.
        classes: list[type] = []

        def visit(cls: type) -> None:
            for base in cls.__bases__:
                visit(base)
            if cls not in classes:
                classes.append(cls)

        visit(type(self))

        seen: set[str] = set()
        hooks: list[Callable[..., None]] = []
        for cls in classes:
            for name in vars(cls):
                if name.startswith('configure_') and name not in seen:
                    if name == 'configure_application':
                        continue
                    seen.add(name)
                    hooks.append(getattr(self, name))

        for hook in hooks:
            hook(**cfg)

    def configure_session(
        self,
        *,
        identity_secret: str | None = None,
        session_store: str | SessionStore = 'memory://',
        session_ttl: float | None = None,
        **cfg: Any,
    ) -> None:
        """Set up signing and the shared session store.

        Raises:
            ValueError: for a short secret or an unknown store URL.

        """
        self.identity_secret = validate_identity_secret(identity_secret)
        if isinstance(session_store, SessionStore):
            self.session_store = session_store
        elif session_ttl is not None:
            self.session_store = store_from_url(session_store, session_ttl)
        else:
            self.session_store = store_from_url(session_store)

    def configure_dsn(self, *, dsn: str | None = None, **cfg: Any) -> None:
        """Set up the database given by `dsn`, if any."""
        self.dsn = dsn
        self._db = None

    def db(self) -> Session:
        """The database session, joined to the current transaction."""
        if self._db is None:
            if not self.dsn:
                raise RuntimeError('this application has no dsn configured')
            from onegov.chat.database import transactional_session

            self._db = transactional_session(self.dsn)
        return self._db()

    def dispose(self) -> None:
        """Close the database connections and the session store."""
        if self._db is not None:
            self._db.remove()
            self._db.session_factory.kw['bind'].dispose()
            self._db = None
        self.session_store.close()

    def set_application_id(self, application_id: str) -> None:
        """Make this instance the tenant `application_id`.

        Raises:
            ValueError: if the id is not ``namespace/name``.

        """
        self.schema = schema_for(application_id)
        self.application_id = application_id
        self.cookie_signer = CookieSigner(
            self.identity_secret, application_id
        )


class _SessionDataManager:
    """Writes a browser session when the request's transaction commits.

    It votes after the database (sort key) so that a failed database
    commit leaves the session untouched.

    """

    def __init__(self, session: BrowserSession) -> None:
        self.session = session
        self.transaction_manager = transaction.manager

    def sortKey(self) -> str:  # the name is the transaction API's
        return '~~onegov.chat.session'

    def abort(self, txn: Any) -> None:
        self.session.discard()

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        self.session.flush()

    def tpc_finish(self, txn: Any) -> None:
        pass

    def tpc_abort(self, txn: Any) -> None:
        self.session.discard()


def _join_transaction(session: BrowserSession) -> None:
    current = transaction.get()
    if session.joined is not current:
        current.join(_SessionDataManager(session))
        session.joined = current


@Framework.tween_factory(over=transaction_tween_factory)
def session_cookie_tween_factory(
    app: Framework, handler: Callable[[CoreRequest], morepath.Response]
) -> Callable[[CoreRequest], morepath.Response]:
    """Sets or deletes the session cookie once the session was written,
    and writes the Content-Security-Policy header."""

    def session_cookie_tween(request: CoreRequest) -> morepath.Response:
        response = handler(request)

        session = request.__dict__.get('browser_session')
        if session is not None and session.cookie_action == 'set':
            response.set_cookie(
                COOKIE_NAME,
                app.cookie_signer.sign(session.session_id),
                httponly=True,
                samesite='Lax',
                secure=request.scheme == 'https',
                path='/',
            )
        elif session is not None and session.cookie_action == 'delete':
            response.delete_cookie(COOKIE_NAME, path='/')

        if 'Content-Security-Policy' not in response.headers:
            policy = request.content_security_policy
            response.headers['Content-Security-Policy'] = '; '.join(
                f'{name} {" ".join(sorted(sources))}'
                for name, sources in sorted(policy.items())
            )
        response.headers.setdefault('X-Content-Type-Options', 'nosniff')
        return response

    return session_cookie_tween
