"""The documentation site builds, warnings being errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / 'docs'

#: The pages the site must have.
PAGES = (
    'index', 'getting-started', 'configuration', 'security', 'protocol',
    'deployment', 'api', 'changelog', 'benchmarks',
)


def test_sphinx_build_passes_with_warnings_as_errors(tmp_path: Path) -> None:
    """``sphinx-build -W`` builds every section of the site."""
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q',
         '-b', 'html', str(DOCS), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in PAGES:
        assert (tmp_path / f'{page}.html').is_file(), page

    api = (tmp_path / 'api.html').read_text(encoding='utf-8')
    for name in ('ChatApp', 'consume_websocket_token', 'ChatServer'):
        assert name in api
