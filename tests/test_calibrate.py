"""calibrate(): a schema-valid profile, errors recorded per grid point, a budget that cuts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoopt.calibration.alloc_pressure import alloc_stream
from autoopt.calibration.calibrate import calibrate, calibrate_main
from autoopt.calibration.grid import default_grid, prompt_length
from autoopt.calibration.host_noise import HostNoise
from autoopt.calibration.profile import ProfileError
from autoopt.calibration.sim_executor import SimExecutor

BACKENDS = {"flash", "efficient", "math", "cudnn"}
PRECISIONS = {"bf16", "fp16", "fp32_tf32", "fp32"}
SWITCH_KEYS = {
    "empty_cache_ms",
    "set_allocator_ms",
    "precision_change_ms",
    "graph_capture_ms",
    "read_memory_stats_us",
    "mem_get_info_us",
}
SMALL = {
    "prefill": {"B": [1, 2], "L": [8, 24, 4096], "max_tokens": None},  # L=4096 > max_context 512: impossible
    "decode": {"B": [1, 3], "C": [16, 100]},
    "backends": ["math", "flash", "efficient"],
    "precisions": ["fp32"],
    "warmup": 0,
    "runs": 2,
    "decode_warmup": 1,
    "decode_runs": 2,
    "noise_probe_s": 1.0,
}


def check_schema(p: dict[str, Any]) -> None:
    """The profile schema, version 1 (briefs/profile_schema.md)."""
    assert p["format"] == "autoopt-profile" and p["version"] == 1 and isinstance(p["name"], str)
    pv = p["provenance"]
    for key, typ in (("device_name", str), ("torch", str), ("date", str), ("source", str), ("notes", str)):
        assert isinstance(pv[key], typ), key
    assert pv["device_type"] in ("cpu", "cuda") and isinstance(pv["grid"], dict)
    assert len(pv["date"]) == 10 and pv["date"][4] == "-"
    assert p["device"]["type"] == pv["device_type"] and isinstance(p["device"]["total_mem_bytes"], int)
    m = p["model"]
    assert set(m) == {"name", "layers", "d_model", "heads", "vocab", "max_context"}
    for row in p["prefill"]:
        assert set(row) == {"B", "L", "backend", "precision", "ms", "ms_min", "ms_max", "peak_alloc"}
        assert row["backend"] in BACKENDS and row["precision"] in PRECISIONS
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"]
        assert isinstance(row["peak_alloc"], int) and row["peak_alloc"] > 0
    for row in p["decode"]:
        assert set(row) == {
            "B", "C", "backend", "precision", "cuda_graphs", "ms", "ms_min", "ms_max", "capture_ms", "peak_alloc"
        }  # fmt: skip
        assert isinstance(row["cuda_graphs"], bool)
        assert row["capture_ms"] is None or row["capture_ms"] > 0
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"]
    assert set(p["switch"]) == SWITCH_KEYS
    assert all(isinstance(v, float) for v in p["switch"].values())
    assert isinstance(p["allocator"], dict)


def test_small_grid_profile_is_schema_valid_with_errors_recorded(tmp_path: Path) -> None:
    out = tmp_path / "p" / "cpu-tiny.json"
    prof = calibrate("tiny", "cpu", out, budget_s=60, grid=SMALL, progress=False, threads=1)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(prof))
    check_schema(on_disk)
    pv = on_disk["provenance"]
    assert on_disk["name"] == "cpu-tiny" and pv["device_type"] == "cpu" and pv["threads"] == 1
    assert not pv["cut"] and pv["grid"]["prefill"]["L"] == [8, 24, 4096]
    # the impossible points are errors, not the end of the run
    bad = [e for e in pv["errors"] if e["part"] == "prefill"]
    assert {(e["B"], e["L"]) for e in bad} == {(1, 4096), (2, 4096)}
    assert all("max_context" in e["error"] for e in bad)
    assert any("efficient" in s for s in pv["skipped"])  # no such kernel on the CPU
    combos = {(r["backend"], r["precision"]) for r in on_disk["prefill"]}
    assert combos == {("math", "fp32"), ("flash", "fp32")}
    assert {(r["B"], r["L"]) for r in on_disk["prefill"]} == {(1, 8), (1, 24), (2, 8), (2, 24)}
    assert {(r["B"], r["C"]) for r in on_disk["decode"]} == {(1, 16), (1, 100), (3, 16), (3, 100)}
    assert all(r["cuda_graphs"] is False and r["capture_ms"] is None for r in on_disk["decode"])
    assert pv["measured_points"] == len(on_disk["prefill"]) + len(on_disk["decode"]) == 16
    assert pv["planned_points"] == 16 + 4
    assert on_disk["switch"]["precision_change_ms"] > 0
    assert on_disk["allocator"] == {}
    assert pv["cpu_malloc"]["pinned"] in (True, False)  # what the engine set (see pin_cpu_malloc)
    assert pv["grid"]["prefill_lengths"] == "below"  # the CPU grid's default
    big = [r for r in on_disk["prefill"] if r["B"] == 2 and r["L"] == 24 and r["backend"] == "math"][0]
    small = [r for r in on_disk["prefill"] if r["B"] == 1 and r["L"] == 8 and r["backend"] == "math"][0]
    assert big["peak_alloc"] > small["peak_alloc"]
    # the prefill history: targets among the measured points, per kernel, timed after a
    # prefill of their own shape or another, each relative to (another, one decode step)
    after = pv["timing"]["prefill_after"]
    assert set(after["modes"]) == {"math/fp32", "flash/fp32"} and after["gaps"] == [0, 1, 4, 16]
    for table in after["modes"].values():
        assert len(table["targets"]) >= 2 and {tuple(t) for t in table["targets"]} <= {(1, 8), (1, 24), (2, 8), (2, 24)}
        assert all(row[1] == 1.0 for row in table["other"])
        assert all(0.2 < x < 5.0 for cond in ("same", "other") for row in table[cond] for x in row)
    # the host-noise probe: a second of back-to-back decode steps, their marginal (mean 1)
    # and how long the host's speed stayed off (host_noise.py)
    noise = HostNoise.from_dict(pv["timing"]["host_noise"])
    assert noise.samples >= 300 and 0.5 < noise.span_s <= 1.5
    assert np.mean(noise.quantiles) == pytest.approx(1.0, abs=1e-3) and len(noise.quantiles) == 50
    assert min(noise.quantiles) < 1.0 < max(noise.quantiles) and sum(noise.weights) <= 1.0


def test_budget_cuts_the_grid_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "cut.json"
    # written, for its provenance, but a profile with no rows is an error the simulator refuses
    assert (
        calibrate_main(["--model", "tiny", "--device", "cpu", "--out", str(out), "--budget-s", "0", "--no-progress"])
        == 1
    )
    with pytest.raises(ProfileError, match="no prefill and no decode rows"):
        SimExecutor(str(out))
    prof = json.loads(out.read_text())
    check_schema(prof)
    pv = prof["provenance"]
    assert pv["cut"] and "budget" in pv["cut_reason"]
    assert pv["measured_points"] == 0 < pv["planned_points"]
    assert pv["source"].startswith("autoopt calibrate --model tiny")
    assert set(prof["switch"]) and prof["prefill"] == [] and prof["decode"] == []


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown grid key"):
        calibrate("tiny", "cpu", None, grid={"nonsense": 1}, progress=False)
    with pytest.raises(ValueError, match="include 1"):
        calibrate("tiny", "cpu", None, grid={"history_gaps": [0, 4]}, progress=False)
    with pytest.raises(ValueError, match="prefill_lengths"):
        calibrate("tiny", "cpu", None, grid={"prefill_lengths": "odd"}, progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        calibrate("gpt5", "cpu", None, progress=False)
    assert calibrate_main(["--model", "gpt5", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2


def test_default_grids() -> None:
    cpu = default_grid("cpu")
    assert cpu["prefill"]["B"] == [1, 2, 4, 8, 16, 32] and cpu["decode"]["C"] == [32, 128, 256, 480]
    cuda = default_grid("cuda")
    assert cuda["prefill"]["max_tokens"] == 131072 and cuda["cuda_graphs"] == [False, True]
    assert set(cuda["backends"]) == BACKENDS and set(cuda["precisions"]) == PRECISIONS
    stream = alloc_stream(cuda["alloc"], 2048)
    assert len(stream) == 250 and all(16 <= n <= 2048 and 1 <= b * n <= 32768 for b, n in stream)
    assert stream == alloc_stream(cuda["alloc"], 2048)  # seeded


def test_prefill_rows_time_prompts_just_under_the_grid_length() -> None:
    """'below': a row L times prompts of L-1 down to L-1-L/64 tokens, never the aligned L
    itself (a power of two is the GEMMs' fast shape; served prompts rarely are one, and
    the engine never prefills max_context); 'exact' times L."""
    rng = np.random.default_rng(0)
    for n in (1, 8, 16, 64, 256, 512):
        drawn = {prompt_length(n, "below", rng) for _ in range(400)}
        if n == 1:
            assert drawn == {1}
            continue
        assert drawn == set(range(n - 1 - n // 64, n)), n
        assert prompt_length(n, "exact", rng) == n
    assert default_grid("cpu")["prefill_lengths"] == "below"
    assert default_grid("cuda")["prefill_lengths"] == "exact"  # as the shipped h100 profiles were measured
