"""Tests of the session stores, cookie signing and the two session views."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from onegov.chat.session import (
    DEFAULT_SESSION_TTL,
    BrowserSession,
    CookieSigner,
    MemoryStore,
    RedisStore,
    SessionStore,
    SQLiteStore,
    StoredSession,
    derive_key,
    store_from_url,
)

SECRET = 'test-secret-' + 'x' * 40

StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=['memory', 'sqlite', 'redis'])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[StoreFactory]:
    """Build stores of one kind: memory, a SQLite file, a real Redis."""
    stores: list[SessionStore] = []

    def make(ttl: float = DEFAULT_SESSION_TTL) -> SessionStore:
        store: SessionStore
        if request.param == 'memory':
            store = MemoryStore(ttl)
        elif request.param == 'sqlite':
            store = SQLiteStore(str(tmp_path / 'sessions.db'), ttl)
        else:
            store = RedisStore(request.getfixturevalue('redis_server'), ttl)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store()


@pytest.fixture
def namespace() -> str:
    """A tenant per test: the tests share one Redis server."""
    return f'town/t{uuid.uuid4().hex[:12]}'


def write_raw(
    store: SessionStore, namespace: str, session_id: str, key: str, raw: str
) -> None:
    """Put a value into the store bypassing its encoding."""
    if isinstance(store, MemoryStore):
        expires, data = store._data[(namespace, session_id)]
        store._data[(namespace, session_id)] = (expires, {**data, key: raw})
    elif isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as connection:
            connection.execute(
                'INSERT INTO session_data VALUES (?, ?, ?, ?, ?)',
                (namespace, session_id, key, raw, time.time() + 60),
            )
        connection.close()
    else:
        assert isinstance(store, RedisStore)
        name = f'{store.prefix}:{namespace}:{session_id}'
        store.client.hset(name, key, raw)


# Stores --------------------------------------------------------------


def test_unknown_session_is_empty(
    store: SessionStore, namespace: str
) -> None:
    """An unknown session loads as empty and pops nothing."""
    assert store.load(namespace, 'unknown') == {}
    assert store.pop(namespace, 'unknown', 'key') is None
    store.delete(namespace, 'unknown')


def test_values_round_trip(store: SessionStore, namespace: str) -> None:
    """Whatever JSON can hold comes back as it was written."""
    values = {
        'role': 'admin',
        'count': 3,
        'ratio': 1.5,
        'flag': True,
        'items': [1, 'a', None],
        'nested': {'a': {'b': [False]}},
        'text': 'Gr\u00fcezi \u20ac \U0001f600',
    }

    store.write(namespace, 'sid', values)

    assert store.load(namespace, 'sid') == values


def test_write_merges_and_deletes(
    store: SessionStore, namespace: str
) -> None:
    """A write sets its keys, removes the deleted ones and keeps the rest."""
    store.write(namespace, 'sid', {'a': 1, 'b': 2, 'c': 3})

    store.write(namespace, 'sid', {'b': 20, 'd': 4}, deleted=['a', 'x'])

    assert store.load(namespace, 'sid') == {'b': 20, 'c': 3, 'd': 4}


def test_sessions_and_tenants_are_separate(
    store: SessionStore, namespace: str
) -> None:
    """The same key in another session or tenant is another value."""
    other = namespace + '_other'
    store.write(namespace, 'one', {'role': 'admin'})
    store.write(namespace, 'two', {'role': 'editor'})
    store.write(other, 'one', {'role': 'customer'})

    assert store.pop(namespace, 'one', 'role') == 'admin'
    assert store.load(namespace, 'two') == {'role': 'editor'}
    assert store.load(other, 'one') == {'role': 'customer'}


def test_pop(store: SessionStore, namespace: str) -> None:
    """Pop returns the value once, removes it and leaves the other keys."""
    store.write(namespace, 'sid', {'token': {'expires': 1}, 'role': 'a'})

    assert store.pop(namespace, 'sid', 'token') == {'expires': 1}
    assert store.pop(namespace, 'sid', 'token') is None
    assert store.pop(namespace, 'sid', 'absent') is None
    assert store.load(namespace, 'sid') == {'role': 'a'}


def test_delete(store: SessionStore, namespace: str) -> None:
    """Delete removes the whole session and only that one."""
    store.write(namespace, 'sid', {'a': 1, 'b': 2})
    store.write(namespace, 'other', {'a': 1})

    store.delete(namespace, 'sid')

    assert store.load(namespace, 'sid') == {}
    assert store.pop(namespace, 'sid', 'a') is None
    assert store.load(namespace, 'other') == {'a': 1}


def test_ping(store: SessionStore) -> None:
    """A store that answers pings without raising."""
    store.ping()


@pytest.mark.parametrize('raw', ['{not json', '', 'undefined', "'x'"])
def test_unreadable_values_count_as_absent(
    store: SessionStore, namespace: str, raw: str
) -> None:
    """A value that is not JSON is neither loaded nor popped."""
    store.write(namespace, 'sid', {'role': 'admin'})
    write_raw(store, namespace, 'sid', 'bad', raw)

    assert store.load(namespace, 'sid') == {'role': 'admin'}
    assert store.pop(namespace, 'sid', 'bad') is None


def test_pop_is_atomic_across_threads(
    store: SessionStore, namespace: str
) -> None:
    """Of 20 threads popping the same keys, exactly one gets each value."""
    keys = [f'k{i}' for i in range(30)]
    store.write(namespace, 'sid', {key: key for key in keys})
    barrier = threading.Barrier(20)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def pop_all() -> None:
        try:
            barrier.wait(timeout=10)
            results.append([
                key for key in keys
                if store.pop(namespace, 'sid', key) is not None
            ])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pop_all) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert sorted(key for got in results for key in got) == sorted(keys)
    assert store.load(namespace, 'sid') == {}


POP_SCRIPT = '''
import json
import sys

from onegov.chat.session import store_from_url

url, namespace, session_id, count = sys.argv[1:]
store = store_from_url(url)
store.ping()
print('ready', flush=True)
sys.stdin.readline()
got = [
    key for key in (f'k{i}' for i in range(int(count)))
    if store.pop(namespace, session_id, key) is not None
]
print(json.dumps(got), flush=True)
store.close()
'''


def test_pop_is_atomic_across_processes(
    store_url: str, namespace: str
) -> None:
    """Of four processes popping the same keys, exactly one gets each."""
    keys = [f'k{i}' for i in range(200)]
    store = store_from_url(store_url)
    store.write(namespace, 'sid', {key: key for key in keys})
    command = [
        sys.executable, '-c', POP_SCRIPT,
        store_url, namespace, 'sid', str(len(keys)),
    ]
    processes = [
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]

    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == 'ready\n'
        for process in processes:
            assert process.stdin is not None
            process.stdin.write('go\n')
            process.stdin.flush()
        results = [
            json.loads(process.communicate(timeout=30)[0])
            for process in processes
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()

    assert [process.returncode for process in processes] == [0] * 4
    assert sorted(key for got in results for key in got) == sorted(keys)
    assert store.load(namespace, 'sid') == {}
    store.close()


def test_sessions_expire(make_store: StoreFactory, namespace: str) -> None:
    """A session not written to for its lifetime is gone; a write renews."""
    store = make_store(ttl=1)
    store.write(namespace, 'idle', {'a': 1})
    store.write(namespace, 'busy', {'a': 1})

    time.sleep(0.6)
    store.write(namespace, 'busy', {'b': 2})
    time.sleep(0.6)

    assert store.load(namespace, 'idle') == {}
    assert store.pop(namespace, 'idle', 'a') is None
    assert store.load(namespace, 'busy') == {'a': 1, 'b': 2}


@pytest.mark.parametrize('ttl', [0, -1])
def test_session_lifetime_must_be_positive(
    make_store: StoreFactory, ttl: float
) -> None:
    """A store with a lifetime of zero or less is a ValueError."""
    with pytest.raises(ValueError, match='must be positive'):
        make_store(ttl=ttl)


# store_from_url ------------------------------------------------------


def test_store_from_memory_url() -> None:
    """``memory://`` is a MemoryStore with the given lifetime."""
    store = store_from_url('memory://', ttl=120)

    assert isinstance(store, MemoryStore)
    assert store.ttl == 120


def test_store_from_absolute_sqlite_url(tmp_path: Path) -> None:
    """``sqlite:////abs/path`` is a SQLite file at that absolute path."""
    path = tmp_path / 'data' / 'sessions.db'

    store = store_from_url(f'sqlite:///{path}')

    assert isinstance(store, SQLiteStore)
    assert store.path == str(path)
    assert path.is_file()
    store.close()


def test_store_from_relative_sqlite_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///rel/path`` is a SQLite file relative to the cwd."""
    monkeypatch.chdir(tmp_path)

    store = store_from_url('sqlite:///data/sessions.db', ttl=120)

    assert isinstance(store, SQLiteStore)
    assert store.ttl == 120
    assert (tmp_path / 'data' / 'sessions.db').is_file()
    store.close()


def test_store_from_redis_url(redis_server: str) -> None:
    """``redis://`` is a RedisStore connected to that server."""
    store = store_from_url(redis_server, ttl=120)

    assert isinstance(store, RedisStore)
    assert store.ttl == 120
    store.ping()
    store.close()


@pytest.mark.parametrize('url', [
    'rediss://127.0.0.1:1/0',
    'unix:///run/redis/redis.sock',
])
def test_store_from_other_redis_urls(url: str) -> None:
    """``rediss://`` and ``unix://`` are Redis stores too."""
    store = store_from_url(url)

    assert isinstance(store, RedisStore)
    store.close()


@pytest.mark.parametrize('url', [
    'sqlite://',
    'sqlite:///',
    'sqlite:',
    'sqlite:relative.db',
    'http://x',
    'postgresql://user@host/db',
    'memory',
    'redis',
    '',
    None,
    42,
    b'memory://',
])
def test_store_from_bad_url(url: Any) -> None:
    """Anything but a sqlite, redis or memory URL is a ValueError."""
    with pytest.raises(ValueError):
        store_from_url(url)


# Cookie signing ------------------------------------------------------


def test_cookie_round_trip() -> None:
    """A signed session id unsigns to itself."""
    signer = CookieSigner(SECRET, 'town/govikon')

    signed = signer.sign('abc-DEF_123')

    assert signed.startswith('abc-DEF_123.')
    assert signer.unsign(signed) == 'abc-DEF_123'


def tampered(signed: str) -> list[str]:
    session_id, signature = signed.rsplit('.', 1)
    flip = {'A': 'B'}.get(signature[-1], 'A')
    return [
        f'{session_id}.{signature[:-1]}{flip}',
        f'{session_id}x.{signature}',
        f'x{session_id}.{signature}',
        f'{session_id}.{signature}x',
        f'{session_id}.',
        session_id,
        f'.{signature}',
        f'{session_id}.{signature}.{signature}',
    ]


def test_tampered_cookie_is_refused() -> None:
    """Changing any part of a signed value makes it worthless."""
    signer = CookieSigner(SECRET, 'town/govikon')

    for value in tampered(signer.sign('abc')):
        assert signer.unsign(value) is None


def test_other_tenant_or_secret_refuses_the_cookie() -> None:
    """A cookie signed for one tenant or secret verifies nowhere else."""
    signed = CookieSigner(SECRET, 'town/govikon').sign('abc')

    assert CookieSigner(SECRET, 'town/other').unsign(signed) is None
    assert CookieSigner(SECRET + 'y', 'town/govikon').unsign(signed) is None


@pytest.mark.parametrize('value', [
    '', '.', '..', 'garbage', 'a.b', 'a.b.c', '\x00', '\u00e4.\u00f6',
    '\ud800', 'x' * 10000,
])
def test_garbage_cookie_is_refused(value: str) -> None:
    """A value that was never signed unsigns to None."""
    assert CookieSigner(SECRET, 'town/govikon').unsign(value) is None


def test_signed_empty_id_is_refused() -> None:
    """Even a correctly signed empty session id is no session id."""
    signer = CookieSigner(SECRET, 'town/govikon')

    assert signer.unsign(signer.sign('')) is None


def test_keys_differ_by_purpose_and_tenant() -> None:
    """Each purpose and each tenant gets its own key."""
    keys = {
        derive_key(SECRET, purpose, tenant)
        for purpose in ('session', 'other')
        for tenant in ('town/govikon', 'town/other')
    }

    assert len(keys) == 4
    assert SECRET not in ''.join(keys)


# BrowserSession ------------------------------------------------------


def test_new_browser_session_writes_at_flush(
    store: SessionStore, namespace: str
) -> None:
    """A new session gets its id, its cookie and its data at flush."""
    session = BrowserSession(store, namespace)
    session['role'] = 'admin'

    assert session.session_id is None
    assert session.cookie_action is None
    assert session.dirty

    session.flush()

    assert session.session_id
    assert session.cookie_action == 'set'
    assert store.load(namespace, session.session_id) == {'role': 'admin'}
    assert not session.dirty


def test_existing_browser_session_writes_at_flush(
    store: SessionStore, namespace: str
) -> None:
    """Changes to a known session reach the store at flush, not before."""
    store.write(namespace, 'sid', {'a': 1, 'b': 2})
    session = BrowserSession(store, namespace, 'sid')

    assert dict(session) == {'a': 1, 'b': 2}
    session['c'] = 3
    del session['a']
    assert store.load(namespace, 'sid') == {'a': 1, 'b': 2}

    session.flush()

    assert store.load(namespace, 'sid') == {'b': 2, 'c': 3}
    assert session.session_id == 'sid'
    assert session.cookie_action is None


def test_unchanged_browser_session_writes_nothing(
    store: SessionStore, namespace: str
) -> None:
    """A session only read from gets no id and no cookie."""
    session = BrowserSession(store, namespace)

    assert dict(session) == {}
    session.flush()

    assert session.session_id is None
    assert session.cookie_action is None


def test_changes_are_announced(
    store: SessionStore, namespace: str
) -> None:
    """Every change calls `on_change`, so the framework can join."""
    calls: list[BrowserSession] = []
    session = BrowserSession(store, namespace)
    session.on_change = calls.append

    session['a'] = 1
    del session['a']
    session.rotate()
    session.invalidate()

    assert calls == [session] * 4


def test_discard_forgets_changes(
    store: SessionStore, namespace: str
) -> None:
    """Discarded changes never reach the store."""
    store.write(namespace, 'sid', {'a': 1})
    known = BrowserSession(store, namespace, 'sid')
    new = BrowserSession(store, namespace)

    for session in (known, new):
        session['a'] = 2
        session['b'] = 3
        session.discard()
        session.flush()

    assert store.load(namespace, 'sid') == {'a': 1}
    assert new.session_id is None
    assert new.cookie_action is None


def test_rotate_moves_the_data_to_a_new_id(
    store: SessionStore, namespace: str
) -> None:
    """Rotation gives a new id with the data and removes the old session."""
    store.write(namespace, 'sid', {'role': 'customer'})
    session = BrowserSession(store, namespace, 'sid')

    session.rotate()
    session['role'] = 'admin'
    assert store.load(namespace, 'sid') == {'role': 'customer'}
    session.flush()

    assert session.session_id not in (None, 'sid')
    assert session.cookie_action == 'set'
    assert store.load(namespace, 'sid') == {}
    assert store.load(namespace, session.session_id) == {'role': 'admin'}


def test_discarded_rotation_keeps_the_old_id(
    store: SessionStore, namespace: str
) -> None:
    """An aborted rotation leaves the session where it was."""
    store.write(namespace, 'sid', {'role': 'customer'})
    session = BrowserSession(store, namespace, 'sid')

    session.rotate()
    session.discard()
    session.flush()

    assert session.session_id == 'sid'
    assert session.cookie_action is None
    assert store.load(namespace, 'sid') == {'role': 'customer'}


def test_invalidate_deletes_the_session(
    store: SessionStore, namespace: str
) -> None:
    """Invalidation removes the session at flush and deletes the cookie."""
    store.write(namespace, 'sid', {'role': 'admin'})
    session = BrowserSession(store, namespace, 'sid')

    session.invalidate()
    assert len(session) == 0
    assert store.load(namespace, 'sid') == {'role': 'admin'}
    session.flush()

    assert store.load(namespace, 'sid') == {}
    assert session.session_id is None
    assert session.cookie_action == 'delete'


def test_invalidate_after_rotate_deletes_the_original(
    store: SessionStore, namespace: str
) -> None:
    """Invalidating a rotated session removes the original session too."""
    store.write(namespace, 'sid', {'role': 'admin'})
    session = BrowserSession(store, namespace, 'sid')

    session.rotate()
    session.invalidate()
    session.flush()

    assert store.load(namespace, 'sid') == {}
    assert session.cookie_action == 'delete'


def test_write_after_invalidate_starts_a_new_session(
    store: SessionStore, namespace: str
) -> None:
    """What is stored after a logout goes to a fresh session, not the old."""
    store.write(namespace, 'sid', {'role': 'admin'})
    session = BrowserSession(store, namespace, 'sid')

    session.invalidate()
    session['message'] = 'logged out'
    session.flush()

    assert store.load(namespace, 'sid') == {}
    assert session.session_id not in (None, 'sid')
    assert session.cookie_action == 'set'
    assert store.load(namespace, session.session_id) == {
        'message': 'logged out'
    }


# StoredSession -------------------------------------------------------


def test_stored_session_pops_from_the_store(
    store: SessionStore, namespace: str
) -> None:
    """Popping a snapshot's key takes it from the store, once."""
    store.write(namespace, 'sid', {'token': 'abc', 'role': 'admin'})
    first = StoredSession.load(store, namespace, 'sid')
    second = StoredSession.load(store, namespace, 'sid')

    assert first.pop('token') == 'abc'
    assert 'token' in second
    assert second.pop('token', 'gone') == 'gone'
    assert store.load(namespace, 'sid') == {'role': 'admin'}

    with pytest.raises(KeyError):
        del second['token']


def test_stored_session_writes_at_once(
    store: SessionStore, namespace: str
) -> None:
    """Setting a key of a stored session writes it to the store at once."""
    session = StoredSession.load(store, namespace, 'sid')

    session['seen'] = 1

    assert dict(session) == {'seen': 1}
    assert store.load(namespace, 'sid') == {'seen': 1}
