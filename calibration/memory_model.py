"""Device memory of the served model: weights, KV cache and the transient peak of a step.

The simulator computes used bytes = weights + KV of the running sequences + the transient
activation of the iteration. Weights and activations are fitted from the profile's
``peak_alloc`` (which includes the weights); the KV cache per token follows from the model
shape (2 tensors x layers x d_model x bytes per element), which is also how the measured
``kv_bytes`` of decode rows come out.

Fits are non-negative least squares in relative error over the features that allocate:
prefill ``[1, B, B*L, B*L^2]`` (workspace, logits, per-token activations, materialised
attention scores). A decode step is answered as a one-token prefill against its context.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .latency_model import PRECISION_BYTES

if TYPE_CHECKING:
    from .profile import Profile

# When the caller does not say which attention kernel runs: the cheapest that exists for it.
_BACKEND_PREFERENCE = ("flash", "cudnn", "efficient", "math")


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set); small problems only."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iters):
        w = a.T @ (b - a @ x)
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= 1e-12 * (1 + np.abs(w).max()):
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def _bytes(precision: str) -> int:
    return PRECISION_BYTES.get(precision, 2)


@dataclass
class MemoryModel:
    """Bytes the served model needs; every method answers for any precision/backend (fallbacks)."""

    layers: int
    d_model: int
    weights: dict[str, float] = field(default_factory=dict)  # precision -> bytes
    prefill_coef: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (backend, precision)
    decode_coef: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile: Profile) -> MemoryModel:
        return cls.fit(profile.model, profile.prefill, profile.decode)

    @classmethod
    def fit(
        cls,
        model: Mapping[str, Any],
        prefill_rows: Iterable[Mapping[str, Any]],
        decode_rows: Iterable[Mapping[str, Any]],
    ) -> MemoryModel:
        out = cls(int(model["layers"]), int(model["d_model"]))
        pre = [r for r in prefill_rows if r.get("peak_alloc")]
        dec = [r for r in decode_rows if r.get("peak_alloc")]
        out._fit_weights(pre, dec)
        out._fit_prefill(pre)
        out._fit_decode(dec)
        return out

    # -- fitting ------------------------------------------------------------------------------
    def _fit_weights(self, pre: list[Mapping[str, Any]], dec: list[Mapping[str, Any]]) -> None:
        """Weights = the intercept of peak_alloc against tokens over a precision's smallest prefills
        (never above the smallest peak); a precision seen only in decode: its smallest peak less KV."""
        by_prec: dict[str, list[tuple[float, float]]] = {}
        for r in pre:
            by_prec.setdefault(r["precision"], []).append((float(r["B"] * r["L"]), float(r["peak_alloc"])))
        for prec, pts in by_prec.items():
            pts.sort()
            small = pts[: max(3, len(pts) // 4)]
            t = np.array([p[0] for p in small])
            y = np.array([p[1] for p in small])
            if len(set(t.tolist())) >= 2:
                coef = nnls(np.column_stack([np.ones_like(t), t]) / y[:, None], np.ones_like(y))
                w = float(coef[0])
            else:
                w = float(y.min())
            self.weights[prec] = min(w, float(y.min()))
        from_decode: dict[str, float] = {}
        for r in dec:
            prec = r["precision"]
            if prec not in self.weights:
                bound = float(r["peak_alloc"]) - self.kv_bytes_per_token(prec) * r["B"] * r["C"]
                from_decode[prec] = max(0.0, min(from_decode.get(prec, bound), bound))
        self.weights.update(from_decode)

    def _fit_prefill(self, rows: list[Mapping[str, Any]]) -> None:
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["backend"], r["precision"]), []).append(r)
        for key, rs in groups.items():
            w = self.weight_bytes(key[1])
            x = np.array([[1.0, r["B"], r["B"] * r["L"], r["B"] * r["L"] ** 2] for r in rs], dtype=float)
            y = np.array([max(float(r["peak_alloc"]) - w, 0.0) for r in rs])
            self.prefill_coef[key] = _relative_nnls(x, y, np.array([float(r["peak_alloc"]) for r in rs]))

    def _fit_decode(self, rows: list[Mapping[str, Any]]) -> None:
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["backend"], r["precision"]), []).append(r)
        for key, rs in groups.items():
            w = self.weight_bytes(key[1])
            kv = self.kv_bytes_per_token(key[1])
            x = np.array([[1.0, r["B"], r["B"] * r["C"]] for r in rs], dtype=float)
            y = np.array([max(float(r["peak_alloc"]) - w - kv * r["B"] * r["C"], 0.0) for r in rs])
            self.decode_coef[key] = _relative_nnls(x, y, np.array([float(r["peak_alloc"]) for r in rs]))

    # -- queries ------------------------------------------------------------------------------
    def weight_bytes(self, precision: str = "bf16") -> int:
        """Model weights resident in `precision` (fp32_tf32 keeps fp32 weights)."""
        w = self.weights.get(precision)
        if w is None:
            if not self.weights:
                return 0
            ref = "bf16" if "bf16" in self.weights else sorted(self.weights)[0]
            w = self.weights[ref] * _bytes(precision) / _bytes(ref)
        return int(w)

    def kv_bytes_per_token(self, precision: str = "bf16") -> int:
        """K and V of every layer for one cached position."""
        return 2 * self.layers * self.d_model * _bytes(precision)

    def prefill_activation_bytes(self, B: int, L: int, precision: str = "bf16", backend: str | None = None) -> int:
        """Transient peak of one prefill of B x L tokens, beyond weights (and any KV already held)."""
        coef = self._coef(self.prefill_coef, backend, precision)
        if coef is None:
            return 0
        return int(coef[0] + coef[1] * B + coef[2] * B * L + coef[3] * B * L * L)

    def decode_activation_bytes(
        self, B: int, precision: str = "bf16", context: int = 0, backend: str | None = None
    ) -> int:
        """Transient peak of one decode step of B sequences, beyond weights and KV.

        A decode step is a prefill of one token per sequence attending to `context` cached
        positions, so the prefill fit answers it (the B*L^2 scores become B*context). The
        decode rows' own peaks are a fallback only: measured one configuration after another
        in one process, they carry graph pools and caches left by earlier configurations.
        """
        coef = self._coef(self.prefill_coef, backend, precision)
        if coef is not None:
            return int(coef[0] + (coef[1] + coef[2]) * B + coef[3] * B * context)
        coef = self._coef(self.decode_coef, backend, precision)
        if coef is None:
            return 0
        return int(coef[0] + coef[1] * B + coef[2] * B * context)

    def used_bytes(self, precision: str, kv_tokens: int, transient_bytes: int = 0) -> int:
        """Weights + KV of `kv_tokens` cached positions + a step's transient."""
        return self.weight_bytes(precision) + kv_tokens * self.kv_bytes_per_token(precision) + int(transient_bytes)

    def _coef(
        self, table: dict[tuple[str, str], list[float]], backend: str | None, precision: str
    ) -> list[float] | None:
        """Exact group; else same backend in another precision (bytes-scaled); else any backend."""
        if not table:
            return None
        backends = [backend] if backend else [b for b in _BACKEND_PREFERENCE if (b, precision) in table]
        for b in backends or list(_BACKEND_PREFERENCE):
            if (b, precision) in table:
                return table[(b, precision)]
        for b in [backend] if backend else list(_BACKEND_PREFERENCE):
            for (tb, tp), coef in table.items():
                if tb == b:
                    return [c * _bytes(precision) / _bytes(tp) for c in coef]
        (tb, tp), coef = next(iter(sorted(table.items())))
        return [c * _bytes(precision) / _bytes(tp) for c in coef]


def _relative_nnls(x: np.ndarray, y: np.ndarray, total: np.ndarray) -> list[float]:
    """Non-negative fit of y = x @ c, each row weighted by 1/total (relative error of the whole peak)."""
    scale = np.maximum(x.max(axis=0), 1e-12)
    c = nnls((x / scale) / total[:, None], y / total)
    return (c / scale).tolist()
