"""The `autoopt` entry point: usage, unknown commands, and a reader that goes away."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autoopt.cli import COMMANDS, main


def test_usage_lists_every_command_and_an_unknown_one_is_an_error(capsys) -> None:
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in COMMANDS)
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["calibrate", "check", "--help"]])
def test_a_closed_pipe_on_stdout_ends_quietly(argv: list[str]) -> None:
    """`autoopt --help | head -1`: the reader is gone before the text is written. A
    traceback there would read as the tool's own failure."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the process writes: EPIPE on its first flush
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autoopt.cli", *argv], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr.decode(), done.stderr.decode()
