"""The code itself: type checked and linted as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, '-m', *command],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_mypy_strict() -> None:
    """`mypy --strict src` finds nothing."""
    result = run('mypy', '--strict', 'src')
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    """`ruff check` finds nothing in the source, the tests and bench."""
    folders = [
        name for name in ('src', 'tests', 'bench') if (ROOT / name).is_dir()
    ]
    result = run('ruff', 'check', *folders)
    assert result.returncode == 0, result.stdout + result.stderr
