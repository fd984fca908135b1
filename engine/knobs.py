"""The engine's run-time knobs: one typed, validated config.

Every consumer (the torch executor, the simulator, the environment's action tables,
the runtime policy's guard) reads the same `Knobs`, so a value that is valid in one
place is valid everywhere. Validation happens at construction: a bad value never
reaches a running engine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

ATTENTION_KERNELS: tuple[str, ...] = ("flash", "efficient", "math", "cudnn")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32_tf32", "fp32")
# Named allocator configurations: the ones measured under memory pressure on the H100
# (shared/data/h100/alloc.jsonl), each a set of PyTorch allocator settings.
ALLOCATOR_MODES: dict[str, dict[str, Any]] = {
    "default": {"expandable_segments": False, "garbage_collection_threshold": None, "max_split_size_mb": None},
    "expandable": {"expandable_segments": True, "garbage_collection_threshold": None, "max_split_size_mb": None},
    "split128": {"expandable_segments": False, "garbage_collection_threshold": None, "max_split_size_mb": 128},
    "gc08_split128": {"expandable_segments": False, "garbage_collection_threshold": 0.8, "max_split_size_mb": 128},
}
# Kernels that run only in half precision (FlashAttention-2 and cuDNN's fused attention).
HALF_ONLY_KERNELS: frozenset[str] = frozenset({"flash", "cudnn"})
HALF_PRECISIONS: frozenset[str] = frozenset({"bf16", "fp16"})

MAX_NUM_SEQS_LIMIT = 4096
MAX_BATCHED_TOKENS_LIMIT = 1 << 20


class KnobError(InputError):
    """A knob value that the engine cannot run, with the reason."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """The settings an iteration runs under.

    `reclaim` is an action, not a state: when true, the engine empties the allocator's
    cache once before the next iteration and then clears the flag.
    """

    max_num_seqs: int = 32
    max_batched_tokens: int = 4096
    attention: str = "flash"
    cuda_graphs: bool = False
    precision: str = "bf16"
    allocator: str = "default"
    reclaim: bool = False

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, 1, MAX_NUM_SEQS_LIMIT)
        _check_int("max_batched_tokens", self.max_batched_tokens, 1, MAX_BATCHED_TOKENS_LIMIT)
        _check_choice("attention", self.attention, ATTENTION_KERNELS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("allocator", self.allocator, tuple(ALLOCATOR_MODES))
        for name in ("cuda_graphs", "reclaim"):
            if not isinstance(getattr(self, name), bool):
                raise KnobError(f"knob {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.attention in HALF_ONLY_KERNELS and self.precision not in HALF_PRECISIONS:
            raise KnobError(
                f"attention {self.attention!r} runs only in bf16 or fp16, not {self.precision!r}; "
                "use 'efficient' or 'math' for fp32"
            )

    @property
    def allocator_settings(self) -> dict[str, Any]:
        return dict(ALLOCATOR_MODES[self.allocator])

    def replace(self, **changes: Any) -> Knobs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Knobs:
        if not isinstance(data, dict):
            raise KnobError(f"knobs must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KnobError(f"unknown knob(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Knobs:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: a BOM, as editors on Windows write
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KnobError(f"{path}: cannot read knobs: {exc}") from exc
        try:
            return cls.from_dict(data)
        except KnobError as exc:
            raise KnobError(f"{path}: {exc}") from exc


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Knobs))


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(f"knob {name!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise KnobError(f"knob {name!r} must be in [{lo}, {hi}], got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KnobError(f"knob {name!r} must be one of {list(choices)}, got {value!r}")


def not_applicable(knobs: Knobs, device_type: str) -> dict[str, str]:
    """The knobs that cannot act on `device_type`, each with the reason.

    The engine reports these rather than pretending to apply them.
    """
    reasons: dict[str, str] = {}
    if device_type != "cuda":
        if knobs.cuda_graphs:
            reasons["cuda_graphs"] = "CUDA graphs need a CUDA device"
        if knobs.attention in ("efficient", "cudnn"):
            reasons["attention"] = f"the {knobs.attention!r} SDPA kernel exists only on CUDA; the CPU runs 'flash'"
        if knobs.allocator != "default":
            reasons["allocator"] = "allocator settings act on the CUDA caching allocator only"
        if knobs.reclaim:
            reasons["reclaim"] = "empty_cache acts on the CUDA caching allocator only"
        if knobs.precision == "fp32_tf32":
            reasons["precision"] = "TF32 is a CUDA matmul mode; the CPU runs plain fp32"
    return reasons
