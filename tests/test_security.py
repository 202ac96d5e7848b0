"""Tests of onegov.chat.security and onegov.chat.utils: pure, no sockets."""

from __future__ import annotations

import base64
import random
import traceback
from typing import Any

import pytest

from onegov.chat.security import (
    MAX_OUTSTANDING_TOKENS,
    TOKEN_PATTERN,
    NoWebsocketTokenPresented,
    NoWebsocketTokenStored,
    OriginMissing,
    OriginNotAllowed,
    OriginPolicy,
    WebsocketSecurityError,
    WebsocketTokenExpired,
    WebsocketTokenMismatch,
    consume_websocket_token,
    new_websocket_token,
    store_websocket_token,
    token_key,
    validate_origin,
)
from onegov.chat.utils import (
    MissingParameter,
    ParameterError,
    RepeatedParameter,
    UnreadableParameter,
    param_from_path,
)

KEY = 'websocket_token'


def consume(path: str, session: dict[str, Any], **kw: Any) -> str:
    return consume_websocket_token(path, session, **kw)


def outcome(path: str, session: dict[str, Any]) -> str | Exception:
    """Return what consuming `path` gives: the token or the refusal.

    Any exception that is not a `WebsocketSecurityError` propagates and
    fails the test.

    """
    try:
        return consume(path, session)
    except WebsocketSecurityError as exc:
        return exc


def assert_secret_free(exc: BaseException, *secrets: str) -> None:
    """Assert that neither the message nor the traceback holds a secret."""
    text = ''.join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in repr(exc)
        assert secret not in text


def stored(session: dict[str, Any], *tokens: str, now: float = 1000.0) -> None:
    for token in tokens:
        store_websocket_token(session, token, now=now)


# The seed's contract -------------------------------------------------


def test_seed_token_is_returned_and_removed() -> None:
    """A token stored as a plain string is returned and taken out."""
    session = {KEY: '123'}

    assert consume('/chats?token=123', session) == '123'
    assert session == {}


def test_seed_wrong_token_burns_the_stored_one() -> None:
    """A wrong token is refused and burns the stored one all the same."""
    session = {KEY: '123'}

    with pytest.raises(WebsocketTokenMismatch):
        consume('/chats?token=124', session)
    assert session == {}

    with pytest.raises(NoWebsocketTokenStored):
        consume('/chats?token=123', session)


@pytest.mark.parametrize('path', [
    '/chats',
    '/chats?',
    '/chats?schema=town-govikon',
    '/chats?token=',
    '/chats?token',
    '/chats?tokens=123',
])
def test_seed_missing_token(path: str) -> None:
    """A path without a token is refused and the stored one is kept."""
    session = {KEY: '123'}

    with pytest.raises(NoWebsocketTokenPresented):
        consume(path, session)
    assert session == {KEY: '123'}


def test_seed_nothing_stored() -> None:
    """An empty session holds no token to match."""
    with pytest.raises(NoWebsocketTokenStored):
        consume('/chats?token=123', {})


def test_refusals_name_reason_and_status() -> None:
    """Each refusal has its own reason slug and an HTTP status."""
    classes = [
        NoWebsocketTokenPresented, NoWebsocketTokenStored,
        WebsocketTokenMismatch, WebsocketTokenExpired,
        OriginNotAllowed, OriginMissing,
    ]

    assert len({cls.reason for cls in classes}) == len(classes)
    assert {cls.status for cls in classes[:4]} == {401}
    assert {cls.status for cls in classes[4:]} == {403}
    assert all(issubclass(cls, WebsocketSecurityError) for cls in classes)


# param_from_path -----------------------------------------------------


def many_fields(count: int) -> str:
    fields = [f'f{i}=s3cret' for i in range(count - 1)]
    return '/chats?' + '&'.join([*fields, 'token=s3cret'])


@pytest.mark.parametrize(('path', 'value'), [
    ('/chats?token=s3cret', 's3cret'),
    ('/chats?schema=town-govikon&token=s3cret', 's3cret'),
    ('/chats?token=s3%2Dcret', 's3-cret'),
    ('/chats?token=s3+cret', 's3 cret'),
    ('/chats?token=%C3%A4', '\u00e4'),
    ('?token=s3cret', 's3cret'),
    ('/chats?token=s3cret#token=other', 's3cret'),
    (many_fields(64), 's3cret'),
])
def test_param_from_path(path: str, value: str) -> None:
    """The single, percent-decoded value of the parameter is returned."""
    assert param_from_path('token', path) == value


@pytest.mark.parametrize(('path', 'error', 'problem'), [
    ('/chats', MissingParameter, 'missing'),
    ('/chats?', MissingParameter, 'missing'),
    ('/chats?schema=s3cret', MissingParameter, 'missing'),
    ('/chats?token=', MissingParameter, 'missing'),
    ('/chats?token', MissingParameter, 'missing'),
    ('/chats?token=s3cret&token=s3cret', RepeatedParameter, 'repeated'),
    ('/chats?token=s3cret&token=other', RepeatedParameter, 'repeated'),
    ('/chats?token=s3cret&token=', RepeatedParameter, 'repeated'),
    ('/chats?token=s3cret%ff', UnreadableParameter, 'unreadable'),
    ('/chats?x=%ff&token=s3cret', UnreadableParameter, 'unreadable'),
    ('/chats?token=s3cret%ED%A0%80', UnreadableParameter, 'unreadable'),
    ('//[::1?token=s3cret', UnreadableParameter, 'unreadable'),
    (many_fields(65), UnreadableParameter, 'unreadable'),
])
def test_param_from_path_errors(
    path: str, error: type[ParameterError], problem: str
) -> None:
    """Each problem has its own error, whose message omits the value."""
    with pytest.raises(error) as info:
        param_from_path('token', path)

    assert isinstance(info.value, ValueError)
    assert info.value.name == 'token'
    assert info.value.problem == problem
    assert str(info.value) == f"{problem} query parameter 'token'"
    assert_secret_free(info.value, 's3cret')


# Robustness ----------------------------------------------------------

NASTY_PATHS = [
    '/chats?token=\u00e4\u00f6\u00fc',
    '/chats?token=%C3%A4%C3%B6',
    '/chats?token=' + 'a' * 4096,
    '/chats?token=' + '\u20ac' * 4096,
    '/chats?token=' + '%ff' * 1400,
    '/chats?token=%00',
    '/chats?token=abc%00def',
    '/chats?token=\x00',
    '/chats?token=%ff',
    '/chats?token=%',
    '/chats?token=%g1',
    '/chats?token=\ud800',
    '/chats?token=%ED%A0%80',
    '/chats?token=\U0001f600',
    '/chats?token=a&token=b',
    '/chats?token=a&token=a',
    '/chats?token=a;token=b',
    '/chats?token=a#b',
    '/chats?token=%2e%2e%2f',
    '/chats?token=\n',
    '/chats?token=%20',
    '/chats?' + '&'.join(['x=1'] * 100),
    '//[::1?token=a',
    'token=123',
    '?',
    '?&&&=',
    '',
    '/',
]


def sessions() -> list[dict[str, Any]]:
    """Sessions of every shape a handshake may meet."""
    issued: dict[str, Any] = {}
    stored(issued, 'a', 'b', '123')
    return [
        {},
        {KEY: '123'},
        {KEY: 'a'},
        issued,
        {KEY: None},
        {KEY: 123},
        {KEY: b'123'},
        {KEY: {'token': 5}},
        {f'{KEY}:x': 'junk', f'{KEY}:y': {'expires': 'soon'}},
        {'role': 'admin'},
    ]


@pytest.mark.parametrize('path', NASTY_PATHS)
def test_nasty_paths_raise_only_security_errors(path: str) -> None:
    """Malformed paths end in a security error, never anything else."""
    for session in sessions():
        result = outcome(path, session)

        if isinstance(result, str):
            assert result == param_from_path('token', path)


def test_random_paths_raise_only_security_errors() -> None:
    """Thousands of random paths end in a token or a security error."""
    pieces = [
        'token', 'token=', '=', '&', '?', '#', ';', '/', '%', '%f', '%ff',
        '%00', '%2', '%C3%A4', '+', ' ', 'a', 'b', '123', '[', ']', ':',
        '\x00', '\t', '\n', '\u00e4', '\u20ac', '\ud800', '\U0001f600',
    ]
    rng = random.Random(6455)

    for _ in range(3000):
        path = ''.join(rng.choices(pieces, k=rng.randrange(0, 24)))
        if rng.random() < 0.5:
            path = '/chats?token=' + path
        session: dict[str, Any] = {KEY: '123'}
        stored(session, 'a', 'b')

        result = outcome(path, session)

        if isinstance(result, str):
            assert result in ('123', 'a', 'b')


# Issued tokens -------------------------------------------------------


def test_issued_token_is_good_once() -> None:
    """A stored token admits one handshake and is gone afterwards."""
    token = new_websocket_token()
    session: dict[str, Any] = {}
    store_websocket_token(session, token, ttl=60, now=1000)

    assert session == {
        token_key(KEY, token): {'token': token, 'expires': 1060}
    }
    assert consume(f'/chats?token={token}', session, now=1059.9) == token
    assert session == {}

    with pytest.raises(NoWebsocketTokenStored):
        consume(f'/chats?token={token}', session, now=1001)


@pytest.mark.parametrize('elapsed', [60, 61, 3600])
def test_expired_token_is_refused_and_removed(elapsed: float) -> None:
    """A token presented at or after its expiry is refused and removed."""
    token = new_websocket_token()
    session: dict[str, Any] = {}
    store_websocket_token(session, token, ttl=60, now=1000)

    with pytest.raises(WebsocketTokenExpired):
        consume(f'/chats?token={token}', session, now=1000 + elapsed)
    assert session == {}


def test_storing_drops_expired_tokens() -> None:
    """Storing a token removes the ones that have expired meanwhile."""
    old, new = new_websocket_token(), new_websocket_token()
    session: dict[str, Any] = {'role': 'admin'}

    store_websocket_token(session, old, ttl=60, now=1000)
    store_websocket_token(session, new, ttl=60, now=1060)

    assert set(session) == {'role', token_key(KEY, new)}


def test_two_outstanding_tokens_each_work_once() -> None:
    """Two tabs' tokens are each good for one handshake, in any order."""
    first, second = new_websocket_token(), new_websocket_token()
    session: dict[str, Any] = {}
    stored(session, first, second)

    assert consume(f'/chats?token={second}', session, now=1001) == second
    assert consume(f'/chats?token={first}', session, now=1001) == first
    assert session == {}

    with pytest.raises(NoWebsocketTokenStored):
        consume(f'/chats?token={first}', session, now=1001)


def test_replayed_token_burns_the_others() -> None:
    """Replaying a spent token is a mismatch that burns every other one."""
    first, second = new_websocket_token(), new_websocket_token()
    session: dict[str, Any] = {'role': 'admin'}
    stored(session, first, second)
    consume(f'/chats?token={first}', session, now=1001)

    with pytest.raises(WebsocketTokenMismatch):
        consume(f'/chats?token={first}', session, now=1001)
    assert session == {'role': 'admin'}


@pytest.mark.parametrize('query', [
    'token=wrong',
    'token=%ff',
    'token={first}&token={first}',
    'token={second}&token={first}',
])
def test_wrong_or_malformed_token_burns_all(query: str) -> None:
    """A wrong or malformed token is refused and burns every token."""
    first, second = new_websocket_token(), new_websocket_token()
    session: dict[str, Any] = {'role': 'admin'}
    stored(session, first, second)
    path = '/chats?' + query.format(first=first, second=second)

    with pytest.raises(WebsocketTokenMismatch):
        consume(path, session, now=1001)
    assert session == {'role': 'admin'}


def test_at_most_max_outstanding_tokens() -> None:
    """Beyond MAX_OUTSTANDING_TOKENS the oldest tokens are dropped."""
    tokens = [new_websocket_token() for _ in range(MAX_OUTSTANDING_TOKENS + 3)]
    session: dict[str, Any] = {}
    for number, token in enumerate(tokens):
        store_websocket_token(session, token, ttl=60, now=1000 + number)

    assert set(session) == {token_key(KEY, token) for token in tokens[3:]}
    for token in reversed(tokens[3:]):
        assert consume(f'/chats?token={token}', session, now=1010) == token


def test_dropped_token_is_refused() -> None:
    """The oldest token, dropped for a newer one, no longer matches."""
    tokens = [new_websocket_token() for _ in range(MAX_OUTSTANDING_TOKENS + 1)]
    session: dict[str, Any] = {}
    for number, token in enumerate(tokens):
        store_websocket_token(session, token, ttl=60, now=1000 + number)

    with pytest.raises(WebsocketTokenMismatch):
        consume(f'/chats?token={tokens[0]}', session, now=1010)


@pytest.mark.parametrize('ttl', [0, -1, -0.5])
def test_token_lifetime_must_be_positive(ttl: float) -> None:
    """A lifetime of zero or less is a ValueError and stores nothing."""
    session: dict[str, Any] = {}

    with pytest.raises(ValueError, match='must be positive'):
        store_websocket_token(session, new_websocket_token(), ttl=ttl)
    assert session == {}


def test_other_session_keys_are_left_alone() -> None:
    """Tokens under another session key are neither used nor burnt."""
    token = new_websocket_token()
    session: dict[str, Any] = {}
    store_websocket_token(session, token, session_key='other', now=1000)
    before = dict(session)

    with pytest.raises(NoWebsocketTokenStored):
        consume(f'/chats?token={token}', session, now=1001)
    assert session == before

    path = f'/chats?token={token}'
    assert consume(path, session, session_key='other', now=1001) == token


def test_refusals_never_contain_the_token() -> None:
    """No refusal's message or traceback holds a token."""
    token, other = new_websocket_token(), new_websocket_token()
    cases: list[tuple[str, dict[str, Any], float]] = [
        ('/chats', {KEY: token}, 1001),
        (f'/chats?token={token}', {}, 1001),
        (f'/chats?token={other}', {KEY: token}, 1001),
        (f'/chats?token={other}', {}, 1001),
        (f'/chats?token={token}&token={token}', {}, 1001),
        (f'/chats?token={token}%ff', {}, 1001),
        (f'/chats?token={token}', {}, 2000),
        (f'/chats?token={token}', {KEY: {'token': 5}}, 1001),
    ]
    stored(cases[3][1], token)
    stored(cases[6][1], token)

    for path, session, now in cases:
        with pytest.raises(WebsocketSecurityError) as info:
            consume(path, session, now=now)
        assert_secret_free(info.value, token, other)


def test_new_tokens_are_unguessable() -> None:
    """A new token carries at least 128 random bits and never repeats."""
    tokens = {new_websocket_token() for _ in range(200)}

    assert len(tokens) == 200
    for token in tokens:
        assert TOKEN_PATTERN.fullmatch(token)
        raw = base64.urlsafe_b64decode(token + '=' * (-len(token) % 4))
        assert len(raw) * 8 >= 128


# Origins -------------------------------------------------------------


@pytest.mark.parametrize('origin', [
    'http://town.test',
    'https://a.b.c:8443',
    'http://[::1]:8080',
    'http://[::1]',
    'http://127.0.0.1:8080',
    'http://localhost',
    'https://xn--bcher-kva.example',
])
def test_validate_origin_accepts(origin: str) -> None:
    """Origins written as browsers send them are accepted unchanged."""
    assert validate_origin(origin) == origin


@pytest.mark.parametrize('origin', [
    '*',
    'https://*.town.test',
    'http://town.test/',
    'http://town.test/chat',
    'http://town.test?x=1',
    'http://town.test#x',
    'HTTP://town.test',
    'http://Town.test',
    ' http://town.test',
    'http://town.test ',
    'https://x.org:443',
    'http://x.org:80',
    'http://user@x.org',
    'http://user:secret@x.org',
    'http://@x.org',
    'ftp://x.org',
    'ws://x.org',
    'town.test',
    '//town.test',
    'null',
    '',
    'http://',
    'http://x.org:',
    'http://x.org:99999',
    'http://x.org:port',
    'http://x_y.org',
    'http://-x.org',
    'http://[::1',
    None,
    80,
])
def test_validate_origin_rejects(origin: Any) -> None:
    """Anything but scheme://host[:port] as browsers send it is refused."""
    with pytest.raises(ValueError):
        validate_origin(origin)


@pytest.mark.parametrize('arguments', [
    {'origins': 'http://town.test'},
    {'patterns': r'https://[a-z]+\.town\.test'},
    {'origins': ['http://town.test/']},
    {'origins': [None]},
    {'patterns': ['(']},
    {'patterns': ['[a-']},
    {'patterns': ['*']},
    {'patterns': ['']},
    {'patterns': [5]},
    {'allow_missing': 'yes'},
])
def test_policy_from_config_rejects(arguments: dict[str, Any]) -> None:
    """Strings for lists, bad origins and bad patterns are ValueErrors."""
    with pytest.raises(ValueError):
        OriginPolicy.from_config(**arguments)


@pytest.mark.parametrize('origin', [
    'http://town.test.evil.org',
    'http://evil.town.test',
    'http://eviltown.test',
    'http://town.tes',
    'https://town.test',
    'http://town.test:80',
    'http://town.test:8080',
    'http://town.test/',
    'http://town.test.',
    'HTTP://TOWN.TEST',
    'http://Town.test',
    'http://town.test\x00',
    ' http://town.test',
    'http://town%2etest',
])
def test_policy_matches_exactly(origin: str) -> None:
    """Only the very string listed is admitted: no suffix, prefix, case."""
    policy = OriginPolicy.from_config(['http://town.test'])
    policy.check('http://town.test')

    with pytest.raises(OriginNotAllowed):
        policy.check(origin)


@pytest.mark.parametrize(('origin', 'admitted'), [
    ('https://www.town.test', True),
    ('https://chat.town.test', True),
    ('https://www.town.test.evil.org', False),
    ('https://evil.org/https://www.town.test', False),
    ('https://evil.org?https://www.town.test', False),
    ('https://www.town.test\n', False),
    ('xhttps://www.town.test', False),
    ('http://www.town.test', False),
    ('https://town.test', False),
    ('https://www.town.test:8443', False),
])
def test_patterns_match_the_whole_origin(
    origin: str, admitted: bool
) -> None:
    """A pattern admits an origin only if it matches all of it."""
    policy = OriginPolicy.from_config(
        patterns=[r'https://[a-z]+\.town\.test']
    )

    assert policy.explain(origin)[0] is admitted
    if not admitted:
        with pytest.raises(OriginNotAllowed):
            policy.check(origin)


def test_alternation_matches_the_whole_origin() -> None:
    """Each branch of an alternation must match the whole origin."""
    policy = OriginPolicy.from_config(
        patterns=[r'https://a\.test|https://b\.test']
    )
    policy.check('https://a.test')
    policy.check('https://b.test')

    for origin in ('https://a.test.evil.org', 'https://evil.org#https://b.test'):
        with pytest.raises(OriginNotAllowed):
            policy.check(origin)


@pytest.mark.parametrize('origin', [None, ''])
def test_missing_origin(origin: str | None) -> None:
    """A missing or empty origin is refused unless allow_missing is set."""
    with pytest.raises(OriginMissing) as info:
        OriginPolicy.from_config(['http://town.test']).check(origin)
    assert info.value.status == 403

    OriginPolicy.from_config(allow_missing=True).check(origin)


def test_null_origin() -> None:
    """``null`` is refused, even with allow_missing, unless it is listed."""
    for policy in (
        OriginPolicy.from_config(['http://town.test']),
        OriginPolicy.from_config(allow_missing=True),
        OriginPolicy.from_config(patterns=['.*']),
    ):
        with pytest.raises(OriginMissing):
            policy.check('null')

    OriginPolicy.from_config(['null']).check('null')


@pytest.mark.parametrize(('origin', 'admitted'), [
    ('http://town.test', True),
    ('https://www.town.test', True),
    ('http://evil.org', False),
    ('null', False),
    (None, False),
    ('', False),
])
def test_explain(origin: str | None, admitted: bool) -> None:
    """`explain` says whether an origin is admitted, and why, in words."""
    policy = OriginPolicy.from_config(
        ['http://town.test'], [r'https://[a-z]+\.town\.test']
    )

    result, reason = policy.explain(origin)

    assert result is admitted
    assert isinstance(reason, str) and reason
