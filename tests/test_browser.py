"""The pages in a real browser: Playwright drives headless Chromium
against ``onegov-chat demo`` running as a subprocess.

The reconnect test runs the demo with ``--no-ws`` and the websocket
server as a process of its own (``onegov-chat serve`` with the same
configuration file), so that it can kill that server and start it again
on the same port while both pages stay open.

Screenshots go to ``test-artifacts/screenshots/`` in the repository.

"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from conftest import ServerProcess, free_port, onegov_chat
from onegov.chat.testing import wait_for_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / 'test-artifacts' / 'screenshots'

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update',
    '--disable-sync',
]

PHONE = {'width': 390, 'height': 844}
DESKTOP = {'width': 1280, 'height': 860}

XSS = '<img src=x onerror=alert(1)>'

#: How long a page may take to reconnect: the back-off doubles from
#: half a second, so the fourth attempt starts within 8 s.
RECONNECT_TIMEOUT = 20_000


def require_browser() -> None:
    """Skip unless Chromium and Playwright are there; fail in CI."""
    reason = None
    if not os.path.exists(CHROMIUM):
        reason = f'{CHROMIUM} is missing (apt-get install chromium)'
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is missing (pip install -e '.[browser]')"
    if reason is not None:
        if os.environ.get('CI'):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope='module')
def browser() -> Iterator[Browser]:
    """Headless Chromium, shared by the tests of this module."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@dataclass
class Demo:
    """A running demo: the web app, and how to log in to it."""

    process: ServerProcess
    url: str
    password: str
    ws_port: int


def start(
    command: list[str], log_path: Path, ready: str
) -> ServerProcess:
    """Start `command`; return once its log says `ready`."""
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, log_path)
    server.wait_for_log(ready, timeout=30)
    return server


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """Start ``onegov-chat demo`` processes; stops them after the test.

    The demo prints the staff login; the password is read from there.
    With `config`, a configuration file is written there (the ports, the
    data directory and `settings`) and given to the demo.

    """
    started: list[ServerProcess] = []

    def run(
        *args: str, config: Path | None = None, **settings: Any
    ) -> Demo:
        web_port, ws_port = free_port(), free_port()
        if config is not None:
            config.write_text(yaml.safe_dump({
                'data_dir': str(tmp_path / 'data'),
                'web_port': web_port,
                'websocket_port': ws_port,
                **settings,
            }), encoding='utf-8')
        command = [onegov_chat()]
        if config is not None:
            command += ['--config', str(config)]
        command += [
            'demo', '--web-port', str(web_port), '--ws-port', str(ws_port),
            '--data-dir', str(tmp_path / 'data'), *args,
        ]
        process = start(
            command, tmp_path / f'demo-{len(started)}.log',
            r'event=demo_ready',
        )
        started.append(process)
        line = process.wait_for_log(r'^\s+password:\s+\S+$')
        wait_for_port(web_port)
        return Demo(
            process, f'http://127.0.0.1:{web_port}', line.split()[-1],
            ws_port,
        )

    yield run
    for process in started:
        assert process.stop(signal.SIGINT) == 0, process.log()
        assert 'onegov.chat demo stopped.' in process.log()


@dataclass
class Watched:
    """A page, and what it did that a test must not see."""

    page: Page
    dialogs: list[str]
    errors: list[str]

    def check(self) -> None:
        assert self.dialogs == []
        assert self.errors == []


def open_page(browser: Browser, viewport: dict[str, int]) -> Watched:
    """A page of its own browser context: a session of its own."""
    context = browser.new_context(viewport=viewport)  # type: ignore
    context.set_default_timeout(10_000)
    page = context.new_page()
    watched = Watched(page, [], [])

    def on_dialog(dialog: Any) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_console(message: Any) -> None:
        # A refused script or style, or a script of ours that failed.
        if 'Content Security Policy' in message.text:
            watched.errors.append(message.text)

    page.on('dialog', on_dialog)
    page.on('console', on_console)
    page.on('pageerror', lambda error: watched.errors.append(str(error)))
    return watched


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f'{name}.png'), full_page=True)


def start_chat(page: Page, url: str, name: str, topic: str) -> str:
    """Start a chat through the customer form; return its id."""
    from playwright.sync_api import expect

    page.goto(f'{url}/')
    page.get_by_role('link', name='Start a chat').first.click()
    page.get_by_label('Your name').fill(name)
    page.get_by_label('Your e-mail address').fill('carla@example.org')
    page.get_by_label('What is it about?').fill(topic)
    page.get_by_role('button', name='Start chat').click()
    page.wait_for_url('**/chat/conversation')
    expect(page.locator('#connection')).to_have_attribute(
        'data-state', 'connected'
    )
    chat_id = page.locator('.chat').get_attribute('data-chat')
    assert chat_id is not None
    return chat_id


def log_in(page: Page, url: str, password: str) -> None:
    """Log in as the demo's staff account; wait for the dashboard."""
    from playwright.sync_api import expect

    page.goto(f'{url}/')
    page.get_by_role('link', name='Staff login').first.click()
    page.get_by_label('User name').fill('staff')
    page.get_by_label('Password').fill(password)
    page.get_by_role('button', name='Log in').click()
    page.wait_for_url('**/chat/staff')
    expect(page.locator('#connection')).to_have_attribute(
        'data-state', 'connected'
    )


def take(page: Page, customer: str, chat_id: str) -> Locator:
    """Take the waiting chat of `customer`; return its pane."""
    from playwright.sync_api import expect

    request = page.locator('#waiting li', has_text=customer)
    request.get_by_role('button', name=re.compile('^Take')).click()
    pane = page.locator(f'#chat-{chat_id}')
    expect(pane).to_be_visible()
    expect(pane.get_by_label('Your message')).to_be_focused()
    expect(request).to_have_count(0)
    return pane


def say(scope: Page | Locator, text: str, enter: bool = True) -> None:
    """Write `text` and send it, with Enter or with the Send button."""
    box = scope.get_by_label('Your message')
    box.fill(text)
    if enter:
        box.press('Enter')
    else:
        scope.get_by_role('button', name='Send').click()


def seqs(messages: Locator) -> list[str]:
    found: list[str] = messages.locator('li').evaluate_all(
        'items => items.map(item => item.dataset.seq || "")'
    )
    return found


def test_chat_survives_a_restart_of_the_websocket_server(
    browser: Browser,
    run_demo: Callable[..., Demo],
    tmp_path: Path,
) -> None:
    """A customer and staff talk, the websocket server is killed and
    started again, both pages reconnect by themselves, deliver what was
    written meanwhile and show every message once, in order; the ended
    chat's transcript is in the archive."""
    from playwright.sync_api import expect

    config = tmp_path / 'demo.yml'
    demo = run_demo('--no-ws', config=config)
    assert f'{demo.url}/chat/login' in demo.process.log()

    servers: list[ServerProcess] = []

    def serve() -> ServerProcess:
        servers.append(start(
            [onegov_chat(), '--config', str(config), 'serve',
             '--port', str(demo.ws_port)],
            tmp_path / f'serve-{len(servers)}.log', r'event=server_ready',
        ))
        return servers[-1]

    server = serve()
    customer = open_page(browser, PHONE)
    staff = open_page(browser, DESKTOP)
    try:
        chat_id = start_chat(
            customer.page, demo.url, 'Carla Customer', 'Building permit'
        )
        own = customer.page.locator('#messages')
        expect(customer.page.locator('#chat-state')).to_have_text(
            'Waiting for a member of staff…'
        )
        screenshot(customer.page, 'customer-waiting')

        log_in(staff.page, demo.url, demo.password)
        pane = take(staff.page, 'Carla Customer', chat_id)
        theirs = pane.locator('.messages')
        expect(customer.page.locator('#chat-state')).to_have_text(
            'You are talking to Demo Staff.'
        )

        said = ['Hello, I need a permit', 'Hi Carla, which kind?']
        say(customer.page, said[0])
        expect(own.locator('li').last).to_have_class(re.compile('delivered'))
        say(pane, said[1], enter=False)
        for messages in (own, theirs):
            expect(messages.locator('.text')).to_have_text(said)

        # No close frame: the browsers see 1006, as after a crash.
        server.process.kill()
        server.process.wait()
        for page in (customer.page, staff.page):
            expect(page.locator('#connection')).not_to_have_attribute(
                'data-state', 'connected'
            )

        meanwhile = ['A garden shed, 3 by 4 m', 'Noted, one moment']
        say(customer.page, meanwhile[0])
        say(pane, meanwhile[1])
        expect(own.locator('li').last).to_have_class(re.compile('pending'))
        expect(theirs.locator('li').last).to_contain_text('Sending…')

        server = serve()
        for page in (customer.page, staff.page):
            expect(page.locator('#connection')).to_have_attribute(
                'data-state', 'connected', timeout=RECONNECT_TIMEOUT
            )
        for messages in (own, theirs):
            expect(messages.locator('li.pending')).to_have_count(0)
            expect(messages.locator('.text')).to_have_count(4)

        # Both sent at once: either may have come first, but both pages
        # agree, and each message is there once.
        order = own.locator('.text').all_text_contents()
        assert sorted(order[2:]) == sorted(meanwhile)
        assert order[:2] == said
        expect(theirs.locator('.text')).to_have_text(order)

        after = ['Is that all you need?', 'Yes, thank you!']
        say(pane, after[0])
        say(customer.page, after[1])
        for messages in (own, theirs):
            expect(messages.locator('.text')).to_have_text(order + after)
            # A message shows before its acknowledgement gives it its
            # number: wait for the last one to be numbered.
            expect(messages.locator('li').last).to_have_attribute(
                'data-seq', '6'
            )
            assert seqs(messages) == ['1', '2', '3', '4', '5', '6']
        expect(own.locator('.own')).to_have_count(3)
        for item in own.locator('.own').all():
            expect(item.locator('.delivery')).to_have_text('Delivered')

        screenshot(customer.page, 'customer-conversation')
        screenshot(staff.page, 'staff-dashboard')

        pane.get_by_role('button', name='End chat').click()
        expect(customer.page.locator('#ended')).to_be_visible()
        expect(customer.page.locator('#chat-state')).to_have_text(
            'This chat has ended.'
        )
        expect(customer.page.locator('#compose')).to_be_hidden()
        expect(pane.get_by_role('link', name='Read the transcript')) \
            .to_be_visible()
        expect(staff.page.locator('#active li')).to_have_count(0)
        screenshot(customer.page, 'customer-ended')

        staff.page.get_by_role('link', name='Archive').click()
        row = staff.page.locator(f'tr[data-chat="{chat_id}"]')
        expect(row).to_contain_text('Building permit')
        expect(row).to_contain_text('Demo Staff')
        screenshot(staff.page, 'archive')

        row.get_by_role('link', name='Carla Customer').click()
        transcript = staff.page.locator('ol.transcript')
        expect(transcript.locator('.text')).to_have_text(order + after)
        assert seqs(transcript) == ['1', '2', '3', '4', '5', '6']
        screenshot(staff.page, 'transcript')

        customer.check()
        staff.check()
    finally:
        customer.page.context.close()
        staff.page.context.close()
        server.stop()

    # Both servers admitted both pages, and no log holds a secret.
    for process in servers:
        log = process.log()
        assert log.count('event=handshake_admitted') >= 2, log
        assert 'token=' not in log
        assert 'session_id=' not in log
    assert 'token=' not in demo.process.log()


def test_chat_text_is_shown_as_text(
    browser: Browser, run_demo: Callable[..., Demo]
) -> None:
    """Markup in a chat text, a name or a topic is shown literally on
    both pages, live and after a reload, and never becomes an element."""
    from playwright.sync_api import expect

    demo = run_demo()
    customer = open_page(browser, PHONE)
    staff = open_page(browser, PHONE)
    name = 'Mallory <b>Customer</b>'
    try:
        chat_id = start_chat(customer.page, demo.url, name, XSS)
        log_in(staff.page, demo.url, demo.password)
        request = staff.page.locator('#waiting li', has_text=name)
        expect(request.locator('.topic')).to_have_text(XSS)
        pane = take(staff.page, name, chat_id)

        say(customer.page, XSS)
        say(pane, f'You wrote {XSS}')
        expected = [XSS, f'You wrote {XSS}']
        own = customer.page.locator('#messages')
        theirs = pane.locator('.messages')
        for messages in (own, theirs):
            expect(messages.locator('.text')).to_have_text(expected)
        expect(pane.locator('.pane-title')).to_have_text(f'{name} {XSS}')
        expect(own.locator('.who').first).to_have_text(name)

        # Once more as the server renders them, and exactly once.
        for page in (customer.page, staff.page):
            page.reload()
            expect(page.locator('#connection')).to_have_attribute(
                'data-state', 'connected'
            )
        for messages in (own, pane.locator('.messages')):
            expect(messages.locator('.text')).to_have_text(expected)
            assert seqs(messages) == ['1', '2']

        screenshot(staff.page, 'staff-dashboard-phone')

        for watched in (customer, staff):
            assert watched.page.locator('img').count() == 0
            assert watched.page.locator('#main b').count() == 0
            watched.check()
    finally:
        customer.page.context.close()
        staff.page.context.close()


def test_dashboard_stops_when_the_session_ends(
    browser: Browser, run_demo: Callable[..., Demo], tmp_path: Path
) -> None:
    """Logging out in another tab ends the dashboard's connection (4000):
    the page stops reconnecting, says why and links to the login."""
    from playwright.sync_api import expect

    demo = run_demo(config=tmp_path / 'demo.yml', liveness_interval=0.5)
    staff = open_page(browser, DESKTOP)
    try:
        log_in(staff.page, demo.url, demo.password)

        other = staff.page.context.new_page()
        other.goto(f'{demo.url}/chat/staff')
        other.get_by_role('button', name=re.compile('^Log out')).click()
        other.wait_for_url('**/chat/login')

        status = staff.page.locator('#connection')
        expect(status).to_have_attribute('data-state', 'stopped')
        expect(status).to_contain_text('Your session has ended.')
        expect(status.get_by_role('link', name='Log in again')) \
            .to_have_attribute('href', '/chat/login')
        staff.page.wait_for_timeout(1500)
        expect(status).to_have_attribute('data-state', 'stopped')
        staff.check()
    finally:
        staff.page.context.close()
