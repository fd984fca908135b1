"""The runtime policy: a trained actor evaluated with numpy alone.

The engine asks the policy for its knobs at every iteration, so this module must cost next to
nothing and must never be able to hurt the service: it imports only numpy and the standard
library (no torch, stable-baselines3 or gymnasium), it checks a policy file completely before
accepting it (`policy_file.py`), and `act` runs on buffers allocated once at load time.

On disk a policy is a directory holding `manifest.json` and `weights.npz` (see `export.py`).
Weights are stored as torch stores them: a Linear layer's `w` is `[out, in]`, its `b` is `[out]`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _kernel
from .policy_file import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    PolicyFileError,
    check_arrays,
    check_manifest,
    read_manifest,
    read_npz,
    resolve_policy_paths,
)

# A lower-index logit this close to a head's maximum is a near tie, decided as SB3 decides it (see
# `sb3_mode`). Far wider than float32 rounding at the logits' scale, far narrower than real preferences.
TIE_WINDOW = 2e-6
_MASK_CACHE_SIZE = 1024

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the whole layer
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy < 2
    try:
        from numpy.core.umath import clip as _clip_ufunc
    except ImportError:
        _clip_ufunc = None


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
        check_manifest(manifest, source)
        self._manifest = manifest
        layers, head = check_arrays(manifest, arrays, source)
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
        manifest = read_manifest(manifest_path)
        check_manifest(manifest, str(manifest_path))
        data = weights_path.read_bytes()
        arrays = read_npz(weights_path, data, manifest.get("weights_bytes"))
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
        diffs = [
            f"head {i} ({w['name']!r}): policy {h}, engine {w}"
            for i, (h, w) in enumerate(zip(have, want, strict=True))
            if h != w
        ]
        raise PolicyFileError(f"{where}: action layout differs from the engine's: " + "; ".join(diffs))

    # ---------------------------------------------------------------- properties

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def decide_every(self) -> int:
        """Engine iterations per decision the policy was trained at (its env's
        `iterations_per_step`; 1 when the manifest does not say)."""
        return int(self._manifest.get("env_kwargs", {}).get("iterations_per_step", 1))  # checked at load

    @property
    def decide_every_s(self) -> float | None:
        """Engine-clock seconds per decision the policy was trained at (its env's `step_s`;
        None when it was trained on a count of iterations)."""
        t = self._manifest.get("env_kwargs", {}).get("step_s")  # checked at load
        return None if t is None else float(t)

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
