"""The policy file: a directory of `manifest.json` and `weights.npz`, read without pickle
and checked completely before the runtime accepts it.

Every fault (another format or version, a missing or malformed field, a truncated or corrupt
archive, a pickled array, mismatched shapes, non-finite weights) is a `PolicyFileError` that
says what is wrong and where: the engine must never run a policy it only half understood.
Imports numpy and the standard library only, as the runtime does.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InputError

FORMAT_NAME = "autoopt-policy"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.npz"
ACTIVATIONS = ("tanh", "relu")
# No policy of ours comes near this; a bigger member is a broken or hostile file.
_MAX_MEMBER_BYTES = 256 << 20


class PolicyFileError(InputError):
    """A policy file that the runtime refuses, with what is wrong and where."""


def resolve_policy_paths(path: str | Path) -> tuple[Path, Path]:
    """(manifest, weights) for a policy directory, a path stem, or either file itself."""
    p = Path(path)
    if p.is_dir():
        return p / MANIFEST_NAME, p / WEIGHTS_NAME
    if p.name == MANIFEST_NAME or p.name == WEIGHTS_NAME:
        return p.parent / MANIFEST_NAME, p.parent / WEIGHTS_NAME
    if p.suffix in (".json", ".npz"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".npz")


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark, as Windows editors write
    except UnicodeDecodeError as e:
        raise PolicyFileError(f"{path}: manifest is not UTF-8 text (byte {e.start})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyFileError(
            f"{path}: manifest is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(manifest, dict):
        raise PolicyFileError(f"{path}: manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "obs_features": list,
    "action_tables": list,
    "activation": str,
    "layers": list,
    "action_head": dict,
    "weights_sha256": str,
}


def _check_cadence(env_kwargs: Any, where: str) -> None:
    """The guard asks the policy at the cadence it was trained at (env_kwargs'
    iterations_per_step or step_s): a malformed one must not quietly become every iteration."""
    if not isinstance(env_kwargs, dict):
        raise PolicyFileError(f"{where}: env_kwargs must be an object, got {type(env_kwargs).__name__}")
    n = env_kwargs.get("iterations_per_step", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PolicyFileError(f"{where}: env_kwargs.iterations_per_step must be an integer >= 1, got {n!r}")
    t = env_kwargs.get("step_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0)):
        raise PolicyFileError(f"{where}: env_kwargs.step_s must be a positive number of seconds or null, got {t!r}")


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Refuse a manifest of another format or version, or with missing or malformed fields."""
    if m.get("format") != FORMAT_NAME:
        raise PolicyFileError(
            f"{where}: not an autoopt policy manifest (format is {m.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = m.get("version")
    if version != FORMAT_VERSION:
        raise PolicyFileError(
            f"{where}: manifest format version {version!r} is not supported: this runtime reads version "
            f"{FORMAT_VERSION}; re-export the policy with this autoopt"
        )
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise PolicyFileError(f"{where}: manifest lacks {key!r}")
        if not isinstance(m[key], typ):
            raise PolicyFileError(f"{where}: manifest {key!r} must be a {typ.__name__}, got {type(m[key]).__name__}")
    if m["activation"] not in ACTIVATIONS:
        raise PolicyFileError(f"{where}: activation {m['activation']!r} is not one of {list(ACTIVATIONS)}")
    feats = m["obs_features"]
    if not feats or not all(isinstance(f, str) for f in feats):
        raise PolicyFileError(f"{where}: obs_features must be a non-empty list of names")
    if len(set(feats)) != len(feats):
        dup = sorted({f for f in feats if feats.count(f) > 1})
        raise PolicyFileError(f"{where}: obs_features has duplicate names {dup}")
    tables = m["action_tables"]
    if not tables:
        raise PolicyFileError(f"{where}: action_tables is empty")
    for i, t in enumerate(tables):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("values"), list):
            raise PolicyFileError(f"{where}: action_tables[{i}] must be {{'name': str, 'values': [...]}}")
        if not t["values"]:
            raise PolicyFileError(f"{where}: action_tables[{i}] ({t['name']!r}) has no values")
    for i, layer in enumerate([*m["layers"], m["action_head"]]):
        if not isinstance(layer, dict) or not isinstance(layer.get("w"), str) or not isinstance(layer.get("b"), str):
            what = f"layers[{i}]" if i < len(m["layers"]) else "action_head"
            raise PolicyFileError(f"{where}: manifest {what} must be {{'w': name, 'b': name}} of arrays in the npz")
    if len(m["weights_sha256"]) != 64:
        raise PolicyFileError(f"{where}: weights_sha256 must be a 64-digit hex sha256")
    _check_cadence(m.get("env_kwargs", {}), where)
    norm = m.get("obs_norm")
    if norm is not None:
        if not isinstance(norm, dict) or not {"mean", "var", "clip_obs", "epsilon"} <= norm.keys():
            raise PolicyFileError(f"{where}: obs_norm must be null or {{'mean', 'var', 'clip_obs', 'epsilon'}}")
        for key in ("mean", "var"):
            v = norm[key]
            if not isinstance(v, list) or len(v) != len(feats):
                n = len(v) if isinstance(v, list) else type(v).__name__
                raise PolicyFileError(
                    f"{where}: obs_norm.{key} has {n} entries, the observation has {len(feats)} features"
                )
            try:
                arr = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise PolicyFileError(f"{where}: obs_norm.{key} must be numbers") from None
            if not np.isfinite(arr).all():
                raise PolicyFileError(
                    f"{where}: obs_norm.{key} has non-finite values at {np.flatnonzero(~np.isfinite(arr)).tolist()}"
                )
            if key == "var" and (arr < 0).any():
                raise PolicyFileError(
                    f"{where}: obs_norm.var has negative values at {np.flatnonzero(arr < 0).tolist()}"
                )
        for key in ("clip_obs", "epsilon"):
            v = norm[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise PolicyFileError(f"{where}: obs_norm.{key} must be a positive finite number, got {v!r}")


def read_npz(path: Path, data: bytes, expected_size: Any) -> dict[str, np.ndarray]:
    """Every array of the npz, or a PolicyFileError naming the fault (truncated, corrupt, pickled)."""
    if not data:
        raise PolicyFileError(f"{path}: truncated: the file is empty (0 bytes)")
    if not data.startswith(b"PK"):
        raise PolicyFileError(f"{path}: corrupt: not an npz (zip) archive (starts with {data[:8]!r})")
    if isinstance(expected_size, int) and len(data) < expected_size:
        raise PolicyFileError(
            f"{path}: truncated: {len(data)} bytes, the manifest says {expected_size}; the file was cut short"
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        if b"PK\x05\x06" not in data[-(65536 + 22) :]:
            raise PolicyFileError(
                f"{path}: truncated: the zip's end-of-archive record is missing ({len(data)} bytes); the file was cut short"
            ) from None
        raise PolicyFileError(f"{path}: corrupt npz archive: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    with zf:
        for info in zf.infolist():
            if info.file_size > _MAX_MEMBER_BYTES:
                raise PolicyFileError(f"{path}: member {info.filename!r} claims {info.file_size} bytes; refused")
            if not info.filename.endswith(".npy"):
                raise PolicyFileError(f"{path}: member {info.filename!r} is not a .npy array")
            try:
                raw = zf.read(info)
                arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            except ValueError as e:
                if "allow_pickle" in str(e) or "Object arrays" in str(e):
                    raise PolicyFileError(
                        f"{path}: array {info.filename[:-4]!r} contains a pickled object array; refused "
                        "(a policy holds numeric arrays only)"
                    ) from None
                raise PolicyFileError(f"{path}: corrupt array {info.filename[:-4]!r}: {e}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise PolicyFileError(f"{path}: corrupt npz archive: member {info.filename!r}: {e}") from None
            arrays[info.filename[:-4]] = arr
    return arrays


def check_arrays(
    m: dict[str, Any], arrays: dict[str, np.ndarray], where: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The layers and the head as float32 arrays, once shapes chain and every value is finite."""
    refs = [*m["layers"], m["action_head"]]
    wanted = [r[k] for r in refs for k in ("w", "b")]
    if missing := [k for k in wanted if k not in arrays]:
        raise PolicyFileError(f"{where}: weights lack arrays {missing} named in the manifest (have {sorted(arrays)})")
    if extra := sorted(set(arrays) - set(wanted)):
        raise PolicyFileError(f"{where}: weights hold arrays the manifest does not name: {extra}")
    for k in wanted:
        if arrays[k].dtype != np.float32:
            raise PolicyFileError(f"{where}: array {k!r} has dtype {arrays[k].dtype}, expected float32")
    n_in = len(m["obs_features"])
    pairs = []
    for i, r in enumerate(refs):
        w, b = arrays[r["w"]], arrays[r["b"]]
        what = f"layer {i}" if i < len(m["layers"]) else "action head"
        if w.ndim != 2 or b.ndim != 1 or w.shape[0] != b.shape[0]:
            raise PolicyFileError(
                f"{where}: shape mismatch: {what} weight {r['w']!r} is {list(w.shape)} and bias {r['b']!r} is "
                f"{list(b.shape)}; expected [out, in] and [out]"
            )
        if w.shape[1] != n_in:
            src = "the observation's feature count" if i == 0 else f"layer {i - 1}'s output"
            raise PolicyFileError(
                f"{where}: shape mismatch: {what} weight {r['w']!r} is {list(w.shape)}, its input is {w.shape[1]} "
                f"but {src} is {n_in}"
            )
        n_in = w.shape[0]
        pairs.append((w, b))
    n_actions = sum(len(t["values"]) for t in m["action_tables"])
    if n_in != n_actions:
        sizes = [len(t["values"]) for t in m["action_tables"]]
        raise PolicyFileError(
            f"{where}: shape mismatch: the action head has {n_in} outputs but the action tables {sizes} "
            f"have {n_actions} entries"
        )
    for k in wanted:
        a = arrays[k]
        if not np.isfinite(a).all():
            idx = np.argwhere(~np.isfinite(a))
            raise PolicyFileError(
                f"{where}: array {k!r} has {len(idx)} non-finite weights (NaN or inf), first at {idx[0].tolist()}"
            )
    return pairs[:-1], pairs[-1]
