"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_secure_echo_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "secure_echo.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "got b'HELLO OVER BOX-STREAM'" in result.stdout
    assert "is not authorized on this bus" in result.stdout
    assert "server hung up after msg3" in result.stdout
