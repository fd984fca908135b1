"""Check a profile's latency predictions against measured rows (`autoopt calibrate check`).

The rows are in the format of shared/data/h100 prefill.jsonl / decode.jsonl, mixed freely:
a row with "L" is a prefill, one with "C" a decode step (`cuda_graphs` missing -> false).
Any grid point may be checked, including ones the profile never saw: that is the point.
Each row says how its prediction was made (`basis`), and the MAPE is also given per basis:
- `interpolated`: the profile measured the row's kernel, precision (and CUDA-graph mode)
  at batches and lengths on both sides of the row's;
- `extrapolated`: that group was measured, but the row's batch or length lies outside its
  measured range (the fitted launch floor and slope carry it);
- `completed`: the profile never measured that group; the prediction is completed from its
  other kernels or precisions.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.errors import InputError
from ..engine.strict_json import dumps_strict
from .latency_model import normalise_row, row_group
from .profile import Profile, ProfileError, load_profile


class CheckError(InputError):
    """Rows that cannot be checked (names the file and line)."""


@dataclass
class CheckedRow:
    kind: str
    B: int
    x: int  # L for prefill, C for decode
    backend: str
    precision: str
    cuda_graphs: bool
    measured_ms: float
    predicted_ms: float
    source: str = ""  # "file:line" when read from a file
    basis: str = ""  # interpolated | extrapolated | completed (see the module docstring)

    @property
    def error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def group(self) -> str:
        mode = f" {'graphs' if self.cuda_graphs else 'eager'}" if self.kind == "decode" else ""
        return f"{self.kind} {self.backend} {self.precision}{mode}"


@dataclass
class CheckResult:
    profile: str
    profile_sha256: str
    n: int
    mape: float  # percent
    by_kind: dict[str, tuple[int, float]] = field(default_factory=dict)  # kind -> (n, MAPE %)
    by_group: dict[str, tuple[int, float]] = field(default_factory=dict)
    by_basis: dict[str, tuple[int, float]] = field(default_factory=dict)
    unmeasured_groups: list[str] = field(default_factory=list)  # groups the profile never measured
    worst: list[CheckedRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["by_kind"] = {k: {"n": n, "mape": m} for k, (n, m) in self.by_kind.items()}
        d["by_group"] = {k: {"n": n, "mape": m} for k, (n, m) in self.by_group.items()}
        d["by_basis"] = {k: {"n": n, "mape": m} for k, (n, m) in self.by_basis.items()}
        d["worst"] = [{**asdict(r), "error_pct": 100.0 * r.error} for r in self.worst]
        return d


def _kind(row: Mapping[str, Any]) -> str:
    has_l, has_c = "L" in row, "C" in row
    if has_l and has_c:
        raise ValueError("row has both 'L' (prefill) and 'C' (decode)")
    if not (has_l or has_c):
        raise ValueError("row has neither 'L' (prefill) nor 'C' (decode)")
    return "prefill" if has_l else "decode"


def _checked(where: str, row: Any, kind: str | None = None) -> dict[str, Any]:
    """`row` if it is a valid measured row (of `kind`, when given); else CheckError at `where`."""
    if not isinstance(row, dict):
        raise CheckError(f"{where}: expected a JSON object, got {type(row).__name__}")
    try:
        found = _kind(row)
        if kind is not None and found != kind:
            raise ValueError(f"a {found} row among the {kind} rows")
        normalise_row(row, found)
    except ValueError as exc:
        raise CheckError(f"{where}: {exc}") from exc
    return row


def _profile_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The measured rows of a profile JSON (`autoopt calibrate --out`), or None if `text` is not one:
    a profile made on one card checks another profile with no conversion step."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON lines either: a broken JSON document
            raise CheckError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        return None  # JSON lines in a .json file
    if isinstance(doc, list):  # a JSON array of measured rows
        return [(f"{path}[{i}]", _checked(f"{path}[{i}]", row)) for i, row in enumerate(doc)]
    if not isinstance(doc, dict) or not any(isinstance(doc.get(k), list) for k in ("prefill", "decode")):
        return None
    return [
        (where, _checked(where, row, kind))
        for kind in ("prefill", "decode")
        for i, row in enumerate(doc.get(kind) or [])
        for where in [f"{path}:{kind}[{i}]"]
    ]


def load_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read measured rows: a .jsonl of them ([(\"file:line\", row)]), a .json array of them, or
    a profile JSON's prefill and decode rows. CheckError names the bad line or row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark, as Windows editors write
    except OSError as exc:
        raise CheckError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CheckError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    out = _profile_rows(path, text) if path.suffix.lower() == ".json" else None
    if out is None:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CheckError(f"{where}: not valid JSON ({exc.msg})") from exc
            if isinstance(row, dict) and row.get("summary"):
                continue
            out.append((where, _checked(where, row)))
    if not out:
        raise CheckError(f"{path}: no rows to check")
    return out


BASES = ("interpolated", "extrapolated", "completed")


class _MeasuredRanges:
    """The batches and lengths a profile measured, per group: where a row sits against them."""

    def __init__(self, profile: Profile) -> None:
        self.ranges: dict[tuple, tuple[int, int, int, int]] = {}
        for kind, second in (("prefill", "L"), ("decode", "C")):
            for row in getattr(profile, kind):
                key = (kind, *row_group(row, kind))
                b, x = int(row["B"]), int(row[second])
                lo_b, hi_b, lo_x, hi_x = self.ranges.get(key, (b, b, x, x))
                self.ranges[key] = (min(lo_b, b), max(hi_b, b), min(lo_x, x), max(hi_x, x))

    def basis(self, kind: str, row: Mapping[str, Any], x: int) -> str:
        span = self.ranges.get((kind, *row_group(row, kind)))
        if span is None:
            return "completed"
        lo_b, hi_b, lo_x, hi_x = span
        return "interpolated" if lo_b <= row["B"] <= hi_b and lo_x <= x <= hi_x else "extrapolated"


def check_profile(
    profile: Profile, rows: Iterable[Mapping[str, Any] | tuple[str, Mapping[str, Any]]], worst: int = 10
) -> CheckResult:
    """Predict every row with the profile's latency model; MAPE overall, per kind and group, worst rows."""
    model = profile.latency()
    measured = _MeasuredRanges(profile)
    checked: list[CheckedRow] = []
    for i, item in enumerate(rows):
        source, row = item if isinstance(item, tuple) else (f"row {i}", item)
        try:
            kind = _kind(row)
            r = normalise_row(row, kind)
        except ValueError as exc:
            raise CheckError(f"{source}: {exc}") from exc
        pred = model.row_ms(r, kind)
        x, graphs = (r["L"], False) if kind == "prefill" else (r["C"], r["cuda_graphs"])
        basis = measured.basis(kind, r, x)
        checked.append(CheckedRow(kind, r["B"], x, r["backend"], r["precision"], graphs, r["ms"], pred, source, basis))
    if not checked:
        raise CheckError("no rows to check")

    def summary(items: list[CheckedRow]) -> tuple[int, float]:
        return len(items), 100.0 * sum(c.error for c in items) / len(items)

    by_kind: dict[str, list[CheckedRow]] = defaultdict(list)
    by_group: dict[str, list[CheckedRow]] = defaultdict(list)
    by_basis: dict[str, list[CheckedRow]] = defaultdict(list)
    for c in checked:
        by_kind[c.kind].append(c)
        by_group[c.group].append(c)
        by_basis[c.basis].append(c)
    n, total = summary(checked)
    return CheckResult(
        profile=profile.name,
        profile_sha256=profile.sha256(),
        n=n,
        mape=total,
        by_kind={k: summary(v) for k, v in sorted(by_kind.items())},
        by_group={k: summary(v) for k, v in sorted(by_group.items())},
        by_basis={k: summary(by_basis[k]) for k in BASES if k in by_basis},
        unmeasured_groups=sorted({c.group for c in checked if c.basis == "completed"}),
        worst=sorted(checked, key=lambda c: -c.error)[:worst],
    )


def format_check(result: CheckResult) -> str:
    lines = [
        f"profile {result.profile} (sha256 {result.profile_sha256[:12]}): {result.n} rows, MAPE {result.mape:.1f}%",
        "",
        f"{'group':40s} {'rows':>5s} {'MAPE':>7s}",
    ]
    for name, (n, m) in result.by_kind.items():
        lines.append(f"{'all ' + name:40s} {n:5d} {m:6.1f}%")
    for name, (n, m) in result.by_group.items():
        note = "  (not in the profile: completed)" if name in result.unmeasured_groups else ""
        lines.append(f"{name:40s} {n:5d} {m:6.1f}%{note}")
    for name, (n, m) in result.by_basis.items():
        lines.append(f"{'rows ' + name:40s} {n:5d} {m:6.1f}%")
    if result.worst:
        lines += ["", "worst rows:"]
        for r in result.worst:
            x = f"{'L' if r.kind == 'prefill' else 'C'}={r.x}"
            lines.append(
                f"  {r.group:32s} B={r.B:<5d} {x:8s} measured {r.measured_ms:9.3f} ms  predicted "
                f"{r.predicted_ms:9.3f} ms  {100 * r.error:6.1f}%  {r.basis:12s}  {r.source}"
            )
    return "\n".join(lines)


def check_main(profile_spec: str, against_path: str | Path, as_json: bool = False) -> int:
    """CLI body: 0 when the check ran, 2 when the profile or the rows cannot be read."""
    try:
        profile = load_profile(profile_spec)
        rows = load_rows(against_path)
        result = check_profile(profile, rows)
    except (ProfileError, CheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(dumps_strict(result.to_dict(), indent=2) if as_json else format_check(result))
    return 0
