"""Simulator and environment speed on one core.

    python benchmarks/sim_speed.py [--profile h100-gpt2-small] [--seconds 3]

Prints scheduler iterations per second of the engine over the simulator executor with a
realistic queue (the Azure trace at a load that keeps tens of requests running), and env
steps per second of InferenceTuning-v0 (sim, one engine iteration per step, random valid
actions held for 50 steps), side by side with the targets: >= 50,000 iterations/s (issue 3)
and >= 20,000 env steps/s (issue 4).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def sim_iterations_per_s(profile: str, seconds: float) -> tuple[float, float]:
    from autoopt.calibration.sim_executor import SimExecutor
    from autoopt.engine.engine import Engine
    from autoopt.engine.knobs import Knobs
    from autoopt.engine.traces import load_trace

    ex = SimExecutor(profile, max_slots=256, seed=0)
    trace = load_trace("azure-conv").scaled(3.0).clip(ex.capacity.max_context)
    engine = Engine(ex, trace.to_requests(), Knobs(max_num_seqs=64, max_batched_tokens=8192, cuda_graphs=True))
    running = []
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            if engine.step() is None:
                break
            running.append(engine.scheduler.num_running)
            n += 1
    return n / (time.perf_counter() - t0), float(np.mean(running))


def env_steps_per_s(profile: str, seconds: float) -> float:
    import gymnasium as gym

    import autoopt  # noqa: F401

    env = gym.make("autoopt/InferenceTuning-v0", profile=profile, load_scale=3.0, iterations_per_step=1,
                   episode_steps=100_000).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    action = env.action_space.sample()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            if n % 50 == 0:
                action = np.array([rng.integers(d) for d in env.action_space.nvec])
                action[3] = 1
            _, _, term, trunc, _ = env.step(action)
            n += 1
            if term or trunc:
                env.reset()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="h100-gpt2-small")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    it_s, mean_running = sim_iterations_per_s(a.profile, a.seconds)
    steps_s = env_steps_per_s(a.profile, a.seconds)
    print(f"{'measure':<40}{'figure':>12}{'target':>12}  verdict")
    print(f"{'simulator iterations/s (1 core)':<40}{it_s:>12,.0f}{50_000:>12,}  {'PASS' if it_s >= 50_000 else 'FAIL'}")
    print(f"{'  mean running sequences':<40}{mean_running:>12.1f}")
    print(f"{'env steps/s, 1 iteration/step (1 core)':<40}{steps_s:>12,.0f}{20_000:>12,}  {'PASS' if steps_s >= 20_000 else 'FAIL'}")


if __name__ == "__main__":
    main()
