"""The runtime policy: a trained actor evaluated with numpy alone.

The engine asks the policy for its knobs at every iteration, so this module must cost next to
nothing and must never be able to hurt the service: it imports only numpy and the standard
library (no torch, stable-baselines3 or gymnasium), it checks a policy file completely before
accepting it, and `act` runs on buffers allocated once at load time.

On disk a policy is a directory holding `manifest.json` and `weights.npz` (see `export.py`).
Weights are stored as torch stores them: a Linear layer's `w` is `[out, in]`, its `b` is `[out]`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _kernel

FORMAT_NAME = "autoopt-policy"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.npz"
ACTIVATIONS = ("tanh", "relu")
# A lower-index logit this close to a head's maximum is a near tie, decided as SB3 decides it (see
# `sb3_mode`). Far wider than float32 rounding at the logits' scale, far narrower than real preferences.
TIE_WINDOW = 2e-6
_MASK_CACHE_SIZE = 1024
# No policy of ours comes near this; a bigger member is a broken or hostile file.
_MAX_MEMBER_BYTES = 256 << 20

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the whole layer
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy < 2
    try:
        from numpy.core.umath import clip as _clip_ufunc
    except ImportError:
        _clip_ufunc = None


class PolicyFileError(ValueError):
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


class RuntimePolicy:
    """A validated actor: `act(obs)` returns the deterministic action, numpy only.

    `act` reuses buffers allocated at load time, so one instance serves one thread; it returns a
    fresh array each call. Its action equals SB3's `predict(obs, deterministic=True)` given the
    same VecNormalize statistics: the argmax of each head's logits, with near ties decided as
    SB3's float32 softmax decides them (`sb3_mode`).
    """

    def __init__(self, manifest: dict[str, Any], arrays: dict[str, np.ndarray], source: str = "<memory>") -> None:
        """Prefer `RuntimePolicy.load`; this checks `manifest` and `arrays` as load does (but no checksum)."""
        self._source = source
        _check_manifest(manifest, source)
        self._manifest = manifest
        layers, head = _check_arrays(manifest, arrays, source)
        self._layers = layers
        self._head = head
        self._features: tuple[str, ...] = tuple(manifest["obs_features"])
        self._tables: tuple[tuple[str, tuple[Any, ...]], ...] = tuple(
            (t["name"], tuple(t["values"])) for t in manifest["action_tables"]
        )
        self._action_dims = tuple(len(v) for _, v in self._tables)
        norm = manifest.get("obs_norm")
        if norm is None:
            self._mean = self._std = None
            self._clip = math.inf
        else:
            self._mean = np.asarray(norm["mean"], dtype=np.float64)
            # The very expression SB3's VecNormalize.normalize_obs divides by.
            self._std = np.sqrt(np.asarray(norm["var"], dtype=np.float64) + float(norm["epsilon"]))
            self._clip = float(norm["clip_obs"])
        self._build_kernel()

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path, expected_features: Sequence[str] | None = None) -> RuntimePolicy:
        """Read and check a policy; refuse anything wrong with a `PolicyFileError` that says what.

        `expected_features` is the observation layout the caller will feed (the engine's); a
        policy trained on another layout is refused with the differences listed.
        """
        manifest_path, weights_path = resolve_policy_paths(path)
        if not manifest_path.is_file():
            raise PolicyFileError(
                f"{manifest_path}: policy manifest not found (a policy is a directory holding "
                f"{MANIFEST_NAME} and {WEIGHTS_NAME})"
            )
        if not weights_path.is_file():
            raise PolicyFileError(f"{weights_path}: policy weights not found (next to {manifest_path.name})")
        manifest = _read_manifest(manifest_path)
        _check_manifest(manifest, str(manifest_path))
        data = weights_path.read_bytes()
        arrays = _read_npz(weights_path, data, manifest.get("weights_bytes"))
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest["weights_sha256"]:
            raise PolicyFileError(
                f"{weights_path}: checksum mismatch: sha256 is {digest}, the manifest says "
                f"{manifest['weights_sha256']}; the weights were changed or belong to another manifest"
            )
        policy = cls(manifest, arrays, source=str(weights_path))
        if expected_features is not None:
            policy.check_features(expected_features, where=str(manifest_path))
        return policy

    def check_features(self, expected: Sequence[str], where: str | None = None) -> None:
        """Refuse unless the policy's observation layout is exactly `expected` (names and order)."""
        expected = tuple(expected)
        if expected == self._features:
            return
        where = where or self._source
        have, want = set(self._features), set(expected)
        parts = []
        if missing := [f for f in expected if f not in have]:
            parts.append(f"missing from the policy: {missing}")
        if extra := [f for f in self._features if f not in want]:
            parts.append(f"not in the engine's layout: {extra}")
        if not parts:
            i = next(i for i, (a, b) in enumerate(zip(self._features, expected, strict=True)) if a != b)
            parts.append(
                f"same features in another order: first difference at index {i}: "
                f"policy has {self._features[i]!r}, engine has {expected[i]!r}"
            )
        elif len(expected) != len(self._features):
            parts.append(f"policy has {len(self._features)} features, engine has {len(expected)}")
        raise PolicyFileError(f"{where}: observation layout differs from the engine's: " + "; ".join(parts))

    def check_actions(self, expected: Sequence[dict[str, Any]], where: str | None = None) -> None:
        """Refuse unless the policy's action heads mean what the engine's do (names, values,
        and which heads are moves): a policy from another action layout would pick valid
        indices that mean something else."""
        have = [dict(t) for t in self._manifest["action_tables"]]
        want = [dict(t) for t in expected]
        if have == want:
            return
        where = where or self._source
        if len(have) != len(want):
            raise PolicyFileError(
                f"{where}: action layout differs from the engine's: policy has {len(have)} heads, engine has {len(want)}"
            )
        diffs = [f"head {i} ({w['name']!r}): policy {h}, engine {w}" for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w]
        raise PolicyFileError(f"{where}: action layout differs from the engine's: " + "; ".join(diffs))

    # ---------------------------------------------------------------- properties

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def decide_every(self) -> int:
        """Engine iterations per decision the policy was trained at (its env's
        `iterations_per_step`; 1 when the manifest does not say)."""
        n = self._manifest.get("env_kwargs", {}).get("iterations_per_step", 1)
        return n if isinstance(n, int) and n >= 1 else 1

    @property
    def decide_every_s(self) -> float | None:
        """Engine-clock seconds per decision the policy was trained at (its env's `step_s`;
        None when it was trained on a count of iterations)."""
        t = self._manifest.get("env_kwargs", {}).get("step_s")
        return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t > 0 else None

    @property
    def obs_dim(self) -> int:
        return len(self._features)

    @property
    def obs_features(self) -> tuple[str, ...]:
        return self._features

    @property
    def action_dims(self) -> tuple[int, ...]:
        return self._action_dims

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._tables)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle and copy by rebuilding from the manifest and weights: each copy gets its own buffers
        (so `copy.copy(policy)` is how to give another thread its own policy)."""
        refs = [*self._manifest["layers"], self._manifest["action_head"]]
        arrays = {}
        for ref, (w, b) in zip(refs, [*self._layers, self._head], strict=True):
            arrays[ref["w"]], arrays[ref["b"]] = w, b
        return (type(self), (self._manifest, arrays, self._source))

    def __repr__(self) -> str:
        return (
            f"RuntimePolicy({self._source!r}, obs_dim={self.obs_dim}, action_dims={self._action_dims}, "
            f"hidden={[w.shape[0] for w, _ in self._layers]}, activation={self._manifest['activation']!r})"
        )

    # ---------------------------------------------------------------- acting

    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The deterministic action (int64, one index per head) for one 1-D observation.

        `mask` is the flat concatenation of per-head boolean masks (True = allowed), as
        sb3-contrib's MaskablePPO takes it; a mask seen before costs ~0.5 us. Raises ValueError for
        a wrong shape, a NaN in the observation, or a mask with a head that allows nothing. Pass
        float64 observations for the fastest path (float32 works, ~0.3 us slower).
        """
        raise NotImplementedError  # replaced per instance by the kernel built in _build_kernel

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """The action head's float32 logits `[N, sum(action_dims)]` for observations `[N, obs_dim]`."""
        n_heads, widest = len(self._action_dims), max(self._action_dims)
        padded = self._forward_batch(obs).reshape(-1, 2 * n_heads * widest)
        return padded[:, self._pad_idx]

    def _forward_batch(self, obs: np.ndarray) -> np.ndarray:
        """Padded logits `[N, 2 * heads, widest]`, computed with the matrices `act` uses."""
        x = np.asarray(obs)
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise ValueError(f"observations must have shape [N, {self.obs_dim}], got {list(x.shape)}")
        x = self._normalize(x)
        for m in [*self._hidden_m, self._head_m]:
            aug = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
            aug[:, :-1] = x
            aug[:, -1] = 1.0
            x = aug @ m
            if m is not self._head_m:
                self._activation(x, out=x)
        return x.reshape(x.shape[0], 2 * len(self._action_dims), max(self._action_dims))

    def act_batch(self, obs: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Actions `[N, heads]` for observations `[N, obs_dim]`: `act` vectorised, the same matrices and rules."""
        logits = self._forward_batch(obs)
        n, n_flat = logits.shape[0], self._pad_idx.shape[0]
        n_heads, widest = len(self._action_dims), max(self._action_dims)
        if (bad := np.isnan(logits[:, 0, 0])).any():
            raise ValueError(f"observations contain NaN (rows {np.flatnonzero(bad)[:10].tolist()})")
        if masks is not None:
            m = np.asarray(masks, dtype=bool)
            if m.shape != (n, n_flat):
                raise ValueError(f"masks must have shape [{n}, {n_flat}], got {list(m.shape)}")
            masked = np.ones((n, 2, n_heads * widest), dtype=bool)
            masked[:, :, self._pad_idx] = ~m[:, None, :]
            logits[masked.reshape(logits.shape)] = -np.inf
            if (empty := np.isneginf(logits[:, :n_heads].max(axis=2))).any():
                row, head = np.argwhere(empty)[0]
                raise ValueError(
                    f"mask allows no entry of head {self.action_names[head]!r} (row {row}; {int(empty.sum())} such)"
                )
        picks = logits.argmax(axis=2)
        out = picks[:, :n_heads].copy()
        for h, n in enumerate(self._action_dims):
            rows = np.flatnonzero(picks[:, h] != picks[:, n_heads + h])
            if rows.size:
                out[rows, h] = sb3_mode(logits[rows, h, :n])
        return out

    def decode(self, action: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """{knob name: value} for an action, through the manifest's action tables (for a head
        marked "moves", the value is the factor applied to the knob in force)."""
        a = np.asarray(action).reshape(-1)
        if a.shape[0] != len(self._tables):
            raise ValueError(f"action must have {len(self._tables)} entries, got {a.shape[0]}")
        out = {}
        for (name, values), idx in zip(self._tables, a.tolist(), strict=True):
            if not 0 <= idx < len(values):
                raise ValueError(f"action index {idx} out of range for {name!r} ({len(values)} values)")
            out[name] = values[idx]
        return out

    # ---------------------------------------------------------------- internals

    def _activation(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self._manifest["activation"] == "tanh":
            return np.tanh(x, out=out)
        return np.maximum(x, 0.0, out=out)

    def _normalize(self, obs: np.ndarray) -> np.ndarray:
        """float32 input of the first layer: VecNormalize's float64 arithmetic, then the cast SB3 applies."""
        x = obs.astype(np.float64)
        if self._mean is not None:
            x = np.clip((x - self._mean) / self._std, -self._clip, self._clip)
        return x.astype(np.float32)

    def _build_matrices(self) -> None:
        """The network as act runs it: biases folded in, the action head padded and doubled.

        Each layer's matrix is `[in + 1, out]` with the bias as its last row, so with an input
        buffer ending in a constant 1 a layer is one `np.dot`. The head writes `[2 * heads, widest]`
        logits: rows `0..heads-1` are the plain logits (padding columns -inf, so one argmax serves all
        heads), rows `heads..` the same plus a small bonus that falls with the index. Where the two
        argmaxes differ, a lower-index logit lies within `TIE_WINDOW` of the head's maximum: a near
        tie that SB3 decides by rounding its probabilities, so `sb3_mode` decides it as SB3 does.
        """
        self._hidden_m = [np.ascontiguousarray(np.vstack([w.T, b[None, :]]), dtype=np.float32) for w, b in self._layers]
        w, b = self._head
        dims = self._action_dims
        widest, n_heads = max(dims), len(dims)
        head_m = np.zeros((w.shape[1] + 1, 2 * n_heads * widest), dtype=np.float32)
        pad_idx = np.empty(w.shape[0], dtype=np.intp)  # flat logit j -> its column in the padded layout
        start = 0
        for i, n in enumerate(dims):
            cols = i * widest + np.arange(n)
            pad_idx[start : start + n] = cols
            bonus = (TIE_WINDOW * np.arange(n - 1, -1, -1)).astype(np.float32)
            for offset, extra in ((0, 0.0), (n_heads * widest, bonus)):
                head_m[:-1, offset + cols] = w[start : start + n].T
                head_m[-1, offset + cols] = b[start : start + n] + extra
                head_m[-1, offset + i * widest + n : offset + (i + 1) * widest] = -np.inf
            start += n
        self._head_m = head_m
        self._pad_idx = pad_idx

    def _build_kernel(self) -> None:
        """Allocate every buffer once and bind `act` to them (see `_build_matrices` and `_kernel`).

        Normalisation runs in float64 then rounds to float32, exactly as SB3 feeds its policy.
        """
        self._build_matrices()
        d = self.obs_dim
        dims = self._action_dims
        widest = max(dims)
        n_heads = len(dims)
        x_aug = np.ones(d + 1, dtype=np.float32)
        x_view = x_aug[:d]
        steps = []  # (matrix, out view, augmented buffer) per hidden layer
        for m in self._hidden_m:
            buf = np.ones(m.shape[1] + 1, dtype=np.float32)
            steps.append((m, buf[:-1], buf))
        head_m = self._head_m
        pad_idx = self._pad_idx
        logits = np.empty(2 * n_heads * widest, dtype=np.float32)
        logits2 = logits.reshape(2 * n_heads, widest)
        picks = np.empty(2 * n_heads, dtype=np.int64)  # argmax of the plain rows, then of the bonus rows
        picks_plain = picks[:n_heads]
        # The two halves as two byte strings: one comparison tells whether the argmaxes agree.
        halves = picks.view(f"S{8 * n_heads}")
        argmax_into = logits2.argmax  # bound once: the attribute lookup costs ~0.1 us a call
        starts = np.cumsum([0, *dims[:-1]])
        mask_cache: dict[bytes, np.ndarray] = {}  # mask bytes -> its bias: the engine's masks repeat
        n_flat = pad_idx.shape[0]
        x64 = np.empty(d, dtype=np.float64)
        shape = (d,)
        ndarray = np.ndarray
        dot, sub, div = np.dot, np.subtract, np.divide
        act_fn = np.tanh if self._manifest["activation"] == "tanh" else _relu
        hidden = tuple(steps)
        mean, std = self._mean, self._std
        lo = hi = None
        if mean is not None:
            lo = np.full(d, -self._clip)
            hi = np.full(d, self._clip)
        clip = _clip_ufunc or _clip_fallback
        names = self.action_names

        def bad_obs(obs: Any) -> np.ndarray:
            arr = np.asarray(obs, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"observation must have shape {list(shape)}, got {list(arr.shape)}")
            return arr

        def mask_bias(mask: Any) -> np.ndarray:
            """0 / -inf to add to the padded logits (both halves) for `mask`; checked, then cached by its bytes."""
            m = np.ascontiguousarray(mask, dtype=bool)
            if m.shape != (n_flat,):
                raise ValueError(
                    f"mask must have shape [{n_flat}] (the heads' masks concatenated), got {list(m.shape)}"
                )
            allowed = np.logical_or.reduceat(m, starts)
            if not allowed.all():
                bad = [names[i] for i in np.flatnonzero(~allowed)]
                raise ValueError(f"mask allows no entry of head(s) {bad}")
            bias = np.zeros((2, n_heads * widest), dtype=np.float32)
            bias[:, pad_idx] = np.where(m, np.float32(0.0), np.float32(-np.inf))
            bias = bias.reshape(-1)
            bias.flags.writeable = False
            if len(mask_cache) >= _MASK_CACHE_SIZE:  # masks come from a few rules: a full cache is unusual
                mask_cache.clear()
            mask_cache[m.tobytes()] = bias
            return bias

        def near_tie() -> np.ndarray:
            out = picks_plain.copy()
            for h in np.flatnonzero(picks_plain != picks[n_heads:]):
                out[h] = sb3_mode(logits2[h : h + 1, : dims[h]])[0]
            return out

        bound = dict(
            ndarray=ndarray,
            shape=shape,
            bad_obs=bad_obs,
            mean=mean,
            std=std,
            lo=lo,
            hi=hi,
            sub=sub,
            div=div,
            clip=clip,
            x64=x64,
            x_view=x_view,
            x_aug=x_aug,
            dot=dot,
            act_fn=act_fn,
            hidden=hidden,
            head_m=head_m,
            logits=logits,
            logits2=logits2,
            mask_bias=mask_bias,
            mask_cache=mask_cache,
            bool_dtype=np.dtype(bool),
            add=np.add,
            argmax_into=argmax_into,
            picks=picks,
            picks_plain=picks_plain,
            halves=halves,
            near_tie=near_tie,
        )
        if len(hidden) == 2:  # the usual [64, 64] actor, unrolled: the loop costs ~7% of a call
            (bound["m0"], bound["v0"], bound["b0"]), (bound["m1"], bound["v1"], bound["b1"]) = hidden
            template = _kernel.act_two_hidden
        else:
            template = _kernel.act_any_depth
        # An instance attribute shadows the method: callers reach the kernel without a second call.
        self.act = _kernel.bind(template, bound, RuntimePolicy.act.__doc__)  # type: ignore[method-assign]


def sb3_mode(logits: np.ndarray) -> np.ndarray:
    """SB3's deterministic choice for rows of one head's float32 logits (-inf = masked out).

    SB3 takes `argmax(Categorical(logits).probs)`: it normalises the logits by their logsumexp and
    takes a softmax, all in float32, so two logits a rounding apart can get the same probability and
    the lower index wins. This redoes that arithmetic in the same order (exp and log rounded from
    float64, as close as numpy gets to torch's). It is used only for near ties; elsewhere the
    argmax of the logits is the same answer.
    """
    f32 = np.float32
    m = logits.max(axis=1, keepdims=True)
    e = np.exp((logits - m).astype(np.float64)).astype(f32)
    lse = np.log(e.sum(axis=1, keepdims=True, dtype=f32).astype(np.float64)).astype(f32) + m
    n = logits - lse
    e = np.exp((n - n.max(axis=1, keepdims=True)).astype(np.float64)).astype(f32)
    probs = e * (f32(1.0) / e.sum(axis=1, keepdims=True, dtype=f32))
    return probs.argmax(axis=1)


def _relu(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=out)


def _clip_fallback(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.clip's result bit for bit (NaN included) without its wrapper's overhead."""
    np.maximum(x, lo, out=out)
    return np.minimum(out, hi, out=out)


# -------------------------------------------------------------------- checks


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
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


def _check_manifest(m: dict[str, Any], where: str) -> None:
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


def _read_npz(path: Path, data: bytes, expected_size: Any) -> dict[str, np.ndarray]:
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


def _check_arrays(
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
