"""The simulator agrees with the live engine on this CPU (a small version of
benchmarks/sim_vs_live.py, catching regressions in either path).

The host's speed drifts over minutes when it is shared, so the test profiles it first (a
small grid, seconds) and replays right after; the bound is looser than the benchmark's 10%
because the replay is short and one noisy stretch weighs more.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from autoopt.calibration.calibrate import calibrate

BOUND = 0.25
GRID = {
    "prefill": {"B": [1, 2, 4], "L": [16, 64, 128, 256, 512], "max_tokens": 2048},
    "decode": {"B": [1, 2, 4, 8], "C": [32, 128, 256, 480]},
    "backends": ["math"],
    "precisions": ["fp32"],
    "warmup": 1,
    "runs": 4,
    "decode_warmup": 4,
    "decode_runs": 6,
    "passes": 3,
}


def _benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sim_vs_live.py"
    spec = importlib.util.spec_from_file_location("sim_vs_live", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the profile is calibrated
    yield
    torch.set_num_threads(before)


def _attempt(bench, tmp_path: Path, n: int) -> list[str]:
    """Profile the host, replay live and simulated; returns what disagrees (empty: all agree)."""
    profile = tmp_path / f"cpu-tiny-now-{n}.json"
    calibrate("tiny", "cpu", profile, grid=GRID, progress=False, threads=1, name="cpu-tiny-now")
    case = bench.Case("poisson", "poisson:rate=12,duration=60,prompt_median=96,output_median=32", 1.0, 20.0)
    rows, extra = bench.compare(case, str(profile))
    assert extra["completed"][0] == extra["completed"][1] == extra["arrived"] > 100  # nothing lost either way
    faults = []
    # the same batches cost about what the profile says (it describes the host as it is now)
    if not abs(extra["iter_ratio"] - 1.0) <= BOUND:
        faults.append(f"iteration time live/sim {extra['iter_ratio']:.3f}")
    for key in ("goodput_rps", "tokens_per_s", "ttft_p50_ms", "tpot_p50_ms"):
        live, sim, err = rows[key]
        if not (math.isfinite(err) and abs(err) <= BOUND):
            faults.append(f"{key}: live {live:.3f} sim {sim:.3f} ({err:+.1%})")
    return faults


def test_sim_and_live_agree_on_a_short_replay(tmp_path, one_thread):
    """A shared host can be slow for a stretch of seconds: one retry, both attempts reported."""
    bench = _benchmark()
    faults = _attempt(bench, tmp_path, 1)
    if faults:
        again = _attempt(bench, tmp_path, 2)
        assert not again, f"first attempt: {faults}; second attempt: {again}"
