from __future__ import annotations

from typing import Any

import pytest
from townapp import TownApp

pytest_plugins = ['onegov.chat.testing']


@pytest.fixture
def chat_app(chat_settings: dict[str, Any]) -> Any:
    TownApp.commit()
    app = TownApp()
    app.configure_application(**chat_settings)
    app.set_application_id(chat_settings['application_id'])
    yield app
    app.dispose()
