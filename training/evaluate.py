"""`autoopt evaluate`: every policy on the same scenarios and seeds, as a table, JSON and plots.

Policies: the learned one (an exported runtime policy, run behind the guard exactly as
in the engine) and the baselines: `default`, `best-static` (searched on the training
scenarios, or on these with --best-static-on eval), `aimd` (Clipper-style, other knobs
at best-static), `oracle` (hindsight best static per window).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..agents.aimd import AIMDPolicy
from ..agents.base import KnobPolicy, as_controller, default_policy
from ..agents.best_static import SearchResult, best_static_policy, search_best_static
from ..agents.learned import LearnedPolicy
from ..agents.oracle import build_oracle
from ..engine.argtypes import nonneg_float, positive_float
from ..engine.knob_space import KNOB_TABLES, knob_position
from ..engine.strict_json import dumps_strict
from ..engine.telemetry import SLO, IterationStats
from ..envs.scenario import Scenario, cached_trace, run_scenario
from ..policies.guard import KERNEL_MARGIN, add_kernel_check_args

BASELINES = ("default", "best-static", "aimd", "oracle")
METRICS = ("goodput_rps", "slo_attainment", "ttft_p99_ms", "tpot_p99_ms", "tokens_per_s", "ooms", "rejected", "lost")
BIN_S = 2.0


@dataclass
class Series:
    """A policy's run binned in time, for the plots."""

    t: list[float] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    iter_ms: list[float] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    # position of each knob in its table (fractional for the batch limits, which move freely)
    knobs: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n, _ in KNOB_TABLES})

    def recorder(self, engine_ref: list[Any]):
        acc = {"ok": 0, "ms": [], "bin": 0}

        def on_step(st: IterationStats) -> None:
            b = int(st.now_s // BIN_S)
            acc["ok"] += st.finished_ok
            acc["ms"].append(st.ms)
            if b != acc["bin"]:
                eng = engine_ref[0]
                self.t.append(acc["bin"] * BIN_S)
                self.ok.append(acc["ok"])
                self.iter_ms.append(float(np.mean(acc["ms"])))
                self.ttft_ms.append(eng.telemetry.ttft_avg_s * 1e3 if eng else math.nan)
                self.queue.append(st.queue_len)
                for name, _ in KNOB_TABLES:
                    self.knobs[name].append(knob_position(name, getattr(eng.knobs, name)) if eng else -1.0)
                acc.update(ok=0, ms=[], bin=b)

        return on_step

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "goodput_rps": [o / BIN_S for o in self.ok],
            "ttft_avg_ms": self.ttft_ms,
            "iteration_ms": self.iter_ms,
            "queue": self.queue,
            "knobs": self.knobs,
        }


def run_policy(
    policy: KnobPolicy, s: Scenario, slo: SLO, seed: int, backend: str = "sim"
) -> tuple[dict[str, Any], Series]:
    from ..engine.engine import Engine

    policy.reset()
    series = Series()
    engine_ref: list[Engine | None] = [None]
    control = as_controller(policy)

    def controller(engine: Engine):
        engine_ref[0] = engine
        return control(engine)

    report = run_scenario(
        s, slo, controller=controller, backend=backend, seed=seed, on_step=series.recorder(engine_ref)
    )
    return report, series


def training_scenarios(env_kwargs: dict[str, Any], duration_s: float = 60.0, time_scale: float = 1.0) -> list[Scenario]:
    """A small grid spanning the training distribution: each trace at two loads; on a card
    `time_scale` times slower, at loads divided by it (as the environment draws them)."""
    r = env_kwargs.get("randomize", {})
    traces = r.get("traces") or [env_kwargs.get("trace", "azure-conv")]
    lo, hi = r.get("load_scale", [env_kwargs.get("load_scale", 1.0)] * 2)
    caps = r.get("memory_cap_gib")
    cap = float(np.sqrt(caps[0] * caps[1])) if caps else env_kwargs.get("memory_cap_gib")
    profile = env_kwargs.get("profile", "h100-gpt2-small")
    return [
        Scenario(
            trace=t,
            load_scale=float(x) / time_scale,
            memory_cap_gib=cap,
            profile=profile,
            start_s=0.0,
            duration_s=duration_s,
            time_scale=time_scale,
        )
        for t in traces
        for x in (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3)
    ]


def evaluate(
    scenarios: Sequence[Scenario],
    slo: SLO,
    learned: dict[str, Any] | None,
    baselines: Sequence[str],
    seed: int = 0,
    search_scenarios: Sequence[Scenario] | None = None,
    cache_dir: Path | None = Path("runs/cache"),
    backend: str = "sim",
    oracle_window_s: float = 30.0,
) -> dict[str, Any]:
    """Run every policy on every scenario; return the report (results, series, configs)."""
    from ..calibration.profile import load_profile

    device = load_profile(scenarios[0].profile).device["type"] if backend == "sim" else "cpu"
    search: SearchResult | None = None
    if any(b in baselines for b in ("best-static", "aimd", "oracle")):
        search = search_best_static(
            list(search_scenarios or scenarios),
            slo,
            device,
            seed=seed,
            cache_dir=cache_dir,
            progress=lambda m: print(f"\r  best-static search: {m}", end="", file=sys.stderr),
        )
        print(file=sys.stderr)
    policies: dict[str, Any] = {}
    margin = None if learned is None else learned.get("kernel_margin", KERNEL_MARGIN)  # the guard's kernel check
    if learned is not None:
        policies[learned["name"]] = lambda s: LearnedPolicy(
            learned["actor"], device, name=learned["name"], kernel_margin=margin
        )
    for b in baselines:
        if b == "default":
            policies[b] = lambda s: default_policy()
        elif b == "best-static":
            policies[b] = lambda s: best_static_policy(search)
        elif b == "aimd":
            policies[b] = lambda s: AIMDPolicy(search.knobs)
        elif b == "oracle":
            policies[b] = lambda s: build_oracle(s, slo, _oracle_candidates(search), oracle_window_s, seed)
        else:
            raise SystemExit(f"unknown baseline {b!r}; known: {', '.join(BASELINES)}")
    results: list[dict[str, Any]] = []
    for s in scenarios:
        for name, make in policies.items():
            print(f"  {s.label()}: {name}", file=sys.stderr)
            policy = make(s)
            rep, series = run_policy(policy, s, slo, seed, backend)
            guard = getattr(policy, "guard", None)
            row = {
                "scenario": s.label(),
                "policy": name,
                **{m: rep[m] for m in METRICS},
                "fallbacks": rep.get("fallbacks", 0),
                "kernel_holds": None if guard is None else guard.kernel_holds,
                "series": series.to_json(),
            }
            results.append(row)
    return {
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3},
        "seed": seed,
        "backend": backend,
        "scenarios": [s.to_dict() | {"label": s.label()} for s in scenarios],
        "best_static": search.knobs.to_dict() if search else None,
        "kernel_margin": margin,  # inf (null in JSON): no check
        "results": results,
    }


def _oracle_candidates(search: SearchResult, n: int = 8) -> list:
    top = search.top(n)
    best = search.knobs
    for seqs in (8, 16, 32, 64, 128, 256):
        cand = best.replace(max_num_seqs=seqs)
        if cand not in top:
            top.append(cand)
    return top


def format_table(report: dict[str, Any]) -> str:
    head = f"{'scenario':<44} {'policy':<12} {'goodput':>8} {'SLO att':>8} {'TTFT p99':>9} {'TPOT p99':>9} {'tok/s':>8} {'OOMs':>5} {'rej':>5} {'lost':>5}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['scenario'][:44]:<44} {r['policy']:<12} {r['goodput_rps']:>8.2f} {r['slo_attainment']:>8.1%} "
            f"{_f(r['ttft_p99_ms']):>9} {_f(r['tpot_p99_ms']):>9} {r['tokens_per_s']:>8.0f} {r['ooms']:>5} "
            f"{r['rejected']:>5} {r['lost']:>5}"
        )
    return "\n".join(lines)


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


def load_learned(spec: str) -> dict[str, Any]:
    from ..policies import resolve_policy
    from ..policies.runtime import RuntimePolicy

    path = resolve_policy(spec)
    return {"name": "ppo", "actor": RuntimePolicy.load(path), "path": str(path)}


def evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="autoopt evaluate", description="Compare policies and baselines on traces.")
    p.add_argument(
        "--policy",
        default="h100-gpt2-small",
        help="a shipped policy name or an exported policy dir ('none' for baselines only)",
    )
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument(
        "--trace", action="append", default=None, help="trace path, shipped name or synthetic spec (repeatable)"
    )
    p.add_argument("--profile", default="h100-gpt2-small")
    p.add_argument("--load-scale", type=positive_float, nargs="+", default=[4.0])
    p.add_argument("--memory-cap", type=nonneg_float, nargs="+", default=[4.0], help="GiB; 0 for the whole device")
    p.add_argument(
        "--scenario",
        nargs=3,
        action="append",
        default=None,
        metavar=("TRACE", "LOAD", "CAP_GIB"),
        help="one scenario (repeatable), for traces whose stress loads differ; replaces the "
        "--trace x --load-scale x --memory-cap grid",
    )
    p.add_argument("--start", type=nonneg_float, default=0.0)
    p.add_argument("--duration", type=positive_float, default=120.0)
    p.add_argument("--slo-ttft-ms", type=positive_float, default=None)
    p.add_argument("--slo-tpot-ms", type=positive_float, default=None)
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="sim: run the profile's card this many times slower (> 1) or faster (< 1); outside the "
        "policy's randomize.time_scale, a card it was not trained on (iteration times and the card probe "
        "scale, switch costs do not)",
    )
    p.add_argument("--best-static-on", choices=("train", "eval"), default="train")
    add_kernel_check_args(p, "the learned policy's guard")
    p.add_argument("--backend", choices=("sim", "live"), default="sim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None)
    a = p.parse_args(argv)
    learned = None if a.policy == "none" else load_learned(a.policy) | {"kernel_margin": a.kernel_margin}
    env_kwargs = learned["actor"].manifest.get("env_kwargs", {}) if learned else {}
    slo = SLO(
        (a.slo_ttft_ms or env_kwargs.get("slo_ttft_ms", 1000.0)) / 1e3,
        (a.slo_tpot_ms or env_kwargs.get("slo_tpot_ms", 100.0)) / 1e3,
    )
    traces = a.trace or ["azure-conv"]
    grid = [(t, x, c) for t in traces for x in a.load_scale for c in a.memory_cap]
    if a.scenario:
        try:
            grid = [(t, positive_float(x), nonneg_float(c)) for t, x, c in a.scenario]
        except argparse.ArgumentTypeError as exc:
            p.error(f"--scenario takes TRACE LOAD CAP_GIB, LOAD > 0 and CAP_GIB >= 0 (0: the whole device): {exc}")
    for t in dict.fromkeys(t for t, _, _ in grid):  # a bad trace is found now, not after the earlier scenarios
        cached_trace(t)
    scenarios = [
        Scenario(
            trace=t,
            load_scale=x,
            memory_cap_gib=c or None,
            profile=a.profile,
            start_s=a.start,
            duration_s=a.duration,
            time_scale=a.time_scale,
        )
        for t, x, c in grid
    ]
    if a.time_scale != 1.0 and a.backend != "sim":
        p.error("--time-scale applies to the simulator (--backend sim) only")
    if not (math.isfinite(a.time_scale) and a.time_scale > 0):
        p.error("--time-scale must be a positive number")
    # on a scaled card, the training grid's loads follow the card (as the environment's do)
    search = (
        training_scenarios(env_kwargs, time_scale=a.time_scale) if a.best_static_on == "train" and env_kwargs else None
    )
    baselines = [b for b in a.baselines.split(",") if b]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:  # before the best-static search, which takes minutes
        p.error(f"unknown baseline(s) {', '.join(map(repr, unknown))}; known: {', '.join(BASELINES)}")
    report = evaluate(scenarios, slo, learned, baselines, a.seed, search, backend=a.backend)
    if learned:
        report["policy"] = learned["path"]
    print(format_table(report))
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(dumps_strict(report, indent=1))
        print(f"report written to {a.report}", file=sys.stderr)
    if a.plots:
        from .plots import plot_report

        for path in plot_report(report, a.plots):
            print(f"plot written to {path}", file=sys.stderr)
    return 0
