"""A calibration profile: measured rows of one device and model, in one validated JSON file.

The simulator, the calibration check and policy manifests all read profiles through this
module, so a malformed file fails here, once, with the file and the faulty field named.
The fitted models (latency, memory, allocator) are built lazily from the rows and cached on
the instance: a profile stores measurements, not a particular fit of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.errors import InputError

if TYPE_CHECKING:
    from .alloc_model import AllocatorModel
    from .latency_model import LatencyModel
    from .memory_model import MemoryModel

PROFILE_FORMAT = "autoopt-profile"
PROFILE_VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

BACKENDS = ("flash", "efficient", "math", "cudnn")
PRECISIONS = ("bf16", "fp16", "fp32_tf32", "fp32")
DEVICE_TYPES = ("cuda", "cpu")
TOP_KEYS = ("format", "version", "name", "provenance", "device", "model", "prefill", "decode", "switch", "allocator")
PROVENANCE_KEYS = ("device_name", "device_type", "torch", "date", "source")
MODEL_INT_KEYS = ("layers", "d_model", "heads", "vocab", "max_context")
SWITCH_KEYS = (
    "empty_cache_ms",
    "set_allocator_ms",
    "precision_change_ms",
    "graph_capture_ms",
    "read_memory_stats_us",
    "mem_get_info_us",
)
PREFILL_FIELDS = ("B", "L", "backend", "precision", "ms", "ms_min", "ms_max", "peak_alloc")
DECODE_FIELDS = ("B", "C", "backend", "precision", "cuda_graphs", "ms", "ms_min", "ms_max", "capture_ms", "peak_alloc")


class ProfileError(InputError):
    """A profile that cannot be used, with where and why."""


# ----------------------------------------------------------------------------------------
# Validation helpers: each raises ProfileError naming the place
# ----------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need_dict(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProfileError(f"{where} must be a JSON object, got {type(v).__name__}")
    return v


def _need_keys(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ProfileError(f"{where} is missing {', '.join(repr(k) for k in missing)}")


def _need_pos_int(d: dict[str, Any], key: str, where: str, minimum: int = 1) -> None:
    if not _is_int(d[key]) or d[key] < minimum:
        raise ProfileError(f"{where}: {key!r} must be an integer >= {minimum}, got {d[key]!r}")


def _need_num(d: dict[str, Any], key: str, where: str, positive: bool = False) -> None:
    v = d[key]
    if not _is_num(v) or v < 0 or (positive and v <= 0):
        kind = "a positive number" if positive else "a number >= 0"
        raise ProfileError(f"{where}: {key!r} must be {kind}, got {v!r}")


def _check_timing(row: dict[str, Any], where: str) -> None:
    for key in ("ms", "ms_min", "ms_max"):
        _need_num(row, key, where, positive=True)
    lo, mid, hi = row["ms_min"], row["ms"], row["ms_max"]
    if not lo <= mid * (1 + 1e-9) or not mid <= hi * (1 + 1e-9):
        raise ProfileError(f"{where}: needs ms_min <= ms <= ms_max, got {lo} / {mid} / {hi}")


def _check_choice(row: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> None:
    if row[key] not in choices:
        raise ProfileError(f"{where}: {key!r} must be one of {list(choices)}, got {row[key]!r}")


def validate_prefill_row(row: Any, where: str) -> None:
    row = _need_dict(row, where)
    _need_keys(row, PREFILL_FIELDS, where)
    _need_pos_int(row, "B", where)
    _need_pos_int(row, "L", where)
    _check_choice(row, "backend", BACKENDS, where)
    _check_choice(row, "precision", PRECISIONS, where)
    _check_timing(row, where)
    _need_pos_int(row, "peak_alloc", where, minimum=0)


def validate_decode_row(row: Any, where: str) -> None:
    row = _need_dict(row, where)
    _need_keys(row, DECODE_FIELDS, where)
    _need_pos_int(row, "B", where)
    _need_pos_int(row, "C", where)
    _check_choice(row, "backend", BACKENDS, where)
    _check_choice(row, "precision", PRECISIONS, where)
    if not isinstance(row["cuda_graphs"], bool):
        raise ProfileError(f"{where}: 'cuda_graphs' must be true or false, got {row['cuda_graphs']!r}")
    _check_timing(row, where)
    if row["capture_ms"] is not None:
        _need_num(row, "capture_ms", where)
    _need_pos_int(row, "peak_alloc", where, minimum=0)


def validate_profile_dict(data: Any, where: str = "profile") -> None:
    """Raise ProfileError for anything the schema (version 1) does not allow."""
    data = _need_dict(data, where)
    if data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: 'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(
            f"{where}: unsupported profile version {data.get('version')!r}; this autoopt reads version {PROFILE_VERSION}"
        )
    _need_keys(data, TOP_KEYS, where)
    if not isinstance(data["name"], str) or not data["name"]:
        raise ProfileError(f"{where}: 'name' must be a non-empty string, got {data['name']!r}")
    prov = _need_dict(data["provenance"], f"{where}: provenance")
    _need_keys(prov, PROVENANCE_KEYS, f"{where}: provenance")
    dev = _need_dict(data["device"], f"{where}: device")
    _need_keys(dev, ("type", "total_mem_bytes"), f"{where}: device")
    _check_choice(dev, "type", DEVICE_TYPES, f"{where}: device")
    _need_pos_int(dev, "total_mem_bytes", f"{where}: device")
    model = _need_dict(data["model"], f"{where}: model")
    _need_keys(model, ("name", *MODEL_INT_KEYS), f"{where}: model")
    for key in MODEL_INT_KEYS:
        _need_pos_int(model, key, f"{where}: model")
    for kind, check in (("prefill", validate_prefill_row), ("decode", validate_decode_row)):
        rows = data[kind]
        if not isinstance(rows, list):
            raise ProfileError(f"{where}: {kind!r} must be a list of rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            check(row, f"{where}: {kind} row {i}")
    switch = _need_dict(data["switch"], f"{where}: switch")
    _need_keys(switch, SWITCH_KEYS, f"{where}: switch")
    for key in SWITCH_KEYS:
        _need_num(switch, key, f"{where}: switch")
    if model["max_context"] < 2:  # a request needs a prompt token and room for one more
        raise ProfileError(f"{where}: model: 'max_context' must be >= 2, got {model['max_context']}")
    alloc = _need_dict(data["allocator"], f"{where}: allocator")
    for cfg, params in alloc.items():
        _need_dict(params, f"{where}: allocator[{cfg!r}]")
    _check_parsed(where, lambda: _parse_allocator(alloc))
    if prov.get("decode_context", "mean") not in ("longest", "mean"):  # how a mixed batch's decode is charged
        raise ProfileError(
            f"{where}: provenance.decode_context must be 'longest' or 'mean', got {prov['decode_context']!r}"
        )
    timing = prov.get("timing")
    if timing is not None:
        _need_dict(timing, f"{where}: provenance.timing")
        _check_parsed(f"{where}: provenance.timing", lambda: _parse_timing(timing))


def _check_parsed(where: str, parse: Callable[[], object]) -> None:
    """Parse the parts the simulator reads as it will read them, so that a bad field is a
    ProfileError naming the file now, not a bare error deep in a replay."""
    try:
        parse()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def _parse_allocator(alloc: dict[str, Any]) -> None:
    from .alloc_model import AllocatorModel

    AllocatorModel.from_params(alloc)


def _parse_timing(timing: dict[str, Any]) -> None:
    from .host_noise import HostNoise
    from .prefill_history import check_prefill_after

    float(timing.get("decode_after_prefill", 1.0))
    for n, ms in timing.get("decode_after_prefill_ms_by_prompt") or []:
        float(n), float(ms)
    for qs in (timing.get("noise_quantiles") or {}).values():
        [float(q) for q in qs or []]
    if timing.get("host_noise"):
        HostNoise.from_dict(timing["host_noise"])
    if timing.get("prefill_after"):
        check_prefill_after(timing["prefill_after"])


# ----------------------------------------------------------------------------------------
# The profile
# ----------------------------------------------------------------------------------------


@dataclass
class Profile:
    """One calibration profile (schema version 1; the fields are described in docs/profile-format.md)."""

    name: str
    provenance: dict[str, Any]
    device: dict[str, Any]
    model: dict[str, Any]
    prefill: list[dict[str, Any]]
    decode: list[dict[str, Any]]
    switch: dict[str, Any]
    allocator: dict[str, Any] = field(default_factory=dict)
    _latency: LatencyModel | None = field(default=None, init=False, repr=False, compare=False)
    _memory: MemoryModel | None = field(default=None, init=False, repr=False, compare=False)
    _alloc: AllocatorModel | None = field(default=None, init=False, repr=False, compare=False)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "name": self.name,
            "provenance": self.provenance,
            "device": self.device,
            "model": self.model,
            "prefill": self.prefill,
            "decode": self.decode,
            "switch": self.switch,
            "allocator": self.allocator,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> Profile:
        validate_profile_dict(data, where)
        return cls(
            name=data["name"],
            provenance=dict(data["provenance"]),
            device=dict(data["device"]),
            model=dict(data["model"]),
            prefill=[dict(r) for r in data["prefill"]],
            decode=[dict(r) for r in data["decode"]],
            switch=dict(data["switch"]),
            allocator={k: dict(v) for k, v in data["allocator"].items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark, as Windows editors write
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read profile: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the profile: readable, one measured row per line (small diffs, small commits)."""
        validate_profile_dict(self.to_dict(), where=f"profile {self.name!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_format_json(self.to_dict()))
        return path

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def sha256(self) -> str:
        """Digest of the canonical JSON: the same content hashes the same whatever the file's layout."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    # -- fitted models (lazy, cached) --------------------------------------------------------
    def latency(self) -> LatencyModel:
        """The fitted latency model. A profile without prefill or decode rows (a calibration
        cut before it measured any) is refused: every time predicted from it would be invented."""
        if self._latency is None:
            from .latency_model import LatencyModel

            empty = [kind for kind in ("prefill", "decode") if not getattr(self, kind)]
            if empty:
                raise ProfileError(
                    f"profile {self.name!r} has no {' and no '.join(empty)} rows to predict latency from "
                    "(a calibration cut before it measured any? see provenance.cut_reason)"
                )
            self._latency = LatencyModel.fit(self.prefill, self.decode)
        return self._latency

    def memory(self) -> MemoryModel:
        if self._memory is None:
            from .memory_model import MemoryModel

            self._memory = MemoryModel.from_profile(self)
        return self._memory

    def allocator_model(self) -> AllocatorModel:
        if self._alloc is None:
            from .alloc_model import AllocatorModel

            self._alloc = AllocatorModel.from_params(self.allocator)
        return self._alloc


def _format_json(data: dict[str, Any]) -> str:
    """Pretty JSON with one compact measured row per line and short lists kept on one line."""
    return _dump(data, 0, top=True) + "\n"


def _dump(value: Any, depth: int, top: bool = False) -> str:
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = []
        for k, v in value.items():
            if top and k in ("prefill", "decode") and isinstance(v, list) and v:
                rows = ",\n".join(inner + " " + json.dumps(r, separators=(", ", ": ")) for r in v)
                items.append(f"{inner}{json.dumps(k)}: [\n{rows}\n{inner}]")
            else:
                items.append(f"{inner}{json.dumps(k)}: {_dump(v, depth + 1)}")
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dump(v, depth + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, separators=(", ", ": "))


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    if not PROFILES_DIR.is_dir():
        return []
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile's file, or the given path if it names a file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists() or len(path.parts) > 1:
        if not path.exists():
            raise ProfileError(f"{path}: no such profile file")
        return path
    shipped = PROFILES_DIR / f"{name_or_path}.json"
    if shipped.exists():
        return shipped
    names = ", ".join(list_profiles()) or "none"
    raise ProfileError(
        f"no profile named {str(name_or_path)!r}; shipped profiles: {names}; or give a path to a .json file"
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (e.g. 'h100-gpt2-small') or any profile file by path."""
    return Profile.load(profile_path(name_or_path))
