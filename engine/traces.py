"""Request traces: real arrival/length logs and seeded synthetic workloads.

A `Trace` is the column form of a workload (arrival times, prompt and output lengths) so
that scaling, windowing and clipping are numpy operations; `to_requests` turns it into the
engine's `Request` objects. Loaders refuse malformed files with a `TraceError` naming the
file, the 1-based line and the fault, because a silently mis-read trace corrupts every
figure computed from it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoopt.engine.request import Request

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

TRACE_DIR = Path(__file__).resolve().parent / "traces"

# Lognormal spreads fitted to the Azure 2023 conversation trace (p50 -> p90):
# prompt 1020 -> 2734 gives ln(2.68)/1.2816 = 0.77; output 129 -> 424 gives ln(3.29)/1.2816 = 0.93.
PROMPT_MEDIAN = 1000
OUTPUT_MEDIAN = 130
PROMPT_SIGMA = 0.77
OUTPUT_SIGMA = 0.93


class TraceError(ValueError):
    """A trace file or spec that cannot be used; the message names the file, line and fault."""


def _where(path: str | Path, line: int | None) -> str:
    return f"{path}: line {line}" if line is not None else f"{path}"


def _fail(path: str | Path, line: int | None, fault: str) -> TraceError:
    return TraceError(f"{_where(path, line)}: {fault}")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Trace:
    """A workload: one row per request, arrivals in seconds starting at 0.

    Arrays are copied, coerced (float64 / int64) and made read-only, so a Trace can be
    shared between simulations without one run mutating another's workload.
    """

    name: str
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    source: str
    clipped_prompts: int = 0
    clipped_outputs: int = 0

    def __post_init__(self) -> None:
        arr = np.array(self.arrival_s, dtype=np.float64, copy=True).reshape(-1)
        pl = np.array(self.prompt_len, dtype=np.int64, copy=True).reshape(-1)
        ol = np.array(self.output_len, dtype=np.int64, copy=True).reshape(-1)
        if not (len(arr) == len(pl) == len(ol)):
            raise ValueError(f"trace {self.name!r}: column lengths differ ({len(arr)}, {len(pl)}, {len(ol)})")
        if len(arr):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"trace {self.name!r}: arrival times must be finite")
            if np.any(np.diff(arr) < 0):
                raise ValueError(f"trace {self.name!r}: arrival times must be non-decreasing")
            arr = arr - arr[0]
            if pl.min() < 1 or ol.min() < 1:
                raise ValueError(f"trace {self.name!r}: prompt and output lengths must be >= 1")
        object.__setattr__(self, "arrival_s", _frozen(arr))
        object.__setattr__(self, "prompt_len", _frozen(pl))
        object.__setattr__(self, "output_len", _frozen(ol))

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (
            (self.name, self.source, self.clipped_prompts, self.clipped_outputs)
            == (other.name, other.source, other.clipped_prompts, other.clipped_outputs)
            and np.array_equal(self.arrival_s, other.arrival_s)
            and np.array_equal(self.prompt_len, other.prompt_len)
            and np.array_equal(self.output_len, other.output_len)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value

    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, requests={len(self)}, duration_s={self.duration_s:.1f}, "
            f"mean_rate={self.mean_rate:.2f}, source={self.source!r})"
        )

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0 for fewer than two requests)."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the trace's span; inf if all arrive at once, 0 if empty."""
        if not len(self):
            return 0.0
        d = self.duration_s
        return len(self) / d if d > 0 else math.inf

    def _replace(self, **changes: object) -> Trace:
        fields = {
            "name": self.name,
            "arrival_s": self.arrival_s,
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "source": self.source,
            "clipped_prompts": self.clipped_prompts,
            "clipped_outputs": self.clipped_outputs,
        }
        fields.update(changes)
        return Trace(**fields)  # type: ignore[arg-type]

    def scaled(self, speedup: float) -> Trace:
        """Replay `speedup` times faster (arrivals divided by it); lengths unchanged."""
        speedup = float(speedup)
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError(f"speedup must be > 0 and finite, got {speedup}")
        return self._replace(name=f"{self.name}@x{speedup:g}", arrival_s=self.arrival_s / speedup)

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Rows with start_s <= t < start_s + duration_s, re-based so the first kept arrival is 0."""
        start_s, duration_s = float(start_s), float(duration_s)
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"window start must be >= 0 and finite, got {start_s}")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"window duration must be > 0 and finite, got {duration_s}")
        lo = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        hi = int(np.searchsorted(self.arrival_s, start_s + duration_s, side="left"))
        return self._replace(
            name=f"{self.name}[{start_s:g}s+{duration_s:g}s]",
            arrival_s=self.arrival_s[lo:hi],
            prompt_len=self.prompt_len[lo:hi],
            output_len=self.output_len[lo:hi],
        )

    def clip(self, max_context: int) -> Trace:
        """Fit every request into `max_context` tokens: prompt <= max_context-1, prompt+output <= max_context.

        Counts the rows whose prompt (resp. output) was cut, added to the existing counters.
        """
        max_context = int(max_context)
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2 (one prompt and one output token), got {max_context}")
        prompt = np.minimum(self.prompt_len, max_context - 1)
        output = np.minimum(self.output_len, max_context - prompt)
        return self._replace(
            prompt_len=prompt,
            output_len=output,
            clipped_prompts=self.clipped_prompts + int(np.count_nonzero(prompt != self.prompt_len)),
            clipped_outputs=self.clipped_outputs + int(np.count_nonzero(output != self.output_len)),
        )

    def to_requests(self, start_rid: int = 0) -> list[Request]:
        """Fresh engine requests with ids start_rid, start_rid+1, ... in arrival order."""
        return [
            Request(start_rid + i, a, p, o)
            for i, (a, p, o) in enumerate(
                zip(self.arrival_s.tolist(), self.prompt_len.tolist(), self.output_len.tolist(), strict=True)
            )
        ]


# --------------------------------------------------------------------------- file loaders


_LINE_BREAK = re.compile(r"\r\n?|\n")
_NS_FIRST, _NS_END = np.datetime64("1678-01-01", "us"), np.datetime64("2262-01-01", "us")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, split at LF, CRLF or CR only (`str.splitlines` also splits at form
    feeds and other separators, which would shift every later line number), without a
    UTF-8 byte-order mark (spreadsheet exports write one, and it would hide the header)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _fail(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise _fail(path, line, "not UTF-8 text") from None
    lines = _LINE_BREAK.split(text)
    if lines and not lines[-1]:
        lines.pop()  # the final line break ends the last line rather than starting another
    return lines


def _lengths_to_int(
    path: Path, lines: np.ndarray, values: np.ndarray, column: str, raw: list[str] | None = None
) -> tuple[np.ndarray, int]:
    """Validate float lengths (no NaN, negative or fractional) and lift zeros to 1, counting them."""
    for bad, fault in (
        (np.isnan(values), "NaN"),
        (np.isinf(values), "infinite"),
        (values < 0, "negative"),
        (values != np.floor(values), "non-integer"),
    ):
        if np.any(bad):
            i = int(np.argmax(bad))
            shown = repr(raw[i]) if raw is not None else f"{values[i]:g}"
            raise _fail(path, int(lines[i]), f"{fault} {column} {shown}")
    zeros = values == 0
    return np.maximum(values, 1).astype(np.int64), int(np.count_nonzero(zeros))


def _check_order(path: Path, lines: np.ndarray, t: np.ndarray, column: str) -> None:
    back = np.diff(t) < 0
    if np.any(back):
        i = int(np.argmax(back)) + 1
        raise _fail(path, int(lines[i]), f"{column} out of order (decreases from the previous row)")


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
# A UTC offset ending a timestamp: the Azure 2024 traces write `2024-05-10 00:00:00.009930+00:00`
_UTC_OFFSET = re.compile(r"(?:Z|([+-])([01]\d|2[0-3]):?([0-5]\d))$")


def _csv_header(path: Path, lines: list[str]) -> list[str]:
    if not lines or not lines[0].strip():
        raise _fail(path, 1, "empty file: no header and no rows")
    return [h.strip() for h in lines[0].split(",")]


def _csv_columns(
    path: Path, lines: list[str], header: list[str], columns: tuple[str, ...]
) -> tuple[list[int], list[list[str]]]:
    """The named columns of a plain comma-separated file (no quoting: the public traces have
    none), as stripped strings, with each row's 1-based line number; blank lines skipped.

    A file of whole rows (no blank line, every row as wide as the header: the public traces)
    is split in one pass at C speed; any other is read row by row, naming a faulty row's line.
    """
    for col in columns:
        if col not in header:
            raise _fail(path, 1, f"missing column {col!r} in header (got {', '.join(header)})")
    idx = [header.index(c) for c in columns]
    width = len(header)
    rows = lines[1:]
    if width > 1 and rows and all(r.count(",") == width - 1 for r in rows):
        fields = ",".join(rows).split(",")
        return list(range(2, len(rows) + 2)), [[f.strip() for f in fields[i::width]] for i in idx]
    line_no: list[int] = []
    cols: list[list[str]] = [[] for _ in columns]
    for n, line in enumerate(rows, start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != width:
            raise _fail(path, n, f"expected {width} fields, got {len(parts)} (missing or extra column)")
        for c, i in zip(cols, idx, strict=True):
            c.append(parts[i].strip())
        line_no.append(n)
    if not line_no:
        raise _fail(path, 2, "empty trace: header but no rows")
    return line_no, cols


def _timestamps_ns(path: Path, line_no: list[int], raw: list[str], column: str) -> np.ndarray:
    """Absolute timestamps as int64 ns, in UTC where they carry an offset (`Z`, `+00:00`):
    one trace either gives every row an offset or none. Parsed column-wise with numpy
    (datetime64[ns] keeps 7 fractional digits); on a failure the rows are re-parsed one by
    one to name the offending line."""
    naive, offsets = _without_utc_offsets(path, line_no, raw, column)
    # numpy reads an offset it is left with (`+05`, a second one, `+25:00`) with only a
    # warning that it guessed: here any such leftover makes the row unparseable
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "no explicit representation of timezones", UserWarning)
        try:
            stamps = np.array(naive, dtype="datetime64[ns]")
        except (ValueError, UserWarning):
            stamps = None
        if stamps is None or np.any(np.isnat(stamps)):
            for n, s, original in zip(line_no, naive, raw, strict=True):
                try:
                    ok = not np.isnat(np.datetime64(s, "ns"))
                except (ValueError, UserWarning):
                    ok = False
                if not ok:
                    # the offset hint only where the stamp seems to carry one
                    hint = " (a UTC offset is Z, ±HH:MM or ±HHMM)" if s != original or "+" in s[-6:] else ""
                    raise _fail(path, n, f"unparseable {column} {original!r}{hint}") from None
            raise AssertionError("unreachable: vectorised parse failed but every timestamp parsed")
        # nanoseconds reach only the years 1678-2261 and numpy wraps silently beyond (year
        # 3000 or a bare number such as `1`, read as year 1, would give garbage arrivals)
        wide = np.array(naive, dtype="datetime64[us]")
        outside = (wide < _NS_FIRST) | (wide >= _NS_END)
        if np.any(outside):
            i = int(np.argmax(outside))
            raise _fail(path, line_no[i], f"{column} {raw[i]!r} is outside the years 1678-2261")
    ns = stamps.astype(np.int64)
    return ns if offsets is None else ns - offsets * 1_000_000_000


def _offset_s(m: re.Match[str]) -> int:
    return 0 if m[1] is None else (1 if m[1] == "+" else -1) * (int(m[2]) * 3600 + int(m[3]) * 60)


def _without_utc_offsets(
    path: Path, line_no: list[int], raw: list[str], column: str
) -> tuple[list[str], np.ndarray | int | None]:
    """The timestamps without their UTC offsets, and the offsets in seconds (None: naive).

    The common cases are checked at C speed: one offset on every row (the 2024 traces'
    `+00:00`) and none on any (the 2023 traces); anything else is read row by row."""
    first = _UTC_OFFSET.search(raw[0], len(raw[0]) - 6)  # an offset is at most 6 characters
    if first is not None and all(s.endswith(first[0]) for s in raw):
        k = len(first[0])
        return [s[:-k].rstrip() for s in raw], _offset_s(first)
    if first is None and not any(s.endswith("Z") or "+" in s[-6:] or "-" in s[-6:] for s in raw):
        return raw, None
    matches = [_UTC_OFFSET.search(s, len(s) - 6) for s in raw]
    if not any(matches):
        return raw, None
    for n, m, original in zip(line_no, matches, raw, strict=True):
        if m is None:
            raise _fail(path, n, f"{column} {original!r} lacks the UTC offset (Z, ±HH:MM or ±HHMM) other rows have")
    stripped = [s[: m.start()].rstrip() for s, m in zip(raw, matches, strict=True)]
    return stripped, np.array([_offset_s(m) for m in matches], dtype=np.int64)


def _csv_trace(
    path: Path,
    line_no: list[int],
    arrival_s: np.ndarray,
    prompts: list[str],
    outputs: list[str],
    names: tuple[str, str],
) -> Trace:
    ln = np.asarray(line_no)
    lengths = []
    zero_counts = []
    for raw, col in ((prompts, names[0]), (outputs, names[1])):
        v, z = _lengths_to_int(path, ln, _parse_floats(path, line_no, raw, col), col, raw)
        lengths.append(v)
        zero_counts.append(z)
    return Trace(
        name=path.stem,
        arrival_s=arrival_s,
        prompt_len=lengths[0],
        output_len=lengths[1],
        source=str(path),
        clipped_prompts=zero_counts[0],
        clipped_outputs=zero_counts[1],
    )


def _azure(path: Path, lines: list[str], header: list[str]) -> Trace:
    line_no, (stamps, prompts, outputs) = _csv_columns(path, lines, header, AZURE_COLUMNS)
    ns = _timestamps_ns(path, line_no, stamps, "TIMESTAMP")
    _check_order(path, np.asarray(line_no), ns, "TIMESTAMP")
    return _csv_trace(path, line_no, (ns - ns[0]) / 1e9, prompts, outputs, AZURE_COLUMNS[1:])


def _burstgpt(path: Path, lines: list[str], header: list[str]) -> Trace:
    line_no, (stamps, prompts, outputs) = _csv_columns(path, lines, header, BURSTGPT_COLUMNS)
    t = _parse_floats(path, line_no, stamps, "Timestamp")
    ln = np.asarray(line_no)
    for bad, fault in ((~np.isfinite(t), "non-finite"), (t < 0, "negative")):
        if np.any(bad):
            i = int(np.argmax(bad))
            raise _fail(path, line_no[i], f"{fault} Timestamp {stamps[i]!r}")
    _check_order(path, ln, t, "Timestamp")
    return _csv_trace(path, line_no, t - t[0], prompts, outputs, BURSTGPT_COLUMNS[1:])


def load_azure_csv(path: str | Path) -> Trace:
    """Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`): the 2023
    traces' naive timestamps or the 2024 traces' UTC-offset ones."""
    path = Path(path)
    lines = _read_lines(path)
    return _azure(path, lines, _csv_header(path, lines))


def load_burstgpt_csv(path: str | Path) -> Trace:
    """BurstGPT CSV (`Timestamp` in seconds, `Request tokens`, `Response tokens`; `Model`,
    `Log Type` and other columns ignored). Its failed requests have 0 response tokens: they
    are replayed as 1-token outputs and counted, as zero lengths are in every format."""
    path = Path(path)
    lines = _read_lines(path)
    return _burstgpt(path, lines, _csv_header(path, lines))


def load_csv(path: str | Path) -> Trace:
    """A CSV trace, told by its header: Azure's columns or BurstGPT's."""
    path = Path(path)
    lines = _read_lines(path)
    header = _csv_header(path, lines)
    if all(c in header for c in AZURE_COLUMNS):
        return _azure(path, lines, header)
    if all(c in header for c in BURSTGPT_COLUMNS):
        return _burstgpt(path, lines, header)
    fmt = {"Azure": AZURE_COLUMNS, "BurstGPT": BURSTGPT_COLUMNS}
    raise _fail(
        path,
        1,
        "missing columns: the header has neither "
        + " nor ".join(f"{k}'s ({', '.join(v)})" for k, v in fmt.items())
        + f" (got {', '.join(header)})",
    )


def _parse_floats(path: Path, line_no: list[int], raw: list[str], column: str) -> np.ndarray:
    try:
        return np.array(raw, dtype=np.float64)
    except ValueError:
        pass
    for n, s in zip(line_no, raw, strict=True):
        try:
            float(s)
        except ValueError:
            raise _fail(path, n, f"non-numeric {column} {s!r}") from None
    raise AssertionError("unreachable: vectorised parse failed but every value parsed")


MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


def load_mooncake_jsonl(path: str | Path, spread_buckets: bool = True) -> Trace:
    """Mooncake FAST'25 JSONL (`timestamp` ms, `input_length`, `output_length`; other fields ignored).

    Mooncake quantises timestamps to ~3 s buckets; replaying them raw makes every bucket a
    burst. With `spread_buckets`, the k requests sharing a timestamp are placed evenly over
    the gap to the next distinct timestamp (the last bucket uses the median gap).
    """
    path = Path(path)
    lines = _read_lines(path)
    line_no: list[int] = []
    rows: list[tuple[float, float, float]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, n, f"malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _fail(path, n, f"malformed row: expected a JSON object, got {type(obj).__name__}")
        vals = []
        for f in MOONCAKE_FIELDS:
            if f not in obj:
                raise _fail(path, n, f"missing field {f!r}")
            v = obj[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _fail(path, n, f"non-numeric {f} {v!r}")
            vals.append(float(v))
        rows.append((vals[0], vals[1], vals[2]))
        line_no.append(n)
    if not rows:
        raise _fail(path, 1, "empty file: no rows")
    ln = np.asarray(line_no)
    data = np.array(rows, dtype=np.float64)
    ts = data[:, 0]
    if np.any(~np.isfinite(ts)):
        i = int(np.argmax(~np.isfinite(ts)))
        raise _fail(path, int(ln[i]), f"NaN or infinite timestamp {ts[i]}")
    _check_order(path, ln, ts, "timestamp")
    prompt, zp = _lengths_to_int(path, ln, data[:, 1], "input_length")
    output, zo = _lengths_to_int(path, ln, data[:, 2], "output_length")
    arrival = (ts - ts[0]) / 1000.0
    if spread_buckets:
        arrival = _spread_buckets(arrival)
    return Trace(
        name=path.stem,
        arrival_s=arrival,
        prompt_len=prompt,
        output_len=output,
        source=str(path),
        clipped_prompts=zp,
        clipped_outputs=zo,
    )


def _spread_buckets(t: np.ndarray) -> np.ndarray:
    """Place the i-th of k equal timestamps at t + i * gap / k (gap to the next distinct time)."""
    uniq, first, counts = np.unique(t, return_index=True, return_counts=True)
    if len(uniq) < 2:
        return t.copy()
    gaps = np.diff(uniq)
    gaps = np.append(gaps, np.median(gaps))
    group = np.repeat(np.arange(len(uniq)), counts)  # t is sorted, so groups are contiguous
    rank = np.arange(len(t)) - first[group]
    return uniq[group] + rank * gaps[group] / counts[group]


# --------------------------------------------------------------------------- synthetic


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return np.maximum(np.rint(rng.lognormal(math.log(median), sigma, n)), 1).astype(np.int64)


def _check_positive(**kw: float) -> None:
    for k, v in kw.items():
        if not (math.isfinite(v) and v > 0):
            raise TraceError(f"{k} must be > 0 and finite, got {v}")


def _check_rate(**kw: float) -> None:
    for k, v in kw.items():
        if not (math.isfinite(v) and v >= 0):
            raise TraceError(f"{k} must be >= 0 and finite, got {v}")


def _synth(
    name: str,
    rate_fn: Callable[[np.ndarray], np.ndarray],
    rate_max: float,
    duration_s: float,
    seed: int,
    prompt_median: float,
    output_median: float,
    prompt_sigma: float,
    output_sigma: float,
) -> Trace:
    """Non-homogeneous Poisson process by thinning (Lewis & Shedler), then lognormal lengths."""
    _check_positive(duration_s=duration_s, prompt_median=prompt_median, output_median=output_median)
    _check_rate(prompt_sigma=prompt_sigma, output_sigma=output_sigma)
    rng = np.random.default_rng(seed)
    n = int(rng.poisson(rate_max * duration_s)) if rate_max > 0 else 0
    t = np.sort(rng.uniform(0.0, duration_s, n))
    keep = rng.uniform(0.0, rate_max, n) < rate_fn(t) if n else np.zeros(0, dtype=bool)
    t = t[keep]
    if not len(t):
        raise TraceError(f"synthetic trace {name!r} produced no requests; raise the rate or duration")
    prompt = _lengths(rng, len(t), prompt_median, prompt_sigma)
    output = _lengths(rng, len(t), output_median, output_sigma)
    return Trace(name=name, arrival_s=t, prompt_len=prompt, output_len=output, source=f"synthetic:{name} seed={seed}")


def poisson(
    rate: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Homogeneous Poisson arrivals at `rate` req/s for `duration_s` seconds."""
    rate = float(rate)
    _check_positive(rate=rate)
    return _synth(
        f"poisson:rate={rate:g},duration={duration_s:g}",
        lambda t: np.full(t.shape, rate),
        rate,
        float(duration_s),
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )


def bursty(
    rate_on: float,
    rate_off: float,
    period_s: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Square-wave Poisson: `rate_on` for the first half of each period, `rate_off` for the second."""
    rate_on, rate_off, period_s = float(rate_on), float(rate_off), float(period_s)
    _check_rate(rate_on=rate_on, rate_off=rate_off)
    _check_positive(period_s=period_s)
    if max(rate_on, rate_off) <= 0:
        raise TraceError("bursty: rate_on and rate_off are both 0")
    return _synth(
        f"bursty:rate_on={rate_on:g},rate_off={rate_off:g},period={period_s:g},duration={duration_s:g}",
        lambda t: np.where((t % period_s) < period_s / 2, rate_on, rate_off),
        max(rate_on, rate_off),
        float(duration_s),
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )


def ramp(
    start_rate: float,
    end_rate: float,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = PROMPT_MEDIAN,
    output_median: float = OUTPUT_MEDIAN,
    prompt_sigma: float = PROMPT_SIGMA,
    output_sigma: float = OUTPUT_SIGMA,
) -> Trace:
    """Poisson arrivals whose rate moves linearly from `start_rate` to `end_rate` over the run."""
    start_rate, end_rate, duration_s = float(start_rate), float(end_rate), float(duration_s)
    _check_rate(start_rate=start_rate, end_rate=end_rate)
    _check_positive(duration_s=duration_s)
    if max(start_rate, end_rate) <= 0:
        raise TraceError("ramp: start and end rates are both 0")
    return _synth(
        f"ramp:start={start_rate:g},end={end_rate:g},duration={duration_s:g}",
        lambda t: start_rate + (end_rate - start_rate) * (t / duration_s),
        max(start_rate, end_rate),
        duration_s,
        seed,
        prompt_median,
        output_median,
        prompt_sigma,
        output_sigma,
    )


# --------------------------------------------------------------------------- specs

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
            raise TraceError(f"non-numeric value {value!r} for {key!r} in trace spec {spec!r}") from None
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
