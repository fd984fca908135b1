"""The `autoopt` entry point: usage, unknown commands, and a reader that goes away."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from autoopt.cli import COMMANDS, main
from autoopt.engine.strict_json import dumps_strict


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


def test_bad_input_is_one_line_naming_the_file_and_exit_code_2(tmp_path, capsys) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,-5\n"
    )
    rc = main(["replay", "--backend", "sim", "--trace", str(trace), "--duration", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("autoopt replay: error: ") and "bad.csv: line 3" in err and "Traceback" not in err
    (tmp_path / "report.json").mkdir()
    rc = main(["replay", "--backend", "sim", "--report", str(tmp_path / "report.json"), "--duration", "5"])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--speedup", "0"],
        ["replay", "--drain", "-1"],
        ["replay", "--memory-cap-gib", "nan"],
        ["replay", "--memory-cap-gib", "-1"],
        ["replay", "--max-slots", "0"],
        ["evaluate", "--load-scale", "0"],
        ["evaluate", "--policy", "none", "--scenario", "azure-conv", "4", "inf"],
        ["evaluate", "--policy", "none", "--baselines", "default,bogus"],
        ["train", "--n-envs", "0"],
    ],
)
def test_a_number_or_name_no_run_can_use_is_refused_before_the_run(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_report_with_figures_that_have_no_value_is_strict_json(tmp_path) -> None:
    out = tmp_path / "report.json"
    # a window past the trace's end: no request, so no attainment and no percentiles
    assert (
        main(["replay", "--backend", "sim", "--start", "1e6", "--duration", "5", "--quiet", "--report", str(out)]) == 0
    )

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a report")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["arrived"] == 0 and report["slo_attainment"] is None and report["ttft_p50_ms"] is None


def test_an_error_that_is_not_bad_input_keeps_its_traceback(monkeypatch) -> None:
    """A bug (here a ValueError from inside a command) must not read as a bad flag."""

    def buggy(argv: list[str]) -> int:
        a, b = [1, 2, 3]  # noqa: F841 - the kind of slip a traceback must point at
        return 0

    monkeypatch.setitem(COMMANDS, "buggy", (buggy, "a command with a bug"))
    with pytest.raises(ValueError, match="too many values to unpack"):
        main(["buggy"])


def test_strict_json_writes_numpy_figures_as_numbers_and_their_gaps_as_null() -> None:
    report = {"a": np.float32("nan"), "b": np.int64(3), "c": np.array([1.0, np.inf]), "d": (math.nan, 2.5)}
    assert json.loads(dumps_strict(report)) == {"a": None, "b": 3, "c": [1.0, None], "d": [None, 2.5]}
