"""RuntimePolicy against SB3's predict, side by side in one process, plus a fresh-process check.

    python benchmarks/policy_speed.py                      # trains and exports a small model in a temp dir
    python benchmarks/policy_speed.py --policy POLICY_DIR --model MODEL.zip [--vecnormalize VN.pkl]

Prints: parity over 100,000 observations (RuntimePolicy.act_batch and .act against SB3's
deterministic predict with the same normalisation), act median/p99 and SB3 predict median (in
alternating rounds, so both see the same machine), the speed-up, onnxruntime if installed, and
for a fresh interpreter that imports `autoopt.policies` and loads the policy: peak RSS and the
time from process start to a loaded policy. Ends with PASS/FAIL against the targets:
act median <= 5 us, >= 30x faster than SB3, RSS <= 40 MiB, ready <= 200 ms.
Without --model, the SB3 side is an SB3 policy rebuilt from the exported weights (same actor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_ACT_US = 5.0
TARGET_SPEEDUP = 30.0
TARGET_RSS_MIB = 40.0
TARGET_READY_MS = 200.0

# Runs in a fresh interpreter: argv[1] = policy dir, argv[2] = parent's time.time() just before spawning.
CHILD = r"""
import time
t_top = time.perf_counter()
import sys
import autoopt.policies as P
policy = P.RuntimePolicy.load(sys.argv[1])
policy.act([0.0] * policy.obs_dim)
t_ready = time.perf_counter()
wall_ready = time.time()
import json, resource
# VmHWM: the peak resident set of this process image. (ru_maxrss would also count the parent's
# pages: Linux carries the forked parent's high-water mark across exec.)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
heavy = [m for m in ("torch", "stable_baselines3", "sb3_contrib", "gymnasium") if m in sys.modules]
print(json.dumps({
    "rss_mib": int(status["VmHWM"].split()[0]) / 1024,
    "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "import_load_ms": (t_ready - t_top) * 1e3,
    "spawn_to_ready_ms": (wall_ready - float(sys.argv[2])) * 1e3,
    "heavy_modules": heavy,
}))
"""


# ---------------------------------------------------------------- a model to measure


def train_small_model(workdir: Path, obs_dim: int = 16, steps: int = 2048) -> tuple[Path, Path]:
    """A [64, 64] tanh PPO actor over 5 discrete heads, trained briefly with VecNormalize."""
    import gymnasium as gym
    from gymnasium import spaces
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    class Env(gym.Env):
        def __init__(self) -> None:
            self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
            self.action_space = spaces.MultiDiscrete([3, 4, 2, 2, 5])
            self._obs = np.zeros(obs_dim, np.float32)
            self._t = 0

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            self._t = 0
            self._obs = self.np_random.normal(100.0, 30.0, obs_dim).astype(np.float32)
            return self._obs, {}

        def step(self, action):
            reward = float(action[0] == int(self._obs[0] > 100)) + float(action[4] == int(self._obs[1]) % 5)
            self._t += 1
            self._obs = self.np_random.normal(100.0, 30.0, obs_dim).astype(np.float32)
            return self._obs, reward, False, self._t >= 64, {}

    venv = VecNormalize(DummyVecEnv([Env]))
    venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=256, batch_size=64, seed=0, device="cpu", verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # no /tmp/SB3-* directory
    model.learn(steps)
    model.save(workdir / "model.zip")
    venv.save(str(workdir / "vecnormalize.pkl"))
    return workdir / "model.zip", workdir / "vecnormalize.pkl"


def rebuild_sb3(policy: Any) -> Any:
    """An SB3 PPO whose actor carries the exported weights (for a policy shipped without its zip)."""
    import torch
    from gymnasium import spaces
    from stable_baselines3 import PPO

    m = policy.manifest
    obs_space = spaces.Box(-np.inf, np.inf, (policy.obs_dim,), np.float32)
    act_space = spaces.MultiDiscrete(list(policy.action_dims))
    hidden = [w.shape[0] for w, _ in policy._layers]  # noqa: SLF001
    act_fn = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[m["activation"]]

    model = PPO(
        "MlpPolicy",
        _spaces_env(obs_space, act_space),
        policy_kwargs={"net_arch": {"pi": hidden, "vf": [8]}, "activation_fn": act_fn},
        device="cpu",
        verbose=0,
    )
    with torch.no_grad():
        linears = [mod for mod in model.policy.mlp_extractor.policy_net if isinstance(mod, torch.nn.Linear)]
        for lin, (w, b) in zip(linears, policy._layers, strict=True):  # noqa: SLF001
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        w, b = policy._head  # noqa: SLF001
        model.policy.action_net.weight.copy_(torch.from_numpy(w))
        model.policy.action_net.bias.copy_(torch.from_numpy(b))
    return model


def _spaces_env(obs_space: Any, act_space: Any) -> Any:
    """An env that only carries the spaces SB3 needs to build a policy."""
    import gymnasium as gym

    class Env(gym.Env):
        observation_space, action_space = obs_space, act_space

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            return np.zeros(obs_space.shape, np.float32), {}

        def step(self, action):
            return np.zeros(obs_space.shape, np.float32), 0.0, True, False, {}

    return Env()


# ---------------------------------------------------------------- measurements


def time_calls(fn: Any, args: list[Any], rounds: int) -> list[float]:
    """Per-call microseconds of fn(arg) over `args`, `rounds` times."""
    pc = time.perf_counter_ns
    out = []
    for _ in range(rounds):
        for a in args:
            t0 = pc()
            fn(a)
            out.append((pc() - t0) / 1e3)
    return out


def fresh_process(policy_dir: Path, runs: int) -> list[dict[str, Any]]:
    results = []
    env = dict(os.environ)
    for _ in range(runs):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(policy_dir), repr(t0)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        wall = (time.time() - t0) * 1e3
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_ms"] = wall
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="policy_speed_"))
    try:
        return run(argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(argv: list[str] | None, tmp: Path) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, help="exported policy directory (default: train and export a small one)")
    ap.add_argument("--model", type=Path, help="the SB3 model zip the policy was exported from")
    ap.add_argument("--vecnormalize", type=Path, help="its VecNormalize statistics")
    ap.add_argument("--parity-n", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=5000, help="act calls per round")
    ap.add_argument("--sb3-calls", type=int, default=300, help="SB3 predict calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fresh-runs", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one observation at a time: threads only add overhead for SB3 too
    from autoopt.policies import RuntimePolicy
    from autoopt.policies.export import export_policy, sample_observations, sb3_predict

    if args.policy is None:
        print(f"training a small PPO model in {tmp} ...", flush=True)
        args.model, args.vecnormalize = train_small_model(tmp)
        args.policy = export_policy(args.model, tmp / "policy", vecnormalize_path=args.vecnormalize)
    policy = RuntimePolicy.load(args.policy)
    norm = policy.manifest.get("obs_norm")
    if args.model is not None:
        from autoopt.policies.export import load_model

        model, algo = load_model(args.model)
        sb3_label = f"{algo} {args.model.name}"
    else:
        model, sb3_label = rebuild_sb3(policy), "PPO rebuilt from the exported weights"
    print(f"policy: {policy!r}")
    print(f"SB3 side: {sb3_label}; torch {torch.__version__}, numpy {np.__version__}, 1 torch thread")

    # -------- parity
    obs = sample_observations(policy, args.parity_n, seed=2024)
    t0 = time.perf_counter()
    ours = policy.act_batch(obs)
    batch_s = time.perf_counter() - t0
    theirs = sb3_predict(model, obs, norm)
    bad = int((ours != theirs).any(axis=1).sum())
    n_single = min(len(obs), 20_000)
    single = np.array([policy.act(o) for o in obs[:n_single]])
    bad_single = int((single != theirs[:n_single]).any(axis=1).sum())
    print(
        f"\nparity: act_batch differs from SB3 predict on {bad} of {len(obs)} observations "
        f"(act_batch {batch_s * 1e6 / len(obs):.2f} us/obs); act differs on {bad_single} of {n_single}"
    )

    # -------- speed, alternating rounds
    rng = np.random.default_rng(7)
    rows = obs[rng.integers(0, len(obs), args.calls)]
    sb3_rows = [
        r
        if norm is None
        else np.clip(
            (r - np.asarray(norm["mean"])) / np.sqrt(np.asarray(norm["var"]) + norm["epsilon"]),
            -norm["clip_obs"],
            norm["clip_obs"],
        )
        for r in rows[: args.sb3_calls]
    ]
    act = policy.act
    predict = model.predict
    time_calls(act, list(rows[:1000]), 1)
    time_calls(lambda o: predict(o, deterministic=True), sb3_rows[:20], 1)
    act_us: list[float] = []
    sb3_us: list[float] = []
    for _ in range(args.rounds):
        act_us += time_calls(act, list(rows), 1)
        sb3_us += time_calls(lambda o: predict(o, deterministic=True), sb3_rows, 1)
    act_med, act_p99 = float(np.median(act_us)), float(np.percentile(act_us, 99))
    sb3_med = float(np.median(sb3_us))
    speedup = sb3_med / act_med
    print(f"\nRuntimePolicy.act  median {act_med:7.2f} us   p99 {act_p99:7.2f} us   ({len(act_us)} calls)")
    print(f"SB3 model.predict  median {sb3_med:7.2f} us   (normalised input; {len(sb3_us)} calls)")
    print(f"speed-up           {speedup:7.1f}x")
    mask = np.ones(sum(policy.action_dims), dtype=bool)
    mask[0] = False
    mask_us = time_calls(lambda o: act(o, mask), list(rows[:2000]), 2)
    print(f"act with a mask    median {float(np.median(mask_us)):7.2f} us")

    onnx_med = None
    try:
        import onnxruntime  # noqa: F401

        from autoopt.policies.onnx_export import check_onnx, export_onnx

        onnx_path = export_onnx(args.policy, tmp / "actor.onnx")
        report = check_onnx(args.policy, onnx_path, n=10_000)
        onnx_med = report["onnx_us_median"]
        print(f"onnxruntime        median {onnx_med:7.2f} us   ({report['mismatches']} mismatches on {report['n']})")
    except ImportError:
        print("onnxruntime        not installed")

    # -------- fresh process
    fresh = fresh_process(Path(args.policy), args.fresh_runs)
    rss = float(np.median([r["rss_mib"] for r in fresh]))
    ready = float(np.median([r["spawn_to_ready_ms"] for r in fresh]))
    inside = float(np.median([r["import_load_ms"] for r in fresh]))
    wall = float(np.median([r["wall_ms"] for r in fresh]))
    heavy = sorted({m for r in fresh for m in r["heavy_modules"]})
    print(
        f"\nfresh process (median of {len(fresh)}): peak RSS {rss:.1f} MiB; spawn to loaded policy {ready:.0f} ms "
        f"(import + load inside {inside:.0f} ms; whole process {wall:.0f} ms); heavy modules: {heavy or 'none'}"
    )
    print("  runs: " + "; ".join(f"{r['rss_mib']:.1f} MiB {r['spawn_to_ready_ms']:.0f} ms" for r in fresh))
    print(
        f"  (peak RSS is VmHWM; ru_maxrss reads {fresh[0]['ru_maxrss_mib']:.0f} MiB because Linux carries the "
        "forked parent's high-water mark across exec)"
    )

    checks = [
        ("parity (100k, every action equal)", bad == 0 and bad_single == 0, f"{bad} + {bad_single} differ"),
        (f"act median <= {TARGET_ACT_US} us", act_med <= TARGET_ACT_US, f"{act_med:.2f} us"),
        (f">= {TARGET_SPEEDUP:.0f}x faster than SB3 predict", speedup >= TARGET_SPEEDUP, f"{speedup:.1f}x"),
        (f"fresh process RSS <= {TARGET_RSS_MIB:.0f} MiB", rss <= TARGET_RSS_MIB, f"{rss:.1f} MiB"),
        (f"ready <= {TARGET_READY_MS:.0f} ms", ready <= TARGET_READY_MS, f"{ready:.0f} ms"),
        ("no torch/SB3/gymnasium in the runtime process", not heavy, ", ".join(heavy) or "none"),
    ]
    print()
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
