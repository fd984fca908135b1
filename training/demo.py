"""`autoopt demo`: the product in one go, on embedded defaults.

A short PPO run on the shipped H100 profile and the shipped Azure trace, then the
evaluation table of the freshly exported runtime policy against the baselines on the
Azure trace near the card's saturation point and on the Mooncake trace it never
trained on, with the plots. Everything lands in runs/demo/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.strict_json import dumps_strict
from ..engine.telemetry import SLO
from ..envs.scenario import Scenario
from .evaluate import BASELINES, evaluate, format_table, training_scenarios
from .train import load_config, train


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="autoopt demo", description=__doc__)
    p.add_argument("--timesteps", type=int, default=40_000, help="PPO steps for the short training run")
    p.add_argument("--logdir", type=Path, default=Path("runs"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    print(f"[1/3] training PPO for {a.timesteps} steps on the simulator (profile h100-gpt2-small)")
    run_dir = train(None, a.timesteps, None, a.seed, a.logdir, "demo", progress_bar=not a.no_progress, eval_freq=10**12)
    cfg = load_config(None)
    env_kwargs = cfg["env_kwargs"]
    slo = SLO(env_kwargs["slo_ttft_ms"] / 1e3, env_kwargs["slo_tpot_ms"] / 1e3)
    print("[2/3] evaluating the exported runtime policy against the baselines")
    from ..policies.runtime import RuntimePolicy

    actor = RuntimePolicy.load(run_dir / "policy")
    # near the card's saturation point, where the knobs decide who meets the SLO
    scenarios = [
        Scenario("azure-conv", 24.0, 8.0, "h100-gpt2-small", start_s=0.0, duration_s=60.0, name="azure x24, 8 GiB"),
        Scenario(
            "mooncake-conv",
            36.0,
            4.0,
            "h100-gpt2-small",
            start_s=0.0,
            duration_s=60.0,
            name="mooncake (never trained on) x36, 4 GiB",
        ),
    ]
    report = evaluate(
        scenarios,
        slo,
        {"name": "ppo", "actor": actor},
        BASELINES,
        search_scenarios=training_scenarios(env_kwargs),
        cache_dir=a.logdir / "cache",
    )
    print(format_table(report))
    (run_dir / "evaluation.json").write_text(dumps_strict(report, indent=1))
    from .plots import plot_report

    plots = plot_report(report, run_dir / "plots")
    print("[3/3] done")
    print(f"  runtime policy: {run_dir / 'policy'}  (autoopt replay --policy {run_dir / 'policy'})")
    print(f"  TensorBoard:    tensorboard --logdir {run_dir / 'tb'}")
    print(f"  report, plots:  {run_dir / 'evaluation.json'}, {', '.join(str(p) for p in plots)}")
    return 0
