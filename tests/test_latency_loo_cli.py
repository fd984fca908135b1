"""benchmarks/latency_loo.py reads any pair of measurement files, not only the shared folder.

The rows are the engine's own H100 measurements shipped in calibration/measured/ (two
groups of each, to keep the fits short), so the test needs no ../shared.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "calibration" / "measured"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("latency_loo", ROOT / "benchmarks" / "latency_loo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subset(src: Path, dst: Path, backends: set[str]) -> Path:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r["backend"] in backends and r["precision"] == "bf16"]
    dst.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return dst


def test_files_given_by_option_are_the_ones_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loo = _load_benchmark()
    pre = _subset(MEASURED / "h100-engine-prefill.jsonl", tmp_path / "p.jsonl", {"flash", "cudnn"})
    dec = _subset(MEASURED / "h100-engine-decode.jsonl", tmp_path / "d.jsonl", {"flash", "cudnn"})
    empty = tmp_path / "no-data-here"  # DATA_DIR without files: the options must win
    empty.mkdir()
    rc = loo.main([str(empty), "--prefill", str(pre), "--decode", str(dec)])
    out = capsys.readouterr().out
    assert rc in (0, 1)  # a verdict, not a usage error
    assert f"{pre}  (12 rows" in out and f"{dec}  (24 rows" in out
    for name in ("prefill bf16", "decode cuda-graphs", "decode eager"):
        assert any(line.strip().startswith(name) and ("PASS" in line or "FAIL" in line) for line in out.splitlines())


def test_a_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loo = _load_benchmark()
    dec = _subset(MEASURED / "h100-engine-decode.jsonl", tmp_path / "d.jsonl", {"flash"})
    rc = loo.main(["--prefill", str(tmp_path / "absent.jsonl"), "--decode", str(dec)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "absent.jsonl" in err and "d.jsonl" not in err
