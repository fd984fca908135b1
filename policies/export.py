"""Export a trained SB3 model (PPO or MaskablePPO) to the runtime format.

Only the actor leaves: the policy network's Linear layers and activation, the action head, and
the VecNormalize observation statistics. The result is a directory with `weights.npz` (numeric
arrays only, read with allow_pickle=False) and `manifest.json` (layout, action tables, masks'
rules, provenance, checksum), which `RuntimePolicy.load` reads without torch. torch and
stable-baselines3 are imported inside the functions that need them, so importing this module
stays cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InputError
from .policy_file import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME
from .runtime import RuntimePolicy

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same model exports to the same bytes


class ExportError(InputError):
    """A model that cannot be exported to the runtime format, with the reason."""


def detect_algo(model_path: str | Path) -> str:
    """The algorithm, "MaskablePPO" or "PPO", from the policy class recorded in the SB3 zip (nothing unpickled)."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            data = json.loads(zf.read("data"))
    except (OSError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise ExportError(f"{model_path}: not a stable-baselines3 model zip ({e})") from None
    module = str(data.get("policy_class", {}).get("__module__", ""))
    return "MaskablePPO" if module.startswith("sb3_contrib.common.maskable") else "PPO"


def load_model(model_path: str | Path) -> tuple[Any, str]:
    """The SB3 model on CPU and its algorithm name."""
    algo = detect_algo(model_path)
    if algo == "MaskablePPO":
        try:
            from sb3_contrib import MaskablePPO
        except ImportError:
            raise ExportError(f"{model_path}: a MaskablePPO model needs sb3-contrib installed") from None
        return MaskablePPO.load(model_path, device="cpu"), algo
    from stable_baselines3 import PPO

    return PPO.load(model_path, device="cpu"), algo


def extract_actor(policy: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray], str]:
    """([(w, b)] of the hidden layers, (w, b) of the action head, activation) of an SB3 actor-critic.

    Refuses anything the runtime would not compute exactly as SB3 does: a features extractor
    other than Flatten, layers other than Linear + one activation, a non-discrete action space.
    """
    import torch.nn as nn
    from stable_baselines3.common.torch_layers import FlattenExtractor

    extractor = getattr(policy, "pi_features_extractor", None)
    if extractor is None:
        extractor = policy.features_extractor
    if not isinstance(extractor, FlattenExtractor):
        raise ExportError(
            f"the actor's features extractor is {type(extractor).__name__}; only FlattenExtractor is supported"
        )
    acts = {nn.Tanh: "tanh", nn.ReLU: "relu"}
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    activation: str | None = None
    modules = list(policy.mlp_extractor.policy_net)
    for i, mod in enumerate(modules):
        if i % 2 == 0:
            if not isinstance(mod, nn.Linear) or mod.bias is None:
                raise ExportError(f"policy_net[{i}] is {mod!r}; expected a Linear layer with bias")
            layers.append(_linear(mod))
        else:
            name = acts.get(type(mod))
            if name is None:
                raise ExportError(f"policy_net[{i}] is {mod!r}; supported activations are Tanh and ReLU")
            if activation not in (None, name):
                raise ExportError(f"policy_net mixes activations ({activation} and {name})")
            activation = name
    if len(modules) % 2:
        raise ExportError("policy_net ends with a Linear layer without its activation")
    head = policy.action_net
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ExportError(f"action_net is {head!r}; expected a Linear layer with bias")
    return layers, _linear(head), activation or "tanh"


def _linear(mod: Any) -> tuple[np.ndarray, np.ndarray]:
    w = mod.weight.detach().cpu().numpy().astype(np.float32, copy=True)
    b = mod.bias.detach().cpu().numpy().astype(np.float32, copy=True)
    return w, b


def action_sizes(action_space: Any) -> list[tuple[int, int]]:
    """[(size, start)] per head of a MultiDiscrete or Discrete space."""
    from gymnasium import spaces

    if isinstance(action_space, spaces.MultiDiscrete):
        if action_space.nvec.ndim != 1:
            raise ExportError(f"MultiDiscrete action space must be 1-D, got nvec shape {action_space.nvec.shape}")
        return [(int(n), int(s)) for n, s in zip(action_space.nvec, action_space.start, strict=True)]
    if isinstance(action_space, spaces.Discrete):
        return [(int(action_space.n), int(action_space.start))]
    raise ExportError(f"action space {action_space} is not Discrete or MultiDiscrete")


def read_vecnormalize(path: str | Path, obs_dim: int) -> dict[str, Any] | None:
    """The observation statistics of a saved VecNormalize, as the manifest's `obs_norm` (None if obs not normalised).

    The file is SB3's own pickle: only load one you produced.
    """
    with open(path, "rb") as f:
        vn = pickle.load(f)
    if not getattr(vn, "norm_obs", False):
        return None
    rms = vn.obs_rms
    if isinstance(rms, dict):
        raise ExportError(f"{path}: VecNormalize over a Dict observation space is not supported")
    mean = np.asarray(rms.mean, dtype=np.float64).reshape(-1)
    var = np.asarray(rms.var, dtype=np.float64).reshape(-1)
    if mean.shape[0] != obs_dim:
        raise ExportError(f"{path}: VecNormalize statistics have {mean.shape[0]} features, the model has {obs_dim}")
    return {"mean": mean.tolist(), "var": var.tolist(), "clip_obs": float(vn.clip_obs), "epsilon": float(vn.epsilon)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    """Write numeric arrays as an uncompressed npz with fixed member dates; return the bytes written."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), member.getvalue())
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def default_vecnormalize(model_path: Path) -> Path | None:
    """The observation statistics saved with a model: `vecnormalize.pkl` beside it, or for
    an SB3 checkpoint `rl_model_N_steps.zip` its own `rl_model_vecnormalize_N_steps.pkl`
    (the final run's statistics would normalise the checkpoint's inputs wrongly)."""
    match = re.fullmatch(r"(.*)_(\d+)_steps\.zip", model_path.name)
    candidates = [model_path.parent / f"{match[1]}_vecnormalize_{match[2]}_steps.pkl"] if match else []
    candidates.append(model_path.parent / "vecnormalize.pkl")
    return next((c for c in candidates if c.is_file()), None)


def export_policy(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    vecnormalize_path: str | Path | None = None,
    obs_features: Sequence[str] | None = None,
    action_tables: Sequence[dict[str, Any]] | None = None,
    mask_rules: Any = None,
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
    seed: int | None = None,
    timesteps: int | None = None,
    evaluation: dict[str, Any] | None = None,
    verify: int = 2000,
) -> Path:
    """Write `out_dir/{manifest.json,weights.npz}` for a trained model and return `out_dir`.

    Without `vecnormalize_path`, the statistics saved with the model are used if there are
    any (`default_vecnormalize`; the path used is recorded in the manifest). Without
    `obs_features`/`action_tables`, generic names (`obs_0..`, `action_0..`) and index values
    are taken from the model's spaces; `seed` and `timesteps` default to the model's own. After
    writing, the policy is loaded back and its actions are compared with SB3's deterministic
    predict on `verify` random observations; any difference raises ExportError.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ExportError(f"{model_path}: model file not found")
    model, algo = load_model(model_path)
    obs_space = model.observation_space
    if obs_space.shape is None or len(obs_space.shape) != 1:
        raise ExportError(f"observation space {obs_space} is not a 1-D Box; the runtime takes flat observations")
    obs_dim = int(obs_space.shape[0])
    layers, head, activation = extract_actor(model.policy)
    heads = action_sizes(model.action_space)

    if obs_features is None:
        obs_features = [f"obs_{i}" for i in range(obs_dim)]
    obs_features = [str(f) for f in obs_features]
    if len(obs_features) != obs_dim:
        raise ExportError(f"obs_features has {len(obs_features)} names, the model observes {obs_dim} features")
    if action_tables is None:
        action_tables = [{"name": f"action_{i}", "values": list(range(s, s + n))} for i, (n, s) in enumerate(heads)]
    # "moves": [low, high] marks a head whose values scale the knob in force (the batch limits)
    action_tables = [
        {"name": str(t["name"]), "values": list(t["values"]), **({"moves": list(t["moves"])} if "moves" in t else {})}
        for t in action_tables
    ]
    sizes = [len(t["values"]) for t in action_tables]
    if sizes != [n for n, _ in heads]:
        raise ExportError(f"action tables have sizes {sizes}, the model's action heads {[n for n, _ in heads]}")

    if vecnormalize_path is None:
        vecnormalize_path = default_vecnormalize(model_path)
    obs_norm = read_vecnormalize(vecnormalize_path, obs_dim) if vecnormalize_path is not None else None

    arrays: dict[str, np.ndarray] = {}
    layer_refs = []
    for i, (w, b) in enumerate(layers):
        arrays[f"pi_{i}_w"], arrays[f"pi_{i}_b"] = w, b
        layer_refs.append({"w": f"pi_{i}_w", "b": f"pi_{i}_b"})
    arrays["action_w"], arrays["action_b"] = head

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = write_npz(out_dir / WEIGHTS_NAME, arrays)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "algo": algo,
        "activation": activation,
        "obs_features": obs_features,
        "obs_norm": obs_norm,
        "action_tables": action_tables,
        "mask_rules": mask_rules,
        "env_id": env_id,
        "env_kwargs": env_kwargs or {},
        "profile": profile,
        "seed": seed if seed is not None else model.seed,
        "timesteps": int(timesteps if timesteps is not None else model.num_timesteps),
        "evaluation": evaluation or {},
        "layers": layer_refs,
        "action_head": {"w": "action_w", "b": "action_b"},
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_bytes": len(data),
        "source": {
            "model": model_path.name,
            "vecnormalize": Path(vecnormalize_path).name if vecnormalize_path is not None else None,
            "versions": _versions(),
        },
    }
    manifest_path = out_dir / MANIFEST_NAME
    _write_manifest(manifest_path, manifest)
    if verify:
        try:
            manifest["verification"] = verify_against_sb3(RuntimePolicy.load(out_dir), model, verify)
        except Exception:
            manifest_path.unlink()  # a policy that failed its check must not be loadable
            raise
        _write_manifest(manifest_path, manifest)
    return out_dir


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    try:
        text = json.dumps(manifest, indent=1, allow_nan=False, default=_json_default)
    except ValueError as e:  # NaN or inf in caller-supplied metadata
        raise ExportError(f"{path}: manifest metadata is not valid JSON: {e}") from None
    path.write_text(text + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    """Paths and numpy scalars/arrays in caller metadata (env_kwargs, evaluation) become JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise ExportError(f"manifest metadata holds a {type(value).__name__} ({value!r}), which JSON cannot store")


def verify_against_sb3(policy: RuntimePolicy, model: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """Compare the runtime policy with SB3's deterministic predict on `n` random observations.

    A difference where the two chosen logits are within float32 noise of each other (a near tie
    that the two float32 computations may round either way) is counted; any other raises ExportError.
    """
    obs = sample_observations(policy, n, seed=seed)
    ours = policy.act_batch(obs)
    theirs = sb3_predict(model, obs, policy.manifest.get("obs_norm"))
    rows, heads = np.nonzero(ours != theirs)
    if rows.size:
        logits = policy.logits(obs[rows])
        offsets = np.concatenate([[0], np.cumsum(policy.action_dims)[:-1]])[heads]
        ours_l = logits[np.arange(rows.size), offsets + ours[rows, heads]]
        theirs_l = logits[np.arange(rows.size), offsets + theirs[rows, heads]]
        real = np.abs(ours_l - theirs_l) > 1e-5 * np.maximum(1.0, np.abs(ours_l))
        if real.any():
            i = int(np.flatnonzero(real)[0])
            raise ExportError(
                f"exported policy disagrees with SB3 on {int(real.sum())} of {n} observations beyond float32 noise "
                f"(first: observation {int(rows[i])}, head {policy.action_names[heads[i]]!r}: "
                f"runtime {int(ours[rows[i], heads[i]])}, SB3 {int(theirs[rows[i], heads[i]])})"
            )
    return {"observations": n, "seed": seed, "differing": int(np.unique(rows).size), "near_ties": int(rows.size)}


def sb3_predict(
    model: Any, obs: np.ndarray, obs_norm: dict[str, Any] | None, masks: np.ndarray | None = None
) -> np.ndarray:
    """SB3's deterministic actions `[N, heads]`, normalising exactly as VecNormalize.normalize_obs."""
    x = np.asarray(obs)
    if obs_norm is not None:
        mean = np.asarray(obs_norm["mean"], dtype=np.float64)
        var = np.asarray(obs_norm["var"], dtype=np.float64)
        clip = obs_norm["clip_obs"]
        x = np.clip((x - mean) / np.sqrt(var + obs_norm["epsilon"]), -clip, clip)
    kwargs = {"action_masks": masks} if masks is not None else {}
    actions, _ = model.predict(x, deterministic=True, **kwargs)
    return np.asarray(actions).reshape(len(x), -1).astype(np.int64)


def sample_observations(policy: RuntimePolicy, n: int, seed: int = 0) -> np.ndarray:
    """`n` random observations `[n, obs_dim]` that exercise the whole network.

    With normalisation stored, they are drawn around the training statistics (normalised values
    N(0, 2^2), so some reach the clip); without, N(0, 3^2) in raw units.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0 if policy.manifest.get("obs_norm") else 3.0, size=(n, policy.obs_dim))
    norm = policy.manifest.get("obs_norm")
    if norm is None:
        return z
    mean = np.asarray(norm["mean"], dtype=np.float64)
    std = np.sqrt(np.asarray(norm["var"], dtype=np.float64) + norm["epsilon"])
    return mean + z * std


def _versions() -> dict[str, str]:
    out = {}
    for name in ("autoopt", "stable_baselines3", "sb3_contrib", "torch", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = str(mod.__version__)
    return out


# -------------------------------------------------------------------- command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `autoopt export` (pass a subparser to mount it in the main CLI)."""
    p = parser or argparse.ArgumentParser(prog="autoopt export", description=__doc__.splitlines()[0])
    p.add_argument("model", help="SB3 model zip (PPO or MaskablePPO)")
    p.add_argument("--out", required=True, help="policy directory to write (manifest.json + weights.npz)")
    p.add_argument(
        "--vecnormalize",
        help="VecNormalize statistics (.pkl); default: vecnormalize.pkl next to the model, or a checkpoint's own",
    )
    p.add_argument(
        "--meta",
        help="JSON file with any of: " + ", ".join(_META_KEYS),
    )
    p.add_argument("--onnx", metavar="PATH", help="also write the actor as ONNX and check it with onnxruntime")
    p.add_argument("--verify", type=int, default=2000, help="observations to check against SB3 (0: skip)")
    return p


_META_KEYS = (
    "obs_features",
    "action_tables",
    "mask_rules",
    "env_id",
    "env_kwargs",
    "profile",
    "seed",
    "timesteps",
    "evaluation",
)


def run_cli(args: argparse.Namespace) -> int:
    meta: dict[str, Any] = {}
    if args.meta:
        meta = json.loads(Path(args.meta).read_text(encoding="utf-8"))
        if unknown := sorted(set(meta) - set(_META_KEYS)):
            raise ExportError(f"{args.meta}: unknown keys {unknown}; allowed: {list(_META_KEYS)}")
    else:
        # a model of an `autoopt train` run (or one of its checkpoints): the engine's layout,
        # env and profile from the run's config, or the engine would refuse the policy
        from ..training.train import run_metadata

        if (found := run_metadata(Path(args.model))) is not None:
            run_dir, meta = found
            print(f"layout, env and profile from {run_dir / 'config.yaml'}")
    out = export_policy(args.model, args.out, vecnormalize_path=args.vecnormalize, verify=args.verify, **meta)
    policy = RuntimePolicy.load(out)
    print(f"wrote {out}: {policy!r}")
    if args.onnx:
        from .onnx_export import check_onnx, export_onnx

        export_onnx(out, args.onnx)
        report = check_onnx(out, args.onnx)
        print(f"wrote {args.onnx}: {report['mismatches']} mismatches on {report['n']} observations")
        if report["mismatches"]:
            return 1
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """`autoopt export MODEL.zip --out POLICY [...]`: 0 on success, 1 if the ONNX check fails, 2 on an error."""
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ExportError, OSError) as e:
        print(f"autoopt export: error: {e}", file=sys.stderr)
        return 2


main = export_main

if __name__ == "__main__":
    sys.exit(export_main())
