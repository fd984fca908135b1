"""`autoopt train`: PPO on the simulated environment, watched in TensorBoard.

A CleanRL-style straight line: read the zoo-layout YAML, build the vectorised env with
VecNormalize, build (Maskable)PPO, attach the callbacks (environment scalars, held-out
evaluation against best-static, checkpoints), learn, save, export the runtime policy.
`--resume` continues from the newest checkpoint; Ctrl-C saves before exiting.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..engine.argtypes import positive_int
from ..envs import ENV_ID

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ppo.yaml"
HYPERPARAMS = ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "learning_rate", "ent_coef", "clip_range")


def load_config(path: Path | None) -> dict[str, Any]:
    """The env's section of a zoo-layout YAML file, with its strings parsed safely."""
    path = path or DEFAULT_CONFIG
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"{path}: cannot read the training config: {exc}") from exc
    if not isinstance(doc, dict) or ENV_ID not in doc:
        raise SystemExit(f"{path}: expected a top-level key {ENV_ID!r} (rl-baselines3-zoo layout)")
    cfg = dict(doc[ENV_ID])
    cfg["normalize"] = _parse_dict_call(cfg.get("normalize", "dict()"), "normalize")
    cfg["policy_kwargs"] = _parse_policy_kwargs(cfg.get("policy_kwargs", "dict()"))
    return cfg


def _parse_dict_call(text: Any, what: str) -> dict[str, Any]:
    """`dict(a=1, b=[2])` as zoo files write it, evaluated without eval()."""
    if isinstance(text, dict):
        return text
    if isinstance(text, bool):
        return {"norm_obs": text, "norm_reward": text}
    try:
        call = ast.parse(str(text), mode="eval").body
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "dict"):
            raise ValueError("not a dict(...) call")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
    except (SyntaxError, ValueError) as exc:
        raise SystemExit(f"config {what}: cannot parse {text!r}: {exc}") from exc


def _parse_policy_kwargs(text: Any) -> dict[str, Any]:
    import torch.nn as nn

    s = str(text)
    act = re.search(r"activation_fn\s*=\s*nn\.(\w+)", s)
    kwargs = _parse_dict_call(re.sub(r",?\s*activation_fn\s*=\s*nn\.\w+", "", s), "policy_kwargs")
    if act:
        if not hasattr(nn, act.group(1)):
            raise SystemExit(f"config policy_kwargs: unknown activation nn.{act.group(1)}")
        kwargs["activation_fn"] = getattr(nn, act.group(1))
    return kwargs


def make_env(cfg: dict[str, Any], n_envs: int, seed: int, monitor_dir: Path | None = None):
    from stable_baselines3.common.env_util import make_vec_env

    import autoopt  # noqa: F401  (registers the env id)

    # render_mode=None: SB3 asks for rgb_array by default, which this env does not draw.
    env_kwargs = {"render_mode": None, **cfg.get("env_kwargs", {})}
    return make_vec_env(
        ENV_ID, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, monitor_dir=str(monitor_dir) if monitor_dir else None
    )


def _algo(cfg: dict[str, Any]):
    name = cfg.get("algo", "MaskablePPO")
    if name == "MaskablePPO":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    if name == "PPO":
        from stable_baselines3 import PPO

        return PPO
    raise SystemExit(f"config algo must be MaskablePPO or PPO, got {name!r}")


def _latest_checkpoint(ckpt_dir: Path) -> tuple[Path, Path | None] | None:
    from ..policies.export import default_vecnormalize

    zips = sorted(ckpt_dir.glob("rl_model_*_steps.zip"), key=lambda p: int(p.stem.split("_")[-2]))
    return (zips[-1], default_vecnormalize(zips[-1])) if zips else None


def train(
    config: Path | None = None,
    timesteps: int | None = None,
    n_envs: int | None = None,
    seed: int | None = None,
    logdir: Path = Path("runs"),
    out: str = "ppo",
    resume: bool = False,
    progress_bar: bool = True,
    eval_freq: int | None = None,
    checkpoint_freq: int = 20000,
) -> Path:
    """Train and return the run directory (model.zip, vecnormalize.pkl, policy/, TB events)."""
    import torch
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.vec_env import VecNormalize

    from .callbacks import BestStaticEvalCallback, EnvScalarsCallback, HParamsCallback

    # A 64x64 MLP gains nothing from intra-op threads; they only contend with the envs.
    torch.set_num_threads(int(os.environ.get("AUTOOPT_TORCH_THREADS", "1")))
    cfg = load_config(config)
    timesteps = int(timesteps or cfg.get("n_timesteps", 100_000))
    n_envs = int(n_envs or cfg.get("n_envs", 4))
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    run_dir = Path(logdir) / out
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    algo_cls = _algo(cfg)

    venv = make_env(cfg, n_envs, seed, run_dir / "monitor")
    latest = _latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        model_path, vn_path = latest
        venv = VecNormalize.load(str(vn_path), venv) if vn_path else VecNormalize(venv, **cfg["normalize"])
        model = algo_cls.load(str(model_path), env=venv, tensorboard_log=str(run_dir / "tb"))
        print(f"resuming from {model_path} at {model.num_timesteps} steps", file=sys.stderr)
    else:
        shutil.rmtree(run_dir / "best", ignore_errors=True)  # an older run's selected model is no candidate
        (run_dir / "eval.json").unlink(missing_ok=True)
        venv = VecNormalize(venv, gamma=cfg.get("gamma", 0.99), **cfg["normalize"])
        params = {k: cfg[k] for k in HYPERPARAMS if k in cfg}
        model = algo_cls(
            cfg.get("policy", "MlpPolicy"),
            venv,
            seed=seed,
            policy_kwargs=cfg["policy_kwargs"],
            tensorboard_log=str(run_dir / "tb"),
            verbose=0,
            **params,
        )
        if cfg.get("warm_start") == "best-static":
            warm_start_from_best_static(model, cfg, Path(logdir) / "cache", cfg.get("warm_start_logit", 4.0))
        elif cfg.get("warm_start") == "aimd":
            stats = kickstart_from_aimd(model, venv, cfg, Path(logdir) / "cache", seed)
            (run_dir / "kickstart.json").write_text(json.dumps(stats, indent=2))
        elif cfg.get("warm_start") not in (None, "none"):
            raise SystemExit(f"config warm_start must be best-static, aimd or none, got {cfg['warm_start']!r}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({ENV_ID: _plain(cfg, timesteps, n_envs, seed)}))
    eval_cfg = cfg.get("eval", {})
    validation = None
    callbacks = [
        HParamsCallback(cfg, timesteps, n_envs, seed),
        EnvScalarsCallback(),
        CheckpointCallback(max(1, checkpoint_freq // n_envs), str(ckpt_dir), save_vecnormalize=True),
    ]
    if eval_cfg.get("scenarios"):
        validation = BestStaticEvalCallback(
            eval_cfg["scenarios"],
            cfg.get("env_kwargs", {}),
            eval_freq=max(1, int(eval_freq or eval_cfg.get("freq", 20000)) // n_envs),
            cache_dir=Path(logdir) / "cache",
            best_path=run_dir / "best",
            tolerance=float(eval_cfg.get("select_tolerance", 0.0)),
        )
        callbacks.append(validation)
    started = time.perf_counter()
    try:
        model.learn(
            total_timesteps=timesteps,
            callback=CallbackList(callbacks),
            progress_bar=progress_bar,
            reset_num_timesteps=latest is None,
            tb_log_name="ppo",
        )
    except KeyboardInterrupt:
        print("\ninterrupted: saving the model before exiting", file=sys.stderr)
    finally:
        model.save(str(run_dir / "model.zip"))
        venv.save(str(run_dir / "vecnormalize.pkl"))
    elapsed = time.perf_counter() - started
    if validation is not None and validation.evaluations:  # the last model is a candidate too
        validation.evaluate()
        model.logger.dump(model.num_timesteps)
    meta = {"timesteps": int(model.num_timesteps), "seed": seed, "n_envs": n_envs, "train_s": elapsed}
    (run_dir / "train.json").write_text(json.dumps(meta, indent=2))
    _export(run_dir, cfg, seed, int(model.num_timesteps))
    return run_dir


def searched_best_static(cfg: dict[str, Any], cache_dir: Path, profile: str | None = None) -> Any:
    """The best-static config on the training scenarios (one coordinate-descent pass, cached),
    on the env's profile or on `profile`."""
    from ..agents.best_static import search_best_static
    from ..calibration.profile import load_profile
    from ..engine.telemetry import SLO
    from .evaluate import training_scenarios

    env_kwargs = dict(cfg.get("env_kwargs", {}))
    if profile is not None:
        env_kwargs["profile"] = profile
    slo = SLO(env_kwargs.get("slo_ttft_ms", 1000.0) / 1e3, env_kwargs.get("slo_tpot_ms", 100.0) / 1e3)
    device = load_profile(env_kwargs.get("profile", "h100-gpt2-small")).device["type"]
    scenarios = training_scenarios(env_kwargs, duration_s=float(cfg.get("warm_start_window_s", 60.0)))
    print(
        f"warm start: searching best-static on {len(scenarios)} training scenarios "
        f"({env_kwargs.get('profile', 'h100-gpt2-small')})",
        file=sys.stderr,
    )
    result = search_best_static(scenarios, slo, device, max_passes=1, cache_dir=cache_dir)
    print(f"warm start from {result.knobs.to_dict()} ({result.goodput_rps:.2f} req/s)", file=sys.stderr)
    return result


def kickstart_from_aimd(model: Any, venv: Any, cfg: dict[str, Any], cache_dir: Path, seed: int) -> dict[str, float]:
    """Behaviour-clone AIMD's moves, with best-static's other knobs, before PPO (see
    kickstart.py). `kickstart_teachers: per-profile` gives each training profile AIMD over
    its own best-static knobs; a profile name uses that profile's knobs for every episode."""
    from ..agents.aimd import AIMDTeacher
    from .kickstart import ProfileTeachers, kickstart

    env_kwargs = cfg.get("env_kwargs", {})
    profiles = env_kwargs.get("randomize", {}).get("profiles") or [env_kwargs.get("profile", "h100-gpt2-small")]
    which = cfg.get("kickstart_teachers", "per-profile")
    if which == "per-profile":
        teacher: Any = ProfileTeachers(
            {p: AIMDTeacher(searched_best_static(cfg, cache_dir, p).knobs) for p in profiles}
        )
    else:
        teacher = AIMDTeacher(searched_best_static(cfg, cache_dir, str(which)).knobs)
    return kickstart(
        model,
        venv,
        teacher,
        steps=int(cfg.get("kickstart_steps", 32768)),
        epochs=int(cfg.get("kickstart_epochs", 10)),
        seed=seed,
    )


def warm_start_from_best_static(
    model: Any, cfg: dict[str, Any], cache_dir: Path, logit: float | dict[str, float]
) -> None:
    """Start PPO from the best static config instead of a uniform policy.

    A uniform start picks math attention, fp32 and tiny batches as often as anything else,
    overloads the engine, and spends most of a short budget relearning what a grid search
    already knows. So the search runs first (cached), and each action head's bias gets
    `logit` on the searched value: the deterministic policy starts as best-static, the
    stochastic one explores around it, and PPO learns when to leave it. `warm_start_heads`
    names the heads that get the prior; the others start uniform and are learned.
    `logit` may be a mapping {head: logit, "default": logit}: a strong prior on the knobs
    whose best value hardly moves (kernel, precision, graphs) keeps exploration where it
    pays, on the batch limits, whose best value moves with the load and the memory.
    """
    import torch

    from ..engine.knob_space import ACTION_DIMS, KNOB_NAMES, knobs_to_action

    action = knobs_to_action(searched_best_static(cfg, cache_dir).knobs)
    offsets = [sum(ACTION_DIMS[:h]) for h in range(len(ACTION_DIMS))]
    heads = cfg.get("warm_start_heads", list(KNOB_NAMES))
    logits = dict(logit) if isinstance(logit, dict) else {"default": logit}
    unknown = set(logits) - {"default", *KNOB_NAMES}
    if unknown:
        raise ValueError(f"warm_start_logit: unknown head(s) {sorted(unknown)}; known: {list(KNOB_NAMES)}")
    with torch.no_grad():
        bias = model.policy.action_net.bias
        for h, a in enumerate(action):
            name = KNOB_NAMES[h]
            if name in heads:
                bias[offsets[h] + int(a)] += float(logits.get(name, logits.get("default", 4.0)))


def _plain(cfg: dict[str, Any], timesteps: int, n_envs: int, seed: int) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k != "policy_kwargs"}
    pk = dict(cfg["policy_kwargs"])
    act = pk.pop("activation_fn", None)
    out["policy_kwargs"] = f"dict({', '.join(f'{k}={v!r}' for k, v in pk.items())}"
    out["policy_kwargs"] += f", activation_fn=nn.{act.__name__})" if act else ")"
    out["normalize"] = f"dict({', '.join(f'{k}={v!r}' for k, v in cfg['normalize'].items())})"
    out.update(n_timesteps=timesteps, n_envs=n_envs, seed=seed)
    return out


def policy_metadata(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """The manifest fields of a policy trained with `cfg`: the engine's observation and action
    layout (so the engine's guard accepts it), the masks of the profile's device, the env, its
    kwargs (the decision cadence among them), the profile and the seed."""
    from ..calibration.profile import load_profile
    from ..engine.features import FEATURE_NAMES
    from ..engine.knob_space import action_tables, mask_rules

    env_kwargs = cfg.get("env_kwargs", {})
    profile = load_profile(env_kwargs.get("profile", "h100-gpt2-small"))
    return {
        "obs_features": list(FEATURE_NAMES),
        "action_tables": action_tables(),
        "mask_rules": mask_rules(profile.device["type"]),
        "env_id": ENV_ID,
        "env_kwargs": env_kwargs,
        "profile": {"name": profile.name, "sha256": profile.sha256()},
        "seed": seed,
    }


def run_metadata(model_path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run an `autoopt train` model file belongs to (its folder, or the one above for a
    checkpoint) and `policy_metadata` from that run's config.yaml; None outside a run."""
    for run_dir in (model_path.parent, model_path.parent.parent):
        if (run_dir / "config.yaml").is_file():
            cfg = load_config(run_dir / "config.yaml")
            return run_dir, policy_metadata(cfg, int(cfg.get("seed", 0)))
    return None


def _export(run_dir: Path, cfg: dict[str, Any], seed: int, steps: int) -> Path:
    """The runtime policy of the run: the model the held-out validation selected (`best/`,
    see BestStaticEvalCallback), or the last one when the config has no validation."""
    from ..policies.export import export_policy

    chosen, evaluation = run_dir, {}
    if (run_dir / "best" / "model.zip").exists() and (run_dir / "eval.json").exists():
        chosen, evaluation = run_dir / "best", json.loads((run_dir / "eval.json").read_text())
        steps = int(evaluation["timesteps"])
        print(f"exporting the model at {steps} steps, selected on the held-out validation scenarios", file=sys.stderr)
    return export_policy(
        chosen / "model.zip",
        run_dir / "policy",
        vecnormalize_path=chosen / "vecnormalize.pkl",
        timesteps=steps,
        evaluation=evaluation,
        **policy_metadata(cfg, seed),
    )


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="autoopt train", description="Train PPO on the simulated environment.")
    p.add_argument("--config", type=Path, default=None, help=f"zoo-layout YAML (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--timesteps", type=positive_int, default=None)
    p.add_argument("--n-envs", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--logdir", type=Path, default=Path("runs"))
    p.add_argument("--out", default="ppo", help="run name: the run goes to LOGDIR/OUT")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of LOGDIR/OUT")
    p.add_argument("--eval-freq", type=positive_int, default=None, help="steps between held-out evaluations")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ship", action="store_true", help="also copy the exported policy into policies/shipped/")
    a = p.parse_args(argv)
    run_dir = train(a.config, a.timesteps, a.n_envs, a.seed, a.logdir, a.out, a.resume, not a.no_progress, a.eval_freq)
    print(f"run saved to {run_dir}; runtime policy at {run_dir / 'policy'}")
    print(f"watch it: tensorboard --logdir {run_dir / 'tb'}")
    if a.ship:
        from ..policies import SHIPPED_DIR

        dest = SHIPPED_DIR / "h100-gpt2-small"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run_dir / "policy", dest)
        shutil.copy(run_dir / "config.yaml", dest / "train_config.yaml")
        for record in ("train.json", "kickstart.json"):  # how long it took, how well it cloned
            if (run_dir / record).exists():
                shutil.copy(run_dir / record, dest / record)
        print(f"shipped to {dest}")
    return 0
