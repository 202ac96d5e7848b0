"""The chat's pages, registered on `ChatApp`.

Customers start a chat with a form and talk on the conversation page;
staff log in, take requests on the dashboard and read transcripts in the
archive. Pages are rendered with Jinja2 with autoescaping on: chat text
is stored as sent and escaped exactly once, here.

"""

from __future__ import annotations

import re
from typing import Any

import morepath
from jinja2 import Environment, PackageLoader, select_autoescape
from webob.exc import HTTPForbidden, HTTPSeeOther

from onegov.chat.collections import ChatCollection, UserCollection
from onegov.chat.integration import ChatApp
from onegov.chat.models import Chat
from onegov.chat.models.user import burn_password_check

_templates = Environment(
    loader=PackageLoader('onegov.chat', 'templates'),
    autoescape=select_autoescape(default=True, default_for_string=True),
)

EMAIL = re.compile(r'[^@\s]{1,64}@[^@\s]{1,253}\.[^@\s.]{2,63}')


def render(
    request: morepath.Request, name: str, status: int = 200, **context: Any
) -> morepath.Response:
    """Render template `name` with `context` into a response."""
    session = request.browser_session
    context.setdefault('staff_name', (
        session.get('name') if session.get('role') == 'staff' else None
    ))
    app: Any = request.app
    context.setdefault('websocket_url', app.websocket_endpoint(request))
    context.setdefault('max_text_length', app.chat_max_text_length)
    body = _templates.get_template(name).render(request=request, **context)
    return morepath.Response(
        body=body, status=status, content_type='text/html', charset='utf-8'
    )


def redirect(location: str) -> morepath.Response:
    """See other: the answer to a form that worked (303)."""
    return morepath.Response(status=303, location=location)


def chats(request: morepath.Request) -> ChatCollection:
    app: Any = request.app
    return ChatCollection(app.chat_db(), app.application_id)


def is_staff(request: morepath.Request) -> bool:
    session = request.browser_session
    return session.get('role') == 'staff' and 'user_id' in session


def require_staff(request: morepath.Request) -> None:
    """Send anyone but staff to the login page."""
    if not is_staff(request):
        raise HTTPSeeOther(location=request.link(Login()))


def require_same_origin(request: morepath.Request) -> None:
    """Refuse a form posted from another site (403).

    The session cookie is ``SameSite=Lax`` already; this is the second
    line: browsers send ``Origin`` with every POST (OWASP CSRF
    Prevention Cheat Sheet, "Verifying Origin With Standard Headers").

    """
    origin = request.headers.get('Origin')
    if origin is not None and origin != request.host_url:
        raise HTTPForbidden()


def field(request: morepath.Request, name: str, limit: int) -> str:
    value = request.POST.get(name, '')
    return value.strip()[:limit + 1] if isinstance(value, str) else ''


# Models --------------------------------------------------------------------


class CustomerStart:
    """The form a customer starts a chat with."""


class Conversation:
    """The customer's own chat."""


class Login:
    """The staff login."""


class Logout:
    """The staff logout."""


class Dashboard:
    """The staff dashboard."""


class Archive:
    """The ended chats."""


class ArchivedChat:
    def __init__(self, chat_id: str) -> None:
        self.chat_id = chat_id


@ChatApp.path(model=CustomerStart, path='/chat')
def get_start() -> CustomerStart:
    return CustomerStart()


@ChatApp.path(model=Conversation, path='/chat/conversation')
def get_conversation() -> Conversation:
    return Conversation()


@ChatApp.path(model=Login, path='/chat/login')
def get_login() -> Login:
    return Login()


@ChatApp.path(model=Logout, path='/chat/logout')
def get_logout() -> Logout:
    return Logout()


@ChatApp.path(model=Dashboard, path='/chat/staff')
def get_dashboard() -> Dashboard:
    return Dashboard()


@ChatApp.path(model=Archive, path='/chat/archive')
def get_archive() -> Archive:
    return Archive()


@ChatApp.path(model=ArchivedChat, path='/chat/archive/{chat_id}')
def get_archived_chat(chat_id: str) -> ArchivedChat:
    return ArchivedChat(chat_id)


# Customers -----------------------------------------------------------------


@ChatApp.view(model=CustomerStart, request_method='GET')
def view_start(
    self: CustomerStart, request: morepath.Request
) -> morepath.Response:
    return render(
        request, 'start.html', page='start', errors={}, values={}
    )


@ChatApp.view(model=CustomerStart, request_method='POST')
def start_chat(
    self: CustomerStart, request: morepath.Request
) -> morepath.Response:
    """Create a chat and bind it to this browser's session."""
    require_same_origin(request)
    values = {
        'name': field(request, 'name', 100),
        'email': field(request, 'email', 254),
        'topic': field(request, 'topic', 200),
    }
    errors = {}
    if not values['name'] or len(values['name']) > 100:
        errors['name'] = 'Please enter your name (up to 100 characters).'
    if not EMAIL.fullmatch(values['email']) or len(values['email']) > 254:
        errors['email'] = 'Please enter a valid e-mail address.'
    if not values['topic'] or len(values['topic']) > 200:
        errors['topic'] = 'Please say what it is about (up to 200 characters).'
    if errors:
        return render(
            request, 'start.html', status=400, page='start', errors=errors,
            values=values,
        )

    chat = chats(request).add(
        values['name'], values['email'], values['topic']
    )
    request.browser_session['chat_id'] = chat.id
    return redirect(request.link(Conversation()))


@ChatApp.view(model=Conversation, request_method='GET')
def view_conversation(
    self: Conversation, request: morepath.Request
) -> morepath.Response:
    session = request.browser_session
    chat = chats(request).by_id(session.get('chat_id'))
    if chat is None:
        return redirect(request.link(CustomerStart()))
    return render(request, 'conversation.html', chat=chat)


# Staff ---------------------------------------------------------------------


@ChatApp.view(model=Login, request_method='GET')
def view_login(self: Login, request: morepath.Request) -> morepath.Response:
    return render(
        request, 'login.html', page='login', error=None, username=''
    )


@ChatApp.view(model=Login, request_method='POST')
def login(self: Login, request: morepath.Request) -> morepath.Response:
    """Log a staff member in, under a new session id."""
    require_same_origin(request)
    app: Any = request.app
    username = field(request, 'username', 255)
    password = request.POST.get('password', '')
    password = password if isinstance(password, str) else ''

    user = UserCollection(app.chat_db(), app.application_id).by_username(
        username
    )
    if user is None:
        burn_password_check(password)
    if user is None or not user.check_password(password):
        return render(
            request, 'login.html', status=401, page='login',
            error='Unknown user name or wrong password.', username=username,
        )

    session = request.browser_session
    # A new id on every change of privilege: an id planted in the browser
    # before the login is worth nothing after it (session fixation).
    session.rotate()
    session['user_id'] = user.id
    session['role'] = user.role
    session['name'] = user.display_name
    return redirect(request.link(Dashboard()))


@ChatApp.view(model=Logout, request_method='POST')
def logout(self: Logout, request: morepath.Request) -> morepath.Response:
    require_same_origin(request)
    request.browser_session.invalidate()
    return redirect(request.link(Login()))


@ChatApp.view(model=Dashboard, request_method='GET')
def view_dashboard(
    self: Dashboard, request: morepath.Request
) -> morepath.Response:
    require_staff(request)
    session = request.browser_session
    collection = chats(request)
    return render(
        request, 'dashboard.html', page='dashboard',
        waiting=collection.waiting(),
        active=collection.active(session['user_id']),
    )


@ChatApp.view(model=Archive, request_method='GET')
def view_archive(
    self: Archive, request: morepath.Request
) -> morepath.Response:
    require_staff(request)
    return render(
        request, 'archive.html', page='archive',
        chats=chats(request).archived(),
        ArchivedChat=ArchivedChat,
    )


@ChatApp.view(model=ArchivedChat, request_method='GET')
def view_archived_chat(
    self: ArchivedChat, request: morepath.Request
) -> morepath.Response:
    require_staff(request)
    chat: Chat | None = chats(request).by_id(self.chat_id)
    if chat is None or chat.state != 'ended':
        return render(request, 'not_found.html', status=404)
    return render(request, 'transcript.html', page='archive', chat=chat)
