"""Functional tests of ChatApp mixed into the host framework, via WebTest."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import morepath
import pytest
import transaction
from webob.exc import HTTPBadRequest
from webtest import TestApp, TestResponse

from conftest import TENANT, TownApp
from onegov.chat.framework import Framework
from onegov.chat.integration import ChatApp
from onegov.chat.security import (
    NoWebsocketTokenStored,
    consume_websocket_token,
    token_key,
)
from onegov.chat.session import (
    RedisStore,
    SessionStore,
    SQLiteStore,
    StoredSession,
    store_from_url,
)

AppFactory = Callable[..., TownApp]


@pytest.fixture
def dsn(tmp_path: Path) -> str:
    """The chat's database plays no part here: a SQLite file will do."""
    return f'sqlite:///{tmp_path}/chat.db'


@pytest.fixture
def make_app(settings: dict[str, Any]) -> Iterator[AppFactory]:
    """Build configured tenants of fresh host app classes.

    ``make_app(setup, application_id, **overrides)`` subclasses TownApp,
    lets `setup` register views on the subclass, commits it and
    configures an instance with `settings` and `overrides`.

    """
    apps: list[TownApp] = []

    def make(
        setup: Callable[[type[TownApp]], None] | None = None,
        application_id: str = TENANT,
        **overrides: Any,
    ) -> TownApp:
        class App(TownApp):
            pass

        if setup is not None:
            setup(App)
        App.commit()
        app = App()
        app.configure_application(**{**settings, **overrides})
        app.set_application_id(application_id)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.dispose()


class Recording(SessionStore):
    """Notes each change made to the store it is mixed into."""

    changes: list[tuple[str, str]]

    def write(
        self,
        namespace: str,
        session_id: str,
        changed: Mapping[str, Any],
        deleted: Iterable[str] = (),
    ) -> None:
        self.changes.append(('write', session_id))
        super().write(namespace, session_id, changed, deleted)

    def pop(self, namespace: str, session_id: str, key: str) -> Any:
        self.changes.append(('pop', session_id))
        return super().pop(namespace, session_id, key)

    def delete(self, namespace: str, session_id: str) -> None:
        self.changes.append(('delete', session_id))
        super().delete(namespace, session_id)


class RecordingSQLiteStore(Recording, SQLiteStore):
    pass


class RecordingRedisStore(Recording, RedisStore):
    pass


@pytest.fixture
def recording_store(settings: dict[str, Any]) -> Recording:
    """The store of `settings`, noting every change made to it."""
    url = settings['session_store']
    store: Recording
    if url.startswith('sqlite:///'):
        store = RecordingSQLiteStore(url.removeprefix('sqlite:///'))
    else:
        store = RecordingRedisStore(url)
    store.changes = []
    return store


class Page:
    """A plain page of the host application."""


def with_page(app_class: type[TownApp]) -> None:
    @app_class.path(model=Page, path='/page')
    def get_page() -> Page:
        return Page()

    @app_class.html(model=Page)
    def view_page(self: Page, request: morepath.Request) -> str:
        return '<p>A page of the town.</p>'


class Failure:
    """A view that writes to the session, then ends as `how` says."""

    def __init__(self, how: str) -> None:
        self.how = how


def with_failure(app_class: type[TownApp]) -> None:
    @app_class.path(model=Failure, path='/fail/{how}')
    def get_failure(how: str) -> Failure:
        return Failure(how)

    @app_class.view(model=Failure)
    def view_failure(
        self: Failure, request: morepath.Request
    ) -> morepath.Response:
        request.browser_session['written'] = self.how
        if self.how == 'raise':
            raise RuntimeError('the view failed')
        if self.how == 'http-error':
            raise HTTPBadRequest()
        if self.how == 'doomed':
            transaction.get().doom()
        status = {'400': 400, '500': 500}.get(self.how, 200)
        return morepath.Response('done', status=status)


def session_data(app: TownApp, cookie: str) -> dict[str, Any]:
    """The stored session of the browser holding `cookie`."""
    session_id = app.cookie_signer.unsign(cookie)
    assert session_id is not None
    return app.session_store.load(app.application_id, session_id)


def cookie_attributes(response: TestResponse) -> tuple[str, dict[str, str]]:
    """The value and the attributes of the one session cookie set."""
    [header] = response.headers.getall('Set-Cookie')
    pair, *attributes = header.split(';')
    name, _, value = pair.partition('=')
    assert name == 'session_id'
    parsed = {}
    for attribute in attributes:
        key, _, setting = attribute.strip().partition('=')
        parsed[key.lower()] = setting
    return value, parsed


def csp(response: TestResponse) -> dict[str, list[str]]:
    """The directives of the response's Content-Security-Policy."""
    header = response.headers['Content-Security-Policy']
    directives = {}
    for directive in header.split(';'):
        name, *sources = directive.split()
        directives[name] = sources
    return directives


# /chat/token ---------------------------------------------------------


@pytest.mark.parametrize(('host', 'endpoint'), [
    ('town.test', 'ws://town.test:8765/chats'),
    ('town.test:8080', 'ws://town.test:8765/chats'),
    ('127.0.0.1:8080', 'ws://127.0.0.1:8765/chats'),
    ('[::1]:8080', 'ws://[::1]:8765/chats'),
    ('[::1]', 'ws://[::1]:8765/chats'),
])
def test_token_view(client: TestApp, host: str, endpoint: str) -> None:
    """The token view answers the token and the URL to connect with."""
    response = client.get('/chat/token', extra_environ={'HTTP_HOST': host})

    assert response.content_type == 'application/json'
    assert set(response.json) == {'token', 'url'}
    token = response.json['token']
    assert response.json['url'] == (
        f'{endpoint}?token={token}&schema=town-govikon'
    )


def test_token_view_uses_websocket_port(make_app: AppFactory) -> None:
    """The URL names the configured websocket port."""
    client = TestApp(make_app(websocket_port=9999))

    response = client.get(
        '/chat/token', extra_environ={'HTTP_HOST': 'town.test'}
    )

    assert response.json['url'].startswith('ws://town.test:9999/chats?')


@pytest.mark.parametrize(('url', 'environ'), [
    ('/chat/token', {'wsgi.url_scheme': 'https', 'HTTP_HOST': 'town.test'}),
    ('https://town.test/chat/token', {}),
])
def test_token_view_under_https(
    client: TestApp, url: str, environ: dict[str, str]
) -> None:
    """A page served over https is told to connect with wss://."""
    response = client.get(url, extra_environ=environ)

    token = response.json['token']
    assert response.json['url'] == (
        f'wss://town.test:8765/chats?token={token}&schema=town-govikon'
    )


@pytest.mark.parametrize(('websocket_url', 'scheme', 'expected'), [
    ('wss://chat.town.test/chats', 'http', 'wss://chat.town.test/chats'),
    ('ws://chat.town.test:9000/ws', 'http', 'ws://chat.town.test:9000/ws'),
    ('ws://chat.town.test:9000/ws', 'https', 'wss://chat.town.test:9000/ws'),
])
def test_configured_websocket_url(
    make_app: AppFactory, websocket_url: str, scheme: str, expected: str
) -> None:
    """A configured websocket_url is used, upgraded to wss under https."""
    client = TestApp(make_app(websocket_url=websocket_url))

    response = client.get(
        '/chat/token', extra_environ={'wsgi.url_scheme': scheme}
    )

    token = response.json['token']
    assert response.json['url'] == (
        f'{expected}?token={token}&schema=town-govikon'
    )
    origin = expected.rsplit('/', 1)[0]
    assert origin in csp(response)['connect-src']


def test_token_is_stored_in_the_session(
    town_app: TownApp, client: TestApp
) -> None:
    """The token lives in the server-side session, not in the cookie."""
    response = client.get('/chat/token')
    token = response.json['token']
    cookie = client.cookies['session_id']

    assert session_data(town_app, cookie) == {
        token_key('websocket_token', token): {
            'token': token,
            'expires': pytest.approx(time.time() + 60, abs=5),
        }
    }
    assert token not in cookie
    assert token not in str(response.headers)


def test_stored_token_admits_one_handshake(
    town_app: TownApp, client: TestApp
) -> None:
    """The websocket side can consume the issued token exactly once."""
    url = urlsplit(client.get('/chat/token').json['url'])
    path = f'{url.path}?{url.query}'
    session_id = town_app.cookie_signer.unsign(client.cookies['session_id'])
    assert session_id is not None

    def session() -> StoredSession:
        return StoredSession.load(
            town_app.session_store, town_app.application_id, session_id
        )

    assert consume_websocket_token(path, session())
    assert session_data(town_app, client.cookies['session_id']) == {}

    with pytest.raises(NoWebsocketTokenStored):
        consume_websocket_token(path, session())


def test_token_is_not_cached(client: TestApp) -> None:
    """No cache may keep a token."""
    response = client.get('/chat/token')

    assert response.headers['Cache-Control'] == 'no-store'
    assert response.headers['Pragma'] == 'no-cache'


@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_session_cookie_attributes(client: TestApp, scheme: str) -> None:
    """The cookie is HttpOnly, SameSite=Lax, for /, Secure under https."""
    response = client.get(
        '/chat/token', extra_environ={'wsgi.url_scheme': scheme}
    )

    value, attributes = cookie_attributes(response)

    assert value
    assert 'httponly' in attributes
    assert attributes['samesite'].lower() == 'lax'
    assert attributes['path'] == '/'
    assert ('secure' in attributes) is (scheme == 'https')


@pytest.mark.parametrize(('scheme', 'source'), [
    ('http', 'ws://town.test:8765'),
    ('https', 'wss://town.test:8765'),
])
def test_pages_may_connect_to_the_websocket(
    make_app: AppFactory, scheme: str, source: str
) -> None:
    """Every page's CSP lets it connect to the websocket endpoint."""
    client = TestApp(make_app(with_page))
    environ = {'HTTP_HOST': 'town.test', 'wsgi.url_scheme': scheme}

    response = client.get('/page', extra_environ=environ)

    assert response.text == '<p>A page of the town.</p>'
    header = response.headers['Content-Security-Policy']
    assert f"connect-src 'self' {source}" in header
    assert csp(response)['connect-src'] == ["'self'", source]
    assert csp(response)['default-src'] == ["'self'"]


@pytest.mark.parametrize('method', ['post', 'put', 'delete'])
def test_token_only_for_get(
    make_app: AppFactory, recording_store: Recording, method: str
) -> None:
    """Other methods than GET are refused with 405 and write nothing."""
    client = TestApp(make_app(session_store=recording_store))

    response = getattr(client, method)('/chat/token', status=405)

    assert 'Set-Cookie' not in response.headers
    assert recording_store.changes == []


# Transactions --------------------------------------------------------


def test_successful_view_writes_the_session(
    make_app: AppFactory, recording_store: Recording
) -> None:
    """A view that succeeds has its session changes written."""
    app = make_app(with_failure, session_store=recording_store)
    client = TestApp(app)

    response = client.get('/fail/not')

    assert 'Set-Cookie' in response.headers
    assert len(recording_store.changes) == 1
    assert session_data(app, client.cookies['session_id']) == {
        'written': 'not'
    }


@pytest.mark.parametrize('how', ['http-error', '400', '500', 'doomed'])
@pytest.mark.parametrize('existing', [False, True])
def test_failed_view_writes_nothing(
    make_app: AppFactory, recording_store: Recording,
    how: str, existing: bool,
) -> None:
    """A view that fails leaves the store unchanged and sets no cookie."""
    app = make_app(with_failure, session_store=recording_store)
    client = TestApp(app)
    if existing:
        client.get('/chat/token')
        before = session_data(app, client.cookies['session_id'])
        recording_store.changes.clear()

    response = client.get(f'/fail/{how}', status='*')

    assert 'Set-Cookie' not in response.headers
    assert recording_store.changes == []
    if existing:
        assert session_data(app, client.cookies['session_id']) == before


@pytest.mark.parametrize('existing', [False, True])
def test_raising_view_writes_nothing(
    make_app: AppFactory, recording_store: Recording, existing: bool
) -> None:
    """A view that raises leaves the store unchanged."""
    app = make_app(with_failure, session_store=recording_store)
    client = TestApp(app)
    if existing:
        client.get('/chat/token')
        recording_store.changes.clear()

    with pytest.raises(RuntimeError, match='the view failed'):
        client.get('/fail/raise')

    assert recording_store.changes == []


# Configuration -------------------------------------------------------


def test_hooks_run_once_framework_first(settings: dict[str, Any]) -> None:
    """Every configure_* hook runs once, the framework's before mixins'."""
    calls: list[str] = []

    class AuditApp(morepath.App):
        def configure_audit(self, **cfg: Any) -> None:
            # A mixin's hook may rely on what the framework set up.
            assert self.identity_secret == cfg['identity_secret']
            assert self.session_store is not None
            calls.append('audit')

    class App(Framework, ChatApp, AuditApp):
        def configure_session(self, **cfg: Any) -> None:
            calls.append('session')
            super().configure_session(**cfg)

        def configure_dsn(self, **cfg: Any) -> None:
            calls.append('dsn')
            super().configure_dsn(**cfg)

        def configure_chat(self, **cfg: Any) -> None:
            calls.append('chat')
            super().configure_chat(**cfg)

    app = App()
    app.configure_application(**settings)

    assert calls == ['session', 'dsn', 'chat', 'audit']
    app.dispose()


def test_subclass_hooks_run_after_their_bases(
    settings: dict[str, Any]
) -> None:
    """A hook of the app class itself runs after every inherited hook."""
    calls: list[str] = []

    class App(TownApp):
        def configure_town(self, **cfg: Any) -> None:
            calls.append('town')

        def configure_chat(self, **cfg: Any) -> None:
            calls.append('chat')
            super().configure_chat(**cfg)

    app = App()
    app.configure_application(**settings)

    assert calls == ['chat', 'town']
    app.dispose()


@pytest.mark.parametrize('setting', [
    {'websocket_url': 'http://chat.town.test/chats'},
    {'websocket_url': 'wss://'},
    {'websocket_url': 'wss:///chats'},
    {'websocket_url': 'wss://chat.town.test/chats?token=x'},
    {'websocket_url': 'wss://chat.town.test/chats#x'},
    {'websocket_url': 'chat.town.test'},
    {'websocket_url': 42},
    {'websocket_port': 0},
    {'websocket_port': -1},
    {'websocket_port': 65536},
    {'websocket_port': True},
    {'websocket_port': '8765'},
    {'websocket_port': 8765.0},
    {'token_ttl': 0},
    {'token_ttl': 0.5},
    {'token_ttl': 3601},
    {'token_ttl': True},
    {'token_ttl': '60'},
    {'token_ttl': None},
    {'allowed_origins': 'http://town.test'},
    {'allowed_origins': ['http://town.test/']},
    {'allowed_origins': ['*']},
    {'allowed_origin_patterns': r'https://.*\.town\.test'},
    {'allowed_origin_patterns': ['(']},
    {'allow_missing_origin': 'yes'},
])
def test_configure_chat_errors(setting: dict[str, Any]) -> None:
    """Every wrong chat setting is a ValueError, never an assertion."""
    with pytest.raises(ValueError):
        TownApp().configure_chat(**setting)


@pytest.mark.parametrize('setting', [
    {'identity_secret': None},
    {'identity_secret': 'short'},
    {'identity_secret': 'x' * 31},
    {'identity_secret': 42},
    {'session_store': 'http://store.test'},
    {'session_store': 'sqlite://'},
    {'session_store': 'redis'},
    {'session_store': None},
])
def test_configure_session_errors(setting: dict[str, Any]) -> None:
    """A short secret or an unknown store URL is a ValueError."""
    arguments = {'identity_secret': 'x' * 32, **setting}

    with pytest.raises(ValueError):
        TownApp().configure_session(**arguments)


@pytest.mark.parametrize('application_id', [
    '', 'govikon', 'town-govikon', 'Town/govikon', 'town/Govikon',
    'town/', '/govikon', 'town/govikon/x', 'town//govikon',
    'town/gov ikon', 'town/-govikon', 'town.test/govikon',
])
def test_set_application_id_errors(application_id: str) -> None:
    """An id that is not namespace/name is a ValueError and sets nothing."""
    app = TownApp()
    app.configure_session(identity_secret='x' * 32)

    with pytest.raises(ValueError):
        app.set_application_id(application_id)
    assert not hasattr(app, 'application_id')
    assert not hasattr(app, 'cookie_signer')


# Tenants and tabs ----------------------------------------------------


def test_tenants_do_not_share_sessions(settings: dict[str, Any]) -> None:
    """A cookie of one tenant starts a fresh session at another."""
    store = store_from_url(settings['session_store'])

    class App(TownApp):
        pass

    App.commit()
    govikon, other = App(), App()
    for app, application_id in ((govikon, TENANT), (other, 'town/other')):
        app.configure_application(**{**settings, 'session_store': store})
        app.set_application_id(application_id)

    first = TestApp(govikon).get('/chat/token')
    cookie, _ = cookie_attributes(first)
    second = TestApp(other).get(
        '/chat/token', headers={'Cookie': f'session_id={cookie}'}
    )
    other_cookie, _ = cookie_attributes(second)

    assert second.json['url'].endswith('&schema=town-other')
    assert other.cookie_signer.unsign(cookie) is None
    assert other_cookie != cookie
    own_id = govikon.cookie_signer.unsign(cookie)
    other_id = other.cookie_signer.unsign(other_cookie)
    assert own_id is not None and other_id is not None
    assert own_id != other_id
    assert store.load('town/other', own_id) == {}
    assert store.load('town/govikon', other_id) == {}
    assert set(store.load('town/govikon', own_id)) == {
        token_key('websocket_token', first.json['token'])
    }
    assert set(store.load('town/other', other_id)) == {
        token_key('websocket_token', second.json['token'])
    }
    store.close()


def test_two_tabs_keep_both_tokens(
    town_app: TownApp, client: TestApp
) -> None:
    """Two token requests in one session keep both tokens, one cookie."""
    first = client.get('/chat/token')
    second = client.get('/chat/token')
    tokens = {first.json['token'], second.json['token']}

    assert len(tokens) == 2
    assert 'Set-Cookie' not in second.headers
    assert set(session_data(town_app, client.cookies['session_id'])) == {
        token_key('websocket_token', token) for token in tokens
    }
