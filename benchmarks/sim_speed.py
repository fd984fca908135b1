"""Simulator and environment speed on one core.

    python benchmarks/sim_speed.py [--profile h100-gpt2-small] [--seconds 2] [--repeats 5]

Prints scheduler iterations per second of the engine over the simulator executor, replaying
the Azure trace at three loads (light; ~20 requests running; ~50 running with a queue
forming), and env steps per second of InferenceTuning-v0 (sim, one
engine iteration per step, random valid actions held for 50 steps), side by side with the
targets: >= 50,000 iterations/s with a realistic queue (issue 3) and >= 20,000 env steps/s
(issue 4). Each figure is the median of `--repeats` runs (the host may be shared: medians
over repeats, pinned to one core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

SIM_TARGET = 50_000
ENV_TARGET = 20_000
# (load scale of the Azure trace, what the queue looks like, judged against the target)
LOADS: tuple[tuple[float, str, bool], ...] = (
    (3.0, "light (~3 running)", False),
    (10.0, "realistic (~20 running)", True),
    (15.0, "heavy (~50 running, a queue)", True),
)
KNOBS = {"max_num_seqs": 64, "max_batched_tokens": 8192, "cuda_graphs": True}


def _engine(profile: str, load: float):
    from autoopt.calibration.sim_executor import SimExecutor
    from autoopt.engine.engine import Engine
    from autoopt.engine.knobs import Knobs
    from autoopt.engine.traces import load_trace

    ex = SimExecutor(profile, max_slots=256, seed=0)
    trace = load_trace("azure-conv").scaled(load).clip(ex.capacity.max_context)
    return Engine(ex, trace.to_requests(), Knobs(**KNOBS))


def sim_iterations_per_s(profile: str, load: float, seconds: float) -> tuple[float, float, float]:
    """(iterations/s, mean running, mean queued) over `seconds` of stepping, after a warm-up."""
    engine = _engine(profile, load)
    for _ in range(2000):  # past the empty start
        engine.step()
    n = running = queued = 0
    busy = 0.0
    while busy < seconds:
        t0 = time.perf_counter()
        for _ in range(1000):
            stats = engine.step()
            if stats is None:
                break
            running += stats.running
            queued += stats.queue_len
            n += 1
        busy += time.perf_counter() - t0
        if stats is None:  # the trace ran out: start it again (building is not timed)
            engine = _engine(profile, load)
    return n / busy, running / n, queued / n


def env_steps_per_s(profile: str, load: float, seconds: float) -> float:
    import gymnasium as gym

    import autoopt  # noqa: F401

    env = gym.make(
        "autoopt/InferenceTuning-v0", profile=profile, load_scale=load, iterations_per_step=1, episode_steps=100_000
    ).unwrapped
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


def _verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="h100-gpt2-small")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per run")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is printed)")
    a = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    print(f"profile {a.profile}; median of {a.repeats} runs of {a.seconds:g} s, one core")
    print(f"{'measure':<56}{'figure':>10}{'running':>9}{'queued':>9}{'target':>9}  verdict")
    for load, label, judged in LOADS:
        runs = [sim_iterations_per_s(a.profile, load, a.seconds) for _ in range(a.repeats)]
        it_s = statistics.median(r[0] for r in runs)
        verdict = _verdict(it_s, SIM_TARGET) if judged else "(info)"
        print(
            f"{f'sim iterations/s, azure x{load:g}: {label}':<56}{it_s:>10,.0f}"
            f"{runs[0][1]:>9.1f}{runs[0][2]:>9.1f}{SIM_TARGET:>9,}  {verdict}"
        )
    for load in (3.0, 10.0):
        steps_s = statistics.median(env_steps_per_s(a.profile, load, a.seconds) for _ in range(a.repeats))
        label = f"env steps/s, 1 iteration/step, load x{load:g}"
        print(f"{label:<56}{steps_s:>10,.0f}{'':>18}{ENV_TARGET:>9,}  {_verdict(steps_s, ENV_TARGET)}")


if __name__ == "__main__":
    main()
