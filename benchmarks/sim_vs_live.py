"""Simulator versus live engine on this CPU: the same trace, knobs and seed replayed twice.

    python benchmarks/sim_vs_live.py [--profile cpu-tiny] [--calibrate] [--rounds 3] [--duration 60] [--only NAME]

Each scenario runs through `Engine` over `TorchExecutor` (the tiny model on the CPU, one
torch thread, the virtual clock advanced by each iteration's measured time) and over
`SimExecutor` driven by the profile. Prints goodput, TTFT p50/p99, TPOT p50 and tokens/s
side by side with the relative error and PASS/FAIL at 10% (the issue's target).

A shared host drifts. On the 2-core development VM the same decode step's 10 s medians
ranged 0.80-1.19 ms within 150 s, and a live replay's iterations ran 0.79x-1.32x the time
a profile taken a minute earlier predicts. So the benchmark runs `--rounds` rounds: each
(with `--calibrate`) profiles the host (~25 s, the knobs' kernel and precision only), then
replays every case live. The simulator runs once, on the rows' medians over the rounds'
profiles (`pool_profiles`), against the median of the live replays; `spread` is the live
replays' (max - min) / median, the host's own noise, which bounds what any simulator can
match on this host.

Also printed, per case and round: `iter live/sim`, the live iterations' measured time over
that round's profile's prediction for the very same batches. It separates the two ways to
disagree: a profile that mispredicts an iteration (this ratio is off) and a scheduler
trajectory that amplifies small errors (the ratio is ~1 but the metrics are not).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoopt.calibration.sim_executor import SimExecutor
from autoopt.engine.engine import Engine, EngineConfig
from autoopt.engine.executor import Batch, MemoryReading, StepResult, SwitchReport
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request
from autoopt.engine.telemetry import SLO
from autoopt.engine.torch_executor import TorchExecutor
from autoopt.envs.scenario import Scenario, scenario_trace

TOLERANCE = 0.10
# (report key, label): the agreement targets, and TPOT for information
METRICS: tuple[tuple[str, str], ...] = (
    ("goodput_rps", "goodput req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("tokens_per_s", "tokens/s"),
)
JUDGED = ("goodput_rps", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s")
# The tiny model on one CPU thread prefills a 511-token prompt in ~10-25 ms and decodes a
# step in ~0.5-3 ms: these targets (a few prefills' worth of TTFT, a few mixed iterations'
# worth of TPOT) are met by a moderately loaded engine and missed in the bursts of a heavy
# one, so goodput measures the load rather than being all or nothing.
SLO_CPU_TINY = SLO(ttft_s=0.1, tpot_s=0.01)
KNOBS = Knobs(attention="math", precision="fp32", max_num_seqs=32, max_batched_tokens=2048)
MAX_SLOTS = 64  # the live executor's KV slots; the simulator gets the same


@dataclass(frozen=True)
class Case:
    """A scenario: a trace at a load scale, the first `duration_s` seconds of it."""

    name: str
    trace: str
    load_scale: float
    duration_s: float = 60.0

    def scenario(self, profile: str) -> Scenario:
        return Scenario(self.trace, self.load_scale, None, profile, 0.0, self.duration_s, self.name)


# Azure conversation prompts are mostly longer than the tiny model's 512-token context, so
# the clipped trace is prefill-heavy; the Poisson case is decode-heavy.
CASES: tuple[Case, ...] = (
    Case("azure-conv x3 (moderate)", "azure-conv", 3.0),
    Case("azure-conv x5 (heavy)", "azure-conv", 5.0),
    Case("poisson (decode-heavy)", "poisson:rate=20,duration=600,prompt_median=96,output_median=128", 1.0),
)


class Recorder:
    """The live executor, plus what the profile predicts for each batch it runs."""

    def __init__(self, live: TorchExecutor, timer: SimExecutor) -> None:
        self.live, self.timer = live, timer
        self.device_type = live.device_type
        self.measured_ms = 0.0
        self.predicted_ms = 0.0

    @property
    def capacity(self):  # noqa: ANN201 - the live executor's Capacity
        return self.live.capacity

    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        self.timer.apply_knobs(old, new)
        return self.live.apply_knobs(old, new)

    def reference_decode_ms(self, attention: str) -> float:
        return self.live.reference_decode_ms(attention)

    def execute(self, batch: Batch) -> StepResult:
        predicted = self.timer.iteration_ms(batch)
        result = self.live.execute(batch)
        if not result.oom:
            self.measured_ms += result.ms
            self.predicted_ms += predicted
        return result

    def release(self, requests: list[Request]) -> None:
        self.live.release(requests)

    def memory(self, full: bool) -> MemoryReading:
        return self.live.memory(full)


def replay(
    case: Case,
    profile: str,
    backend: str,
    *,
    knobs: Knobs = KNOBS,
    slo: SLO = SLO_CPU_TINY,
    seed: int = 0,
    noise: bool = False,
):
    """Run one case on one backend; returns (report, wall seconds, live/sim iteration ratio or nan)."""
    s = case.scenario(profile)
    recorder: Recorder | None = None
    executor: Any
    if backend == "live":
        live = TorchExecutor("tiny", "cpu", max_slots=MAX_SLOTS, seed=seed)
        timer = SimExecutor(profile, max_slots=MAX_SLOTS, max_context=live.capacity.max_context, seed=seed)
        executor = recorder = Recorder(live, timer)
    else:
        executor = SimExecutor(profile, max_slots=MAX_SLOTS, seed=seed, noise=noise)
    requests = scenario_trace(s, executor.capacity.max_context).to_requests()
    engine = Engine(executor, requests, knobs, EngineConfig(slo=slo))
    t0 = time.perf_counter()
    report = engine.run(until_s=2 * s.duration_s)  # the window, then as long again to drain
    wall = time.perf_counter() - t0
    report["goodput_rps"] = report["met_slo"] / s.duration_s  # over the window, as run_scenario
    report["busy_frac"] = engine.telemetry.busy_frac
    ratio = recorder.measured_ms / recorder.predicted_ms if recorder and recorder.predicted_ms else math.nan
    return report, wall, ratio


def rel_err(live: float, sim: float) -> float:
    if live == sim:
        return 0.0
    if not (math.isfinite(live) and math.isfinite(sim)) or live == 0:
        return math.inf
    return (sim - live) / abs(live)


def compare(
    case: Case, profile: str, *, knobs: Knobs = KNOBS, slo: SLO = SLO_CPU_TINY, seed: int = 0, noise: bool = False
):
    """Replay `case` live and simulated. Returns {metric: (live, sim, rel err)}, iteration ratio, walls."""
    live, wall_live, ratio = replay(case, profile, "live", knobs=knobs, slo=slo, seed=seed)
    sim, wall_sim, _ = replay(case, profile, "sim", knobs=knobs, slo=slo, seed=seed, noise=noise)
    rows = {key: (float(live[key]), float(sim[key]), rel_err(float(live[key]), float(sim[key]))) for key, _ in METRICS}
    extra = {
        "iter_ratio": ratio,
        "wall_live_s": wall_live,
        "wall_sim_s": wall_sim,
        "completed": (live["completed"], sim["completed"]),
        "arrived": live["arrived"],
        "slo_attainment": (live["slo_attainment"], sim["slo_attainment"]),
    }
    return rows, extra


def fresh_profile(knobs: Knobs, out: Path) -> str:
    """Profile this host now, for the knobs' kernel and precision only."""
    from autoopt.calibration.calibrate import calibrate

    grid = {"backends": [knobs.attention], "precisions": [knobs.precision]}
    calibrate("tiny", "cpu", out, grid=grid, progress=False, threads=1, name="cpu-tiny-fresh")
    return str(out)


def _row_key(kind: str, row: dict[str, Any]) -> tuple:
    return (kind, row["B"], row.get("L", row.get("C")), row["backend"], row["precision"], row.get("cuda_graphs"))


def pool_profiles(paths: list[str], out: Path) -> str:
    """One profile from calibrations of the same grid taken at different times: each row's
    ms is the median over them (ms_min/ms_max their extremes), and so is each measured
    slow-down, so the profile describes the host over the whole stretch they span."""
    profiles = [json.loads(Path(p).read_text()) for p in paths]
    pooled = copy.deepcopy(profiles[0])
    for kind in ("prefill", "decode"):
        rows: dict[tuple, list[dict[str, Any]]] = {}
        for prof in profiles:
            for row in prof[kind]:
                rows.setdefault(_row_key(kind, row), []).append(row)
        for row in pooled[kind]:
            same = rows[_row_key(kind, row)]
            row["ms"] = statistics.median(r["ms"] for r in same)
            row["ms_min"] = min(r["ms_min"] for r in same)
            row["ms_max"] = max(r["ms_max"] for r in same)
    timings = [prof["provenance"].get("timing") or {} for prof in profiles]
    timing = pooled["provenance"].setdefault("timing", {})
    timing["decode_after_prefill"] = statistics.median(t.get("decode_after_prefill", 1.0) for t in timings)
    by_prompt: dict[float, list[float]] = {}
    for t in timings:
        for n, ms in t.get("decode_after_prefill_ms_by_prompt") or []:
            by_prompt.setdefault(n, []).append(ms)
    timing["decode_after_prefill_ms_by_prompt"] = [[n, statistics.median(v)] for n, v in sorted(by_prompt.items())]
    pooled["name"] = f"{pooled['name']}-pooled"
    pooled["provenance"]["source"] = f"median of {len(paths)} calibrations interleaved with the live replays"
    out.write_text(json.dumps(pooled))
    return str(out)


def _median_report(reports: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(float(r[key]) for r in reports) for key, _ in METRICS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu-tiny", help="profile name or path (default: the shipped cpu-tiny)")
    p.add_argument("--calibrate", action="store_true", help="profile this host in each round and pool the profiles")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (calibration,) live replays of every case")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of each trace replayed")
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", action="store_true", help="the simulator draws iteration noise from the profile")
    a = p.parse_args()
    torch.set_num_threads(1)  # the profiles are calibrated with one thread
    cases = [Case(c.name, c.trace, c.load_scale, a.duration) for c in CASES if not a.only or a.only in c.name]
    tmp = Path(tempfile.mkdtemp())
    calibrations: list[str] = []
    live: dict[str, list[tuple[dict[str, Any], float, float]]] = {c.name: [] for c in cases}
    for r in range(max(1, a.rounds)):
        profile = a.profile
        if a.calibrate:
            t0 = time.perf_counter()
            profile = fresh_profile(KNOBS, tmp / f"cpu-tiny-fresh-{r}.json")
            calibrations.append(profile)
            print(f"round {r + 1}: calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        for case in cases:
            report, wall, ratio = replay(case, profile, "live", seed=a.seed)
            live[case.name].append((report, wall, ratio))
            print(f"round {r + 1}: {case.name} live in {wall:.0f} s, iter live/sim {ratio:.3f}", flush=True)
    profile = pool_profiles(calibrations, tmp / "cpu-tiny-pooled.json") if calibrations else a.profile
    print(
        f"\nprofile {profile}; knobs {KNOBS.attention}/{KNOBS.precision} max_num_seqs={KNOBS.max_num_seqs} "
        f"max_batched_tokens={KNOBS.max_batched_tokens}; SLO TTFT {SLO_CPU_TINY.ttft_s * 1e3:g} ms, "
        f"TPOT {SLO_CPU_TINY.tpot_s * 1e3:g} ms; torch threads {torch.get_num_threads()}; tolerance {TOLERANCE:.0%}"
        f"{'; simulator noise on' if a.noise else ''}\n"
        f"live: median of {a.rounds} replays; spread: (max - min) / median over them, the host's own noise"
    )
    failed = 0
    for case in cases:
        runs = live[case.name]
        reports = [x[0] for x in runs]
        med = _median_report(reports)
        sim, wall_sim, _ = replay(case, profile, "sim", seed=a.seed, noise=a.noise)
        arrived = reports[0]["arrived"]
        lost = [x["arrived"] - x["completed"] - x["rejected"] - x["queued"] - x["running"] for x in (*reports, sim)]
        print(
            f"\n== {case.name}: {case.trace} x{case.load_scale:g}, {case.duration_s:g} s, {arrived} requests; "
            f"iter live/sim {', '.join(f'{x[2]:.3f}' for x in runs)}; wall live {statistics.median(x[1] for x in runs):.1f} s, "
            f"sim {wall_sim:.2f} s; completed live {[x['completed'] for x in reports]} sim {sim['completed']}"
        )
        print(f"{'metric':<16}{'live':>12}{'spread':>9}{'sim':>12}{'rel err':>10}  verdict")
        for key, label in METRICS:
            values = [float(x[key]) for x in reports]
            spread = (max(values) - min(values)) / abs(med[key]) if med[key] else 0.0
            err = rel_err(med[key], float(sim[key]))
            ok = abs(err) <= TOLERANCE
            judged = key in JUDGED
            failed += judged and not ok
            verdict = ("PASS" if ok else "FAIL") + ("" if judged else " (info)")
            print(f"{label:<16}{med[key]:>12.3f}{spread:>9.1%}{float(sim[key]):>12.3f}{err:>+10.1%}  {verdict}")
        att = [x["slo_attainment"] for x in reports]
        print(f"{'SLO attainment':<16}{statistics.median(att):>12.3f}{'':>9}{sim['slo_attainment']:>12.3f}")
        assert not any(lost), f"requests unaccounted for: {lost}"
    print(
        f"\n{'all PASS' if not failed else f'{failed} FAIL'} (goodput, TTFT p50/p99, tokens/s within {TOLERANCE:.0%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
