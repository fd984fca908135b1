"""Trace files: Azure LLM inference CSVs (the 2023 traces and the 2024 ones with UTC
offsets), BurstGPT CSVs (told by their header) and Mooncake JSONL.

A malformed file is refused with a `TraceError` naming the file, the 1-based line and the
fault, because a silently mis-read trace corrupts every figure computed from it. Zero
lengths (failed requests) are kept as 1-token ones and counted.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from .trace import MAX_TOKENS, Trace, trace_error

_LINE_BREAK = re.compile(r"\r\n?|\n")
_NS_FIRST, _NS_END = np.datetime64("1678-01-01", "us"), np.datetime64("2262-01-01", "us")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, split at LF, CRLF or CR only (`str.splitlines` also splits at form
    feeds and other separators, which would shift every later line number), without a
    UTF-8 byte-order mark (spreadsheet exports write one, and it would hide the header)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise trace_error(path, None, "file not found") from None
    except OSError as e:  # a directory, no permission, ...
        raise trace_error(path, None, (e.strerror or str(e)).lower()) from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise trace_error(path, line, "not UTF-8 text") from None
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
        (values > MAX_TOKENS, "too large"),
    ):
        if np.any(bad):
            i = int(np.argmax(bad))
            shown = repr(raw[i]) if raw is not None else f"{values[i]:g}"
            raise trace_error(path, int(lines[i]), f"{fault} {column} {shown}")
    zeros = values == 0
    return np.maximum(values, 1).astype(np.int64), int(np.count_nonzero(zeros))


def _check_order(path: Path, lines: np.ndarray, t: np.ndarray, column: str) -> None:
    back = np.diff(t) < 0
    if np.any(back):
        i = int(np.argmax(back)) + 1
        raise trace_error(path, int(lines[i]), f"{column} out of order (decreases from the previous row)")


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
# A UTC offset ending a timestamp: the Azure 2024 traces write `2024-05-10 00:00:00.009930+00:00`
_UTC_OFFSET = re.compile(r"(?:Z|([+-])([01]\d|2[0-3]):?([0-5]\d))$")


def _csv_header(path: Path, lines: list[str]) -> list[str]:
    if not lines or not lines[0].strip():
        raise trace_error(path, 1, "empty file: no header and no rows")
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
            raise trace_error(path, 1, f"missing column {col!r} in header (got {', '.join(header)})")
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
            raise trace_error(path, n, f"expected {width} fields, got {len(parts)} (missing or extra column)")
        for c, i in zip(cols, idx, strict=True):
            c.append(parts[i].strip())
        line_no.append(n)
    if not line_no:
        raise trace_error(path, 2, "empty trace: header but no rows")
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
                    raise trace_error(path, n, f"unparseable {column} {original!r}{hint}") from None
            raise AssertionError("unreachable: vectorised parse failed but every timestamp parsed")
        # nanoseconds reach only the years 1678-2261 and numpy wraps silently beyond (year
        # 3000 or a bare number such as `1`, read as year 1, would give garbage arrivals)
        wide = np.array(naive, dtype="datetime64[us]")
        outside = (wide < _NS_FIRST) | (wide >= _NS_END)
        if np.any(outside):
            i = int(np.argmax(outside))
            raise trace_error(path, line_no[i], f"{column} {raw[i]!r} is outside the years 1678-2261")
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
            raise trace_error(
                path, n, f"{column} {original!r} lacks the UTC offset (Z, ±HH:MM or ±HHMM) other rows have"
            )
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
            raise trace_error(path, line_no[i], f"{fault} Timestamp {stamps[i]!r}")
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
    raise trace_error(
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
            raise trace_error(path, n, f"non-numeric {column} {s!r}") from None
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
            raise trace_error(path, n, f"malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise trace_error(path, n, f"malformed row: expected a JSON object, got {type(obj).__name__}")
        vals = []
        for f in MOONCAKE_FIELDS:
            if f not in obj:
                raise trace_error(path, n, f"missing field {f!r}")
            v = obj[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise trace_error(path, n, f"non-numeric {f} {v!r}")
            vals.append(float(v))
        rows.append((vals[0], vals[1], vals[2]))
        line_no.append(n)
    if not rows:
        raise trace_error(path, 1, "empty file: no rows")
    ln = np.asarray(line_no)
    data = np.array(rows, dtype=np.float64)
    ts = data[:, 0]
    if np.any(~np.isfinite(ts)):
        i = int(np.argmax(~np.isfinite(ts)))
        raise trace_error(path, int(ln[i]), f"NaN or infinite timestamp {ts[i]}")
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
