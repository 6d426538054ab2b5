"""What every bad-input test asserts: exit code 2, exactly one ``error:`` line holding the
expected words (megatron_tempnet/cli.py), and no traceback."""
from __future__ import annotations

import subprocess


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error(out: subprocess.CompletedProcess, *words: str) -> str:
    """``out``: a finished command; returns its one error line."""
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-4000:]
    lines = error_lines(out.stderr)
    assert len(lines) == 1, out.stderr[-4000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
