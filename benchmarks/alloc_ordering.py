"""Replay the shared allocator pressure runs through the fitted allocator model.

For each run of alloc.jsonl (allocator config x memory cap x reclaim period) the same
stream of batch shapes is stepped through `AllocatorState` under the run's cap, over several
seeds, and printed beside what the H100 measured: OOM batches, allocator retries and mean
reserved - allocated. Then the ordering the card showed is checked: default loses the most
batches, expandable (almost) none but retries the most, split128 / gc08_split128 in between,
and reclaiming every N steps lowers default's losses.

    .venv/bin/python benchmarks/alloc_ordering.py [DATA_DIR] [--profile NAME|PATH | --refit] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from autoopt.calibration.alloc_model import AllocatorModel, replay_stream
from autoopt.calibration.profile import ProfileError, load_profile

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "h100"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def runs_of(rows: list[dict[str, Any]]) -> dict[tuple[str, float, int], dict[str, Any]]:
    runs: dict[tuple[str, float, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["cfg"], float(r.get("cap_frac", 0.0)), int(r.get("reclaim_every", 0)))
        run = runs.setdefault(key, {"header": {}, "steps": []})
        if "step" in r:
            run["steps"].append(r)
        elif "cap_bytes" in r:
            run["header"] = r
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help=f"default {DEFAULT_DATA}")
    ap.add_argument("--profile", default="h100-gpt2-small", help="profile whose allocator params to replay")
    ap.add_argument("--refit", action="store_true", help="fit the allocator model on DATA_DIR instead")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args(argv)
    alloc_path = args.data / "alloc.jsonl"
    meta_path = args.data / "meta.json"
    if not alloc_path.exists():
        print(f"error: {alloc_path} not found; give the folder with alloc.jsonl as the first argument", file=sys.stderr)
        return 2
    rows = read_jsonl(alloc_path)
    total_mem = json.loads(meta_path.read_text())["total_mem"] if meta_path.exists() else None
    if args.refit:
        switch_path = args.data / "switch.jsonl"
        switch = read_jsonl(switch_path) if switch_path.exists() else []
        model = AllocatorModel.fit(rows, device_total_bytes=total_mem, switch_rows=switch)
        source = f"fitted on {alloc_path}"
    else:
        try:
            profile = load_profile(args.profile)
        except ProfileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        model = profile.allocator_model()
        total_mem = total_mem or profile.device["total_mem_bytes"]
        source = f"profile {profile.name}"

    runs = runs_of(rows)
    headers = [r["header"] for r in runs.values() if r["header"]]
    need = statistics.median(h["max_batch_need_bytes"] for h in headers)
    weights = statistics.median(h["weights_bytes"] for h in headers)
    max_tokens = max(s["B"] * s["L"] for r in runs.values() for s in r["steps"])

    print(f"allocator model: {source}; {args.seeds} seeds per run (sim = mean, E = expected value)\n")
    print(
        f"{'cfg':14s} {'cap':>4s} {'rec':>3s} | {'OOM meas':>8s} {'sim':>5s} {'E':>5s} | "
        f"{'retries meas':>12s} {'sim':>6s} {'E':>6s} | {'res-alloc MB meas':>17s} {'sim':>5s}"
    )
    sims: dict[tuple[str, float, int], Any] = {}
    for key, run in runs.items():
        cfg, cap_frac, every = key
        steps = sorted(run["steps"], key=lambda s: s["step"])
        if run["header"]:
            cap = run["header"]["cap_bytes"]
        elif cap_frac > 0:
            cap = weights + cap_frac * need
        else:
            cap = total_mem
        persistent = statistics.median(s["allocated"] for s in steps)
        transients = [need * s["B"] * s["L"] / max_tokens for s in steps]
        reps = [
            replay_stream(model, cfg, transients, persistent, cap, reclaim_every=every, seed=seed)
            for seed in range(args.seeds)
        ]
        sim = {
            "oom": statistics.mean(r.oom for r in reps),
            "e_oom": statistics.mean(r.expected_oom for r in reps),
            "retries": statistics.mean(r.retries for r in reps),
            "e_retries": statistics.mean(r.expected_retries for r in reps),
            "cached": statistics.mean(r.mean_cached_bytes for r in reps) / 1e6,
        }
        sims[key] = sim
        meas_oom = sum(not s["ok"] for s in steps)
        meas_retries = steps[-1]["retries"]
        meas_cached = statistics.mean(s["reserved"] - s["allocated"] for s in steps) / 1e6
        print(
            f"{cfg:14s} {cap_frac:4.1f} {every:3d} | {meas_oom:8d} {sim['oom']:5.1f} {sim['e_oom']:5.1f} | "
            f"{meas_retries:12d} {sim['retries']:6.1f} {sim['e_retries']:6.1f} | {meas_cached:17.0f} {sim['cached']:5.0f}"
        )

    def get(cfg: str, every: int = 0) -> dict[str, float] | None:
        return next((v for (c, f, n), v in sims.items() if c == cfg and f > 0 and n == every), None)

    checks = []
    d, e, s, g = get("default"), get("expandable"), get("split128"), get("gc08_split128")
    r = next((v for (c, f, n), v in sims.items() if c == "default" and f > 0 and n > 0), None)
    if d and e:
        checks.append(("default loses more batches than expandable", d["e_oom"] > e["e_oom"] + 1))
        checks.append(("expandable loses almost none (< 2 of the stream)", e["e_oom"] < 2))
        checks.append(("expandable retries more than default", e["e_retries"] > d["e_retries"]))
    for name, mid in (("split128", s), ("gc08_split128", g)):
        if d and e and mid:
            checks.append((f"{name} loses between expandable and default", e["e_oom"] < mid["e_oom"] < d["e_oom"]))
    if d and r:
        checks.append(("reclaim lowers default's losses", r["e_oom"] < d["e_oom"]))
    print()
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
