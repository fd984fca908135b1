"""The engine's own cost per iteration (scheduler, telemetry, memory read, policy guard)
next to the model's, on a live torch run.

    python benchmarks/engine_overhead.py [--model gpt2-small] [--iterations 60] [--policy DIR]

Prints, side by side, the median model time per iteration, the median control-path time
(everything in `Engine.step` that is not the executor's forward), and their ratio; with
--policy, the same with the guarded runtime policy queried every iteration. Target
(issues 2 and 6): control path < 1% of an iteration of gpt2-small on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autoopt.engine.engine import Engine
from autoopt.engine.knobs import Knobs
from autoopt.engine.torch_executor import TorchExecutor
from autoopt.engine.traces import load_trace


class TimedExecutor:
    """Delegates to the real executor and records the time of each forward."""

    def __init__(self, inner: TorchExecutor) -> None:
        self.inner = inner
        self.device_type = inner.device_type
        self.capacity = inner.capacity
        self.execute_s: list[float] = []

    def apply_knobs(self, old, new):
        return self.inner.apply_knobs(old, new)

    def reference_decode_ms(self, attention):
        return self.inner.reference_decode_ms(attention)

    def execute(self, batch):
        t = time.perf_counter()
        out = self.inner.execute(batch)
        self.execute_s.append(time.perf_counter() - t)
        return out

    def release(self, requests):
        self.inner.release(requests)

    def memory(self, full):
        return self.inner.memory(full)


def measure(model: str, iterations: int, controller=None) -> tuple[float, float]:
    ex = TimedExecutor(TorchExecutor(model, device="cpu", max_slots=32, seed=0))
    trace = load_trace("azure-conv").scaled(4.0).window(0, 120).clip(ex.capacity.max_context)
    knobs = Knobs(attention="math", precision="fp32", max_num_seqs=16, max_batched_tokens=2048)
    engine = Engine(ex, trace.to_requests(), knobs, controller=controller)
    step_s = []
    for _ in range(iterations):
        t = time.perf_counter()
        if engine.step() is None:
            break
        step_s.append(time.perf_counter() - t)
    n = min(len(step_s), len(ex.execute_s))
    control = [s - e for s, e in zip(step_s[:n], ex.execute_s[:n], strict=True)]
    return statistics.median(ex.execute_s[:n]), statistics.median(control)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--policy", default=None, help="an exported runtime policy dir (default: the shipped one)")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_s, control_s = measure(a.model, a.iterations)
    print(f"model {a.model} on cpu, {torch.get_num_threads()} threads, median over {a.iterations} iterations")
    print(f"{'':<26}{'model ms':>10}{'control us':>12}{'control/iter':>14}")
    print(
        f"{'engine, static knobs':<26}{model_s * 1e3:>10.2f}{control_s * 1e6:>12.1f}{control_s / (model_s + control_s):>14.3%}"
    )
    try:
        from autoopt.policies import resolve_policy
        from autoopt.policies.guard import GuardedPolicy
        from autoopt.policies.runtime import RuntimePolicy

        policy = RuntimePolicy.load(resolve_policy(a.policy or "h100-gpt2-small"))
    except Exception as exc:  # no shipped policy yet: say so rather than fake a figure
        print(f"{'engine + guarded policy':<26} skipped: {exc}")
        return
    guard = GuardedPolicy(policy, "cpu", fallback=Knobs(attention="math", precision="fp32"))
    guard_s: list[float] = []

    def query_only(engine):
        # The full guarded query (observation, policy, masks, checks) every iteration, timed;
        # its answer is dropped so both runs execute the same knobs and the model times compare.
        t = time.perf_counter()
        guard(engine)
        guard_s.append(time.perf_counter() - t)
        return None

    model_p, control_p = measure(a.model, a.iterations, controller=query_only)
    g = statistics.median(guard_s)
    print(
        f"{'engine + guarded policy':<26}{model_p * 1e3:>10.2f}{control_p * 1e6:>12.1f}{control_p / (model_p + control_p):>14.3%}"
    )
    print(
        f"guarded policy query: median {g * 1e6:.1f} us = {g / (model_p + control_p):.4%} of an iteration "
        f"(target < 1%); fallbacks {guard.fallbacks}"
    )


if __name__ == "__main__":
    main()
