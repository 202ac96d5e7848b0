"""The test kit, as a host application uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / 'example_host'


def test_example_host_app_passes_with_the_test_kit() -> None:
    """The example host app's own suite, using only the test kit, passes.

    It runs in a pytest of its own, as in the host's repository.

    """
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         '--rootdir', str(EXAMPLE), '-c', str(EXAMPLE / 'pytest.ini'),
         str(EXAMPLE)],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '4 passed' in result.stdout
