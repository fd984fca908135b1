"""InferenceTuning-v0: tune a serving engine's knobs against its live workload.

The environment wraps the engine of `autoopt.engine` (``backend="live"``: the real torch
model; ``backend="sim"``: the same scheduler over an executor calibrated from a profile)
replaying a request trace. Each step applies one knob setting and runs engine iterations
under it: `iterations_per_step` of them (1 = every engine iteration), or, with `step_s`,
as many as it takes for the engine's clock to move `step_s` seconds. The embedded
runtime policy decides at the same cadence.

Why `step_s`: PPO discounts per step. With a fixed number of iterations per step, a
policy that makes iterations short (a tiny batch) makes each step cover less time, so the
arrivals it cannot serve fall further into the discounted future: under overload PPO
learned to shrink the batch to its floor and let the queue grow. With steps of equal
time, the discount is a discount in time, and stalling buys nothing.

## Observation space
`Box(low, high, (37,), float32)`, built by `autoopt.engine.features.ObservationBuilder`
(the same builder the engine's embedded policy uses). Non-finite telemetry is replaced by
the feature's neutral value and counted in ``info["nonfinite_obs"]``.

| # | feature | meaning, unit, normalisation | bounds |
|---|---------|------------------------------|--------|
| 0 | queue_len | waiting requests, log1p(n)/log1p(1024) | [0, 2] |
| 1 | queued_tokens | prompt tokens waiting, log1p(n)/log1p(1e6) | [0, 2] |
| 2 | arrival_rate_short | arrivals/s, 5 s moving average, log1p(r)/log1p(100) | [0, 2] |
| 3 | arrival_rate_long | arrivals/s, 60 s moving average, same scale | [0, 2] |
| 4 | running_frac | running sequences / KV-cache slots | [0, 1] |
| 5 | head_wait_vs_ttft | age of the oldest waiting request / TTFT SLO, log2 ratio / 4 | [-1, 1] |
| 6 | ttft_vs_slo | recent TTFT / TTFT SLO, log2 ratio / 4 | [-1, 1] |
| 7 | tpot_vs_slo | recent TPOT / TPOT SLO, log2 ratio / 4 | [-1, 1] |
| 8 | iteration_vs_tpot | recent iteration time / TPOT SLO, log2 ratio / 4 | [-1, 1] |
| 9 | slo_attainment | recent share of requests meeting both SLOs | [0, 1] |
| 10 | tokens_per_s | generated tokens/s, log1p(x)/log1p(1e6) | [0, 2] |
| 11 | busy_frac | share of recent time spent executing | [0, 1] |
| 12 | memory_headroom | free / capacity of device memory | [0, 1] |
| 13 | fragmentation | inactive split bytes / capacity | [0, 1] |
| 14 | recent_ooms | OOM events, moving average per iteration | [0, 1] |
| 15 | recent_retries | allocator retries, moving average per iteration | [0, 1] |
| 16 | oom_backoff | the scheduler's post-OOM shrink of the batch limits (1 = none) | [0, 1] |
| 17-20 | card_decode_flash/efficient/math/cudnn | the card's speed: a reference decode step (batch 64, context 512, bf16, graphs on CUDA; `engine/card.py`) per kernel, timed when the engine starts / TPOT SLO, log2 ratio / 4; 1 where the device cannot run the kernel | [-1, 1] |
| 21-22 | knob_max_num_seqs, knob_max_batched_tokens | log(limit/low) / log(high/low), range 4-256 and 1024-32768 | [0, 1] |
| 23-26 | knob_attention=flash/efficient/math/cudnn | one-hot | [0, 1] |
| 27 | knob_cuda_graphs | 0/1 | [0, 1] |
| 28-31 | knob_precision=bf16/fp16/fp32_tf32/fp32 | one-hot | [0, 1] |
| 32-35 | knob_allocator=default/expandable/split128/gc08_split128 | one-hot | [0, 1] |
| 36 | knob_reclaim | 0/1 (reclaim is one-shot, so 0 after it acts) | [0, 1] |

## Action space
`MultiDiscrete([7, 7, 4, 2, 4, 4, 2])` over the heads of `autoopt.engine.knob_space`:

| head | knob | entries |
|------|------|---------|
| 0 | max_num_seqs | a move of the limit in force: x0.5, x0.8, x0.95, hold, x1.05, x1.25, x2 (within 4-256) |
| 1 | max_batched_tokens | the same moves (within 1024-32768) |
| 2 | attention | flash, efficient, math, cudnn |
| 3 | cuda_graphs | off, on (decode step replayed from a captured graph) |
| 4 | precision | bf16, fp16, fp32_tf32, fp32 |
| 5 | allocator | default, expandable, split128, gc08_split128 |
| 6 | reclaim | no, yes (`torch.cuda.empty_cache()` before the next iteration) |

The batch limits move rather than jump: a table of absolute limits reaches only its
entries, and the best limit under load usually sits between them; a move changes the
limit by at least one unit and lands within the bounds (hold keeps it as it is).
`action_masks()` returns the flat per-head mask MaskablePPO expects: values the device
cannot run (CUDA graphs, efficient/cuDNN kernels, TF32, allocator settings on a CPU) and
the kernel/precision rule against the knobs in force (flash and cuDNN need bf16/fp16).
An invalid action is never an exception: it is mapped to the nearest valid knobs and
listed in ``info["action_repairs"]``.

## Reward
Per engine iteration, summed over the step; every part is in ``info["reward_parts"]``:
- ``goodput``: +1 per request finished within both SLOs (TTFT and TPOT);
- ``demand``: -1 per arrival. Every arrival is a debt that only serving it within its
  SLO repays, so a policy that serves everything on time earns 0 whatever the load or
  the iteration length, and longer iterations buy no reward by themselves;
- ``slo_miss``: -0.5 per request finished late;
- ``rejected``: -1 per request rejected (after repeated OOMs: a lost request);
- ``oom``: -0.5 per OOM event;
- ``switch``: -1 per 100 ms of knob-switch cost (graph captures, precision changes).
These are the default weights (`REWARD_WEIGHTS`); ``reward_weights`` overrides any of them
(training/configs/ppo.yaml weighs OOMs more, as the product promises no more OOMs than
the best static config).
The sum over an episode is (met - arrived) minus the penalties, a per-request scale at
which PPO's defaults behave.

## Queue timeout
A request that waited 4 TTFT SLOs in the queue is rejected ("waited over ... in the
queue"): clients give up, and shedding keeps an overloaded engine recoverable. The same
rule holds in the best-static search and in every evaluation.

## Episode end
- terminated: every request of the episode's trace window has arrived and left the engine.
- truncated: `episode_steps` steps have run.

## Live backend
``backend="live"`` runs the real torch engine (``model``, ``device``). Its clock is the
measured time of each iteration (``live_clock="measured"``), so two live episodes differ
even under one seed; ``live_clock="profile"`` keeps the real execution but charges the
clock from the profile, for reproducible live episodes.

## Randomisation
At each reset the env's seeded generator draws the trace (`randomize["traces"]`), the
load scale (`randomize["load_scale"]`: [low, high]), the memory cap in GiB
(`randomize["memory_cap_gib"]`), the profile (`randomize["profiles"]`, sim only), the
card's speed (`randomize["time_scale"]`: [low, high], log-uniform, sim only: every
iteration takes the profile's time x the draw, a card slower or faster than calibrated; the
drawn load is divided by it, so each card sees loads around its own knee), a
window start inside the trace and, with `randomize["initial_limits"]: true`, the batch
limits the episode starts from (log-uniform within their bounds), so that a policy
learns to reach a good limit from anywhere, as it must from a user's own setting. The same seed and actions give the same trajectory (sim).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..engine.engine import Engine
from ..engine.features import FEATURE_NAMES, HIGH, LOW, ObservationBuilder
from ..engine.knob_space import ACTION_DIMS, LIMIT_BOUNDS, action_mask, decode_action, knobs_to_action
from ..engine.knobs import Knobs
from ..engine.telemetry import SLO
from ..engine.traces import TraceError
from .scenario import Scenario, build_executor, cached_trace, engine_config, scenario_trace

BACKENDS = ("sim", "live")
# A step of `step_s` seconds ends after this many iterations even if the clock has not
# moved that far (it always has, unless iterations take no time at all).
MAX_ITERATIONS_PER_STEP = 100_000
REWARD_WEIGHTS = {"goodput": 1.0, "demand": 1.0, "slo_miss": 0.5, "rejected": 1.0, "oom": 0.5, "switch": 0.01}


class InferenceTuningEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        backend: str = "sim",
        profile: str = "h100-gpt2-small",
        model: str = "tiny",
        device: str = "cpu",
        trace: str = "azure-conv",
        load_scale: float = 1.0,
        slo_ttft_ms: float = 1000.0,
        slo_tpot_ms: float = 100.0,
        memory_cap_gib: float | None = None,
        episode_steps: int = 1024,
        iterations_per_step: int = 1,
        step_s: float | None = None,
        window_s: float = 600.0,
        max_slots: int = 256,
        initial_knobs: dict[str, Any] | None = None,
        randomize: dict[str, Any] | None = None,
        noise: bool = False,
        live_clock: str = "measured",
        reward_weights: dict[str, float] | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.render_mode = render_mode  # nothing is drawn: TensorBoard and the reports show the run
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if live_clock not in ("measured", "profile"):
            raise ValueError(f"live_clock must be 'measured' or 'profile', got {live_clock!r}")
        self.live_clock = live_clock
        if episode_steps < 1 or iterations_per_step < 1:
            raise ValueError("episode_steps and iterations_per_step must be >= 1")
        if step_s is not None and not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"step_s must be a positive number of seconds or None, got {step_s!r}")
        if not (math.isfinite(load_scale) and load_scale > 0):
            raise ValueError(f"load_scale must be a positive number, got {load_scale!r}")
        if memory_cap_gib is not None and not (math.isfinite(memory_cap_gib) and memory_cap_gib > 0):
            raise ValueError(f"memory_cap_gib must be a positive number of GiB, got {memory_cap_gib!r}")
        unknown = set(reward_weights or {}) - set(REWARD_WEIGHTS)
        if unknown:
            raise ValueError(f"reward_weights: unknown parts {sorted(unknown)}; the parts are {list(REWARD_WEIGHTS)}")
        self.reward_weights = {**REWARD_WEIGHTS, **{k: float(v) for k, v in (reward_weights or {}).items()}}
        if not all(math.isfinite(w) and w >= 0 for w in self.reward_weights.values()):
            raise ValueError(f"reward_weights must be finite and >= 0, got {reward_weights}")
        self.backend = backend
        self.profile_name = profile
        self.model = model
        self.device = device
        self.slo = SLO(ttft_s=slo_ttft_ms / 1e3, tpot_s=slo_tpot_ms / 1e3)
        self.episode_steps = episode_steps
        self.iterations_per_step = iterations_per_step
        self.step_s = step_s
        self.window_s = window_s
        self.max_slots = max_slots
        self.noise = noise
        self.initial_knobs = Knobs.from_dict(initial_knobs) if initial_knobs else Knobs()
        self.randomize = _check_randomize(randomize or {})
        self.base = {"trace": trace, "load_scale": load_scale, "memory_cap_gib": memory_cap_gib, "profile": profile}
        # Fail at construction, not mid-training, on an unknown trace or profile.
        for spec in [trace, *self.randomize.get("traces", [])]:
            cached_trace(spec)
        if backend == "sim":
            from ..calibration.profile import load_profile

            for name in [profile, *self.randomize.get("profiles", [])]:
                load_profile(name)
        elif "time_scale" in self.randomize:
            raise ValueError("randomize['time_scale'] applies to the simulator only: a live card runs at its own speed")
        self.features = ObservationBuilder()
        self.observation_space = spaces.Box(LOW, HIGH, dtype=np.float32)
        self.action_space = spaces.MultiDiscrete(np.array(ACTION_DIMS, dtype=np.int64))
        self.feature_names = FEATURE_NAMES
        self.engine: Engine | None = None
        self.scenario: Scenario | None = None
        self._steps = 0
        self._device_type = "cpu"

    # -- set-up -----------------------------------------------------------------------
    def _draw_scenario(self) -> Scenario:
        rng, r = self.np_random, self.randomize
        trace = r["traces"][rng.integers(len(r["traces"]))] if r.get("traces") else self.base["trace"]
        scale = float(rng.uniform(*r["load_scale"])) if "load_scale" in r else self.base["load_scale"]
        cap = float(rng.uniform(*r["memory_cap_gib"])) if "memory_cap_gib" in r else self.base["memory_cap_gib"]
        profile = r["profiles"][rng.integers(len(r["profiles"]))] if r.get("profiles") else self.base["profile"]
        time_scale = 1.0
        if "time_scale" in r:  # drawn only when asked, so other configs keep their streams
            lo, hi = r["time_scale"]
            time_scale = _log_uniform(rng, lo, hi)
            scale /= time_scale  # a card k times slower saturates at 1/k of the load
        span = cached_trace(trace).duration_s / scale
        start = float(rng.uniform(0.0, max(0.0, span - self.window_s)))
        return Scenario(trace, scale, cap, profile, start, self.window_s, time_scale=time_scale)

    def _build_engine(self, scenario: Scenario, seed: int) -> Engine:
        executor = build_executor(
            scenario,
            self.backend,
            seed=seed,
            max_slots=self.max_slots,
            model=self.model,
            device=self.device,
            noise=self.noise,
            live_clock=self.live_clock,
        )
        self._device_type = executor.device_type
        initial = self.initial_knobs
        if self.randomize.get("initial_limits"):
            initial = initial.replace(
                **{name: int(round(_log_uniform(self.np_random, lo, hi))) for name, (lo, hi) in LIMIT_BOUNDS.items()}
            )
        knobs, _ = decode_action(knobs_to_action(initial), self._device_type, current=initial)
        requests = scenario_trace(scenario, executor.capacity.max_context).to_requests()
        return Engine(executor, requests, knobs, engine_config(self.slo))

    # -- gymnasium API ----------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.scenario = self._draw_scenario()
        self._scenario_dict = self.scenario.to_dict()
        engine_seed = int(self.np_random.integers(2**31 - 1))
        self.engine = self._build_engine(self.scenario, engine_seed)
        self._steps = 0
        self.features.nonfinite = 0
        return self.features.build(self.engine), self._info({}, [], 0)

    def step(self, action):
        if self.engine is None:
            raise RuntimeError("call reset() before step()")
        engine = self.engine
        knobs, repairs = decode_action(action, self._device_type, current=engine.knobs)
        if knobs != engine.knobs:
            engine.set_knobs(knobs)
        parts = dict.fromkeys(REWARD_WEIGHTS, 0.0)
        terminated = False
        iterations = 0
        start_s = engine.now_s
        for _ in range(self.iterations_per_step if self.step_s is None else MAX_ITERATIONS_PER_STEP):
            if self.step_s is not None and iterations and engine.now_s - start_s >= self.step_s:
                break
            stats = engine.step()
            if stats is None:
                terminated = True
                break
            iterations += 1
            parts["goodput"] += stats.finished_ok
            parts["demand"] -= stats.arrivals
            parts["slo_miss"] -= stats.finished - stats.finished_ok
            parts["rejected"] -= stats.rejected
            parts["oom"] -= float(stats.oom)
            parts["switch"] -= stats.switch_ms
        if engine.exhausted:
            terminated = True
        self._steps += 1
        truncated = not terminated and self._steps >= self.episode_steps
        w = self.reward_weights
        weighted = {k: w[k] * v for k, v in parts.items()}
        reward = float(sum(weighted.values()))
        obs = self.features.build(engine)
        return obs, reward, terminated, truncated, self._info(weighted, repairs, iterations)

    def action_masks(self) -> np.ndarray:
        current = self.engine.knobs if self.engine is not None else None
        return action_mask(self._device_type, current).copy()

    def _info(self, reward_parts: dict[str, float], repairs: list[str], iterations: int) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None and self.scenario is not None
        tel = engine.telemetry
        return {
            "reward_parts": reward_parts,
            "action_repairs": repairs,
            "counts": engine.counts(),
            "now_s": engine.now_s,
            "iterations": iterations,
            "knobs": engine.knobs.to_dict(),
            "not_applicable": dict(engine.not_applicable),
            "ttft_avg_ms": tel.ttft_avg_s * 1e3,
            "tpot_avg_ms": tel.tpot_avg_s * 1e3,
            "slo_attainment": tel.slo_avg,
            "ooms": tel.ooms,
            "nonfinite_obs": self.features.nonfinite,
            "scenario": dict(self._scenario_dict),
        }


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A draw spread evenly over orders of magnitude (a limit, a card's speed)."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _check_randomize(r: dict[str, Any]) -> dict[str, Any]:
    known = {"traces", "load_scale", "memory_cap_gib", "profiles", "time_scale", "initial_limits"}
    unknown = set(r) - known
    if unknown:
        raise ValueError(f"unknown randomize key(s) {sorted(unknown)}; known: {sorted(known)}")
    for key in ("load_scale", "memory_cap_gib", "time_scale"):
        if key in r:
            lo, hi = r[key]
            if not (0 < lo <= hi and math.isfinite(hi)):
                raise ValueError(f"randomize[{key!r}] must be [low, high] with 0 < low <= high, got {r[key]!r}")
    for key in ("traces", "profiles"):
        if key in r and (not isinstance(r[key], (list, tuple)) or not r[key]):
            raise ValueError(f"randomize[{key!r}] must be a non-empty list")
    if not isinstance(r.get("initial_limits", False), bool):
        raise ValueError(f"randomize['initial_limits'] must be true or false, got {r['initial_limits']!r}")
    return {k: v if isinstance(v, bool) else list(v) for k, v in r.items()}


__all__ = ["InferenceTuningEnv", "Scenario", "TraceError", "REWARD_WEIGHTS"]
