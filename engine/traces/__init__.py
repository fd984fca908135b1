"""Request traces: real arrival/length logs and seeded synthetic workloads.

A `Trace` is the column form of a workload (arrival times, prompt and output lengths) so
that scaling, windowing and clipping are numpy operations; `to_requests` turns it into the
engine's `Request` objects. Loaders refuse malformed files with a `TraceError` naming the
file, the 1-based line and the fault, because a silently mis-read trace corrupts every
figure computed from it.

`load_trace` is the front door: a shipped excerpt's name (this folder holds them, with
SOURCES.md), a trace file's path (files.py) or a synthetic spec (synthetic.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .files import (
    load_azure_csv,
    load_burstgpt_csv,
    load_csv,
    load_mooncake_jsonl,
)
from .synthetic import bursty, poisson, ramp
from .trace import Trace, TraceError

__all__ = [
    "SHIPPED_TRACES",
    "SYNTHETIC_KINDS",
    "Trace",
    "TraceError",
    "bursty",
    "list_traces",
    "load_azure_csv",
    "load_burstgpt_csv",
    "load_csv",
    "load_mooncake_jsonl",
    "load_trace",
    "poisson",
    "ramp",
]

TRACE_DIR = Path(__file__).resolve().parent  # the shipped excerpts and SOURCES.md

SHIPPED_TRACES: dict[str, str] = {
    "azure-conv": "azure_conv_2023_excerpt.csv: Azure LLM inference trace 2023, conversation, first 20 min "
    "(5,985 requests, ~5 req/s; CC-BY 4.0, Patel et al. ISCA 2024)",
    "mooncake-conv": "mooncake_conv_excerpt.jsonl: Mooncake (Kimi) FAST'25 conversation trace, first 20 min "
    "(3,658 requests, ~3 req/s, long prompts; hash_ids dropped; Apache-2.0 repo)",
}
_SHIPPED_FILES = {name: desc.split(":", 1)[0] for name, desc in SHIPPED_TRACES.items()}

_COMMON_KEYS = {k: k for k in ("prompt_median", "output_median", "prompt_sigma", "output_sigma")}
# kind -> (generator, {spec key: keyword argument}, required spec keys)
SYNTHETIC_KINDS: dict[str, tuple[Callable[..., Trace], dict[str, str], tuple[str, ...]]] = {
    "poisson": (poisson, {"rate": "rate", "duration": "duration_s"}, ("rate", "duration")),
    "bursty": (
        bursty,
        {"rate_on": "rate_on", "rate_off": "rate_off", "period": "period_s", "duration": "duration_s"},
        ("rate_on", "rate_off", "period", "duration"),
    ),
    "ramp": (ramp, {"start": "start_rate", "end": "end_rate", "duration": "duration_s"}, ("start", "end", "duration")),
}


def list_traces() -> list[str]:
    """Names `load_trace` accepts directly (shipped excerpts), sorted."""
    return sorted(SHIPPED_TRACES)


def _accepted() -> str:
    kinds = "; ".join(
        f'"{k}:' + ",".join(f"{key}=..." for key in req) + '"' for k, (_, _, req) in SYNTHETIC_KINDS.items()
    )
    return (
        f"accepted: shipped names {', '.join(list_traces())}; a path ending .csv (Azure or BurstGPT) or .jsonl (Mooncake); "
        f"or a synthetic spec {kinds} (optional keys prompt_median=, output_median=, prompt_sigma=, output_sigma=, seed=)"
    )


def _parse_synthetic(spec: str, seed: int) -> Trace:
    kind, _, body = spec.partition(":")
    kind = kind.strip()
    if kind not in SYNTHETIC_KINDS:
        raise TraceError(f"unknown trace kind {kind!r} in {spec!r}; {_accepted()}")
    fn, keymap, required = SYNTHETIC_KINDS[kind]
    allowed = {**keymap, **_COMMON_KEYS, "seed": "seed"}
    kwargs: dict[str, float | int] = {"seed": seed}
    seen: set[str] = set()
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or key not in allowed:
            raise TraceError(
                f"bad key {item!r} in trace spec {spec!r}; {kind} accepts {', '.join(sorted(allowed))} as key=value"
            )
        if key in seen:
            raise TraceError(f"duplicate key {key!r} in trace spec {spec!r}")
        seen.add(key)
        try:
            num = float(value)
            kwargs[allowed[key]] = int(value) if key == "seed" else num
        except ValueError:
            fault = "a non-integer" if key == "seed" else "non-numeric"
            raise TraceError(f"{fault} value {value!r} for {key!r} in trace spec {spec!r}") from None
    missing = [k for k in required if k not in seen]
    if missing:
        raise TraceError(f"trace spec {spec!r} is missing {', '.join(missing)}; {_accepted()}")
    try:
        return fn(**kwargs)
    except TraceError as e:
        raise TraceError(f"trace spec {spec!r}: {e}") from None


def load_trace(spec: str | Path, *, seed: int = 0) -> Trace:
    """Resolve a shipped name, a .csv/.jsonl path, or a synthetic spec string to a Trace.

    `seed` feeds synthetic specs unless the spec carries its own `seed=`; file traces ignore it.
    """
    if isinstance(spec, Path) or str(spec).lower().endswith((".csv", ".jsonl")):
        path = Path(spec)
        if path.suffix.lower() == ".csv":
            return load_csv(path)
        if path.suffix.lower() == ".jsonl":
            return load_mooncake_jsonl(path)
        raise TraceError(f"{path}: unknown trace file type {path.suffix!r}; {_accepted()}")
    spec = str(spec).strip()
    if spec in _SHIPPED_FILES:
        path = TRACE_DIR / _SHIPPED_FILES[spec]
        trace = load_azure_csv(path) if path.suffix == ".csv" else load_mooncake_jsonl(path)
        return trace._replace(name=spec)
    if ":" in spec:
        return _parse_synthetic(spec, seed)
    raise TraceError(f"unknown trace {spec!r}; {_accepted()}")
