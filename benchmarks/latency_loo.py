"""Leave-one-out accuracy of the latency model on the shared H100 measurements.

For every row of prefill.jsonl and decode.jsonl: fit on all the other rows of that file,
predict the held-out row. Prints the mean absolute percentage error (MAPE) per file, per
group (backend x precision x cuda_graphs) and overall, and pass/fail against the limits:
bf16 prefill <= 10%, CUDA-graph decode <= 10%, eager decode <= 20%.

Then, for information (no limit): every group held out whole in turn, fitted on the file's
other groups. That is what the model does for a kernel or precision a profile never
measured (`calibrate check` calls those rows "completed"); leave-one-out never tests it.
And the largest batch, and the largest length or context, held out in turn, fitted on the
rows below it: what the model does beyond the range a profile measured ("extrapolated").

    .venv/bin/python benchmarks/latency_loo.py [DATA_DIR]      (default ../shared/data/h100)
    .venv/bin/python benchmarks/latency_loo.py --prefill P.jsonl --decode D.jsonl

Any pair of files in that format will do, e.g. the engine's own H100 measurements
(`calibration/measured/h100-engine-{prefill,decode}.jsonl`): a second card's worth of rows,
taken another way (wall clock around the engine's paths), which the model's shape was not
designed on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from autoopt.calibration.latency_model import leave_edge_out, leave_group_out, leave_one_out

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "h100"
LIMITS = {"prefill bf16": 10.0, "decode cuda-graphs": 10.0, "decode eager": 20.0}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def mape(errors: list[float]) -> float:
    return 100.0 * sum(errors) / len(errors) if errors else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help=f"default {DEFAULT_DATA}")
    ap.add_argument("--prefill", type=Path, default=None, help="prefill rows (default DATA_DIR/prefill.jsonl)")
    ap.add_argument("--decode", type=Path, default=None, help="decode rows (default DATA_DIR/decode.jsonl)")
    ap.add_argument("--worst", type=int, default=5, help="show this many worst rows per file")
    args = ap.parse_args(argv)
    given = {"prefill": args.prefill, "decode": args.decode}
    files = {kind: given[kind] or args.data / f"{kind}.jsonl" for kind in ("prefill", "decode")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        print(f"error: measurement file(s) not found: {', '.join(missing)}", file=sys.stderr)
        print(
            "give the folder with prefill.jsonl and decode.jsonl as the first argument, or --prefill and --decode",
            file=sys.stderr,
        )
        return 2

    rows_by_kind = {kind: read_jsonl(path) for kind, path in files.items()}
    limits_seen: dict[str, list[float]] = defaultdict(list)
    overall: list[float] = []
    for kind, path in files.items():
        rows = rows_by_kind[kind]
        t0 = time.perf_counter()
        results = leave_one_out(rows, kind)
        secs = time.perf_counter() - t0
        groups: dict[str, list[float]] = defaultdict(list)
        scored = []
        for row, pred in results:
            err = abs(pred - row["ms"]) / row["ms"]
            graphs = kind == "decode" and row["cuda_graphs"]
            label = f"{row['backend']:9s} {row['precision']:9s}" + (
                f" {'graphs' if graphs else 'eager'}" if kind == "decode" else ""
            )
            groups[label].append(err)
            overall.append(err)
            scored.append((err, row, pred))
            if kind == "prefill" and row["precision"] == "bf16":
                limits_seen["prefill bf16"].append(err)
            if kind == "decode":
                limits_seen["decode cuda-graphs" if graphs else "decode eager"].append(err)
        all_err = [e for errs in groups.values() for e in errs]
        print(f"\n{path}  ({len(rows)} rows, {secs:.1f} s)   MAPE {mape(all_err):5.1f}%")
        for label in sorted(groups):
            print(f"  {label}  n={len(groups[label]):3d}  MAPE {mape(groups[label]):5.1f}%")
        second = "L" if kind == "prefill" else "C"
        print(f"  worst {args.worst}:")
        for err, row, pred in sorted(scored, key=lambda t: -t[0])[: args.worst]:
            print(
                f"    {row['backend']:9s} {row['precision']:9s} B={row['B']:<4d} {second}={row[second]:<5d}"
                f"{' graphs' if row.get('cuda_graphs') else ''}  measured {row['ms']:8.3f} ms"
                f"  predicted {pred:8.3f} ms  ({100 * err:5.1f}%)"
            )
    print(f"\noverall MAPE {mape(overall):5.1f}%  ({len(overall)} rows)")
    print_group_holdout(rows_by_kind)
    print_edge_holdout(rows_by_kind)
    ok = True
    for name, limit in LIMITS.items():
        value = mape(limits_seen[name])
        passed = value <= limit
        ok &= passed
        print(f"  {name:20s} MAPE {value:5.1f}%  limit {limit:4.1f}%  {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


def print_group_holdout(rows_by_kind: dict[str, list[dict[str, Any]]], compute_bound_ms: float = 10.0) -> None:
    """Each group held out whole: MAPE over its rows, and over those of at least
    `compute_bound_ms` (out of reach of the host's launch-rate drift), with the median signed
    error (+: predicted slower than measured)."""
    print("\neach group held out whole (fitted on the file's other groups; for information):")
    print(
        f"  {'group':32s} {'rows':>4s}  {'MAPE':>6s}  {'median err':>10s}  {'rows >= ' + str(int(compute_bound_ms)) + ' ms':>14s}"
    )
    for kind, rows in rows_by_kind.items():
        for key, results in leave_group_out(rows, kind).items():
            errs = [pred / row["ms"] - 1 for row, pred in results]
            big = [abs(pred / row["ms"] - 1) for row, pred in results if row["ms"] >= compute_bound_ms]
            label = f"{kind} {' '.join(key[:2])}" + (f" {'graphs' if key[2] else 'eager'}" if kind == "decode" else "")
            slow = f"{mape(big):5.1f}% (n={len(big)})" if big else "-"
            print(
                f"  {label:32s} {len(errs):4d}  {mape([abs(e) for e in errs]):5.1f}%  "
                f"{100 * sorted(errs)[len(errs) // 2]:+9.1f}%  {slow:>14s}"
            )


def print_edge_holdout(rows_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    """The largest value of each axis held out: MAPE, median signed error and the worst row,
    per CUDA-graph mode for decode (eager steps carry the host's launch-rate drift)."""
    print("\nthe largest batch, length or context held out (fitted on the rows below it; for information):")
    print(f"  {'rows held out':40s} {'rows':>4s}  {'MAPE':>6s}  {'median err':>10s}  {'worst':>6s}")
    for kind, rows in rows_by_kind.items():
        held = leave_edge_out(rows, kind)
        for axis in ("B", "L" if kind == "prefill" else "C"):
            if axis not in held:
                values = sorted({r[axis] for r in rows})
                print(f"  {kind} {axis}: measured at {len(values)} value(s) {values}, too few to hold one out")
                continue
            edge, below, pairs = held[axis]
            modes = (None,) if kind == "prefill" else (True, False)
            for graphs in modes:
                errs = [pred / row["ms"] - 1 for row, pred in pairs if graphs is None or row["cuda_graphs"] == graphs]
                if not errs:
                    continue
                mode = "" if graphs is None else " graphs" if graphs else " eager"
                label = f"{kind}{mode} {axis}={edge:g} (fitted up to {below:g})"
                print(
                    f"  {label:40s} {len(errs):4d}  {mape([abs(e) for e in errs]):5.1f}%  "
                    f"{100 * sorted(errs)[len(errs) // 2]:+9.1f}%  {100 * max(abs(e) for e in errs):5.1f}%"
                )


if __name__ == "__main__":
    raise SystemExit(main())
