"""The examples in examples/ run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_python_api_example(tiny_weights):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), str(tiny_weights)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "codes (1, 8, 97)" in result.stdout  # 7.7 s at 12.5 Hz
