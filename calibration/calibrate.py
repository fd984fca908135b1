"""Profile the model (not the scheduler) on the present device across the knob grid.

Writes a calibration profile (schema: version 1, see calibration/profile.py's readers):
prefill latency over B x L, decode-step latency over B x C, for every attention kernel,
precision and CUDA-graph setting the device runs; one-off switch costs; and on CUDA the
allocator's behaviour under memory pressure. Timings are of `TorchExecutor.execute`, the
live engine's own iteration, taken as serving takes them: prefills of varied shapes after
decode steps, decode steps in a row (and right after a prefill), samples spread over several
sweeps of the grid so that a shared host's slow phases touch every point alike.

A time budget stops the run cleanly (what was measured is kept; provenance says the grid
was cut), and a grid point that fails is recorded in provenance["errors"] without ending
the run.

The parts live beside it: the grid (grid.py), its timing (grid_run.py), the host-noise
probe (noise_probe.py), the switch costs (switch_costs.py) and the allocator pressure runs
(alloc_pressure.py), with what they share in measure.py; this module runs them in turn and
writes the profile.

CLI: autoopt calibrate --model M --device D --out PROFILE.json [--budget-s S] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.device import resolve_device
from ..engine.knobs import Knobs
from ..engine.model import model_config
from ..engine.torch_executor import TorchExecutor
from .alloc_pressure import fit_allocator, run_alloc_pressure
from .grid import PREFILL_LENGTHS, STATS, default_grid, device_combos, grid_points, merge_grid
from .grid_run import GridRun
from .host_noise import HostNoise
from .measure import Clock, error_text, free_cuda
from .noise_probe import probe_host_noise
from .prefill_history import check_gaps
from .profile import PROFILE_FORMAT, PROFILE_VERSION, SWITCH_KEYS
from .switch_costs import measure_switch_costs


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_mem(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_name(dev: torch.device, model_name: str) -> str:
    if dev.type != "cuda":
        return f"cpu-{model_name}"
    m = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", torch.cuda.get_device_name(dev))
    return f"{(m.group(1) if m else 'cuda').lower()}-{model_name}"


def calibrate(
    model_name: str,
    device: str = "auto",
    out_path: str | Path | None = None,
    budget_s: float | None = None,
    grid: dict[str, Any] | None = None,
    progress: bool = True,
    *,
    quick: bool = False,
    threads: int | None = None,
    name: str | None = None,
    source: str | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """Profile `model_name` on `device`; write the profile JSON to `out_path` (if given).

    `grid` overrides keys of the default grid (see `default_grid`); `budget_s` bounds the
    wall time (the grid is cut, never the switch costs measured first); `threads` sets
    torch's intra-op threads (recorded in provenance).
    """
    from tqdm.auto import tqdm

    clock = Clock(budget_s)
    cfg = model_config(model_name)
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    g = merge_grid(default_grid(dev.type, quick), grid)
    if g.get("stat", "median") not in STATS:
        raise ValueError(f"grid stat must be one of {list(STATS)}, got {g['stat']!r}")
    if g.get("prefill_lengths", "exact") not in PREFILL_LENGTHS:
        raise ValueError(f"grid prefill_lengths must be one of {list(PREFILL_LENGTHS)}, got {g['prefill_lengths']!r}")
    if int(g.get("history_targets") or 0) > 0:
        check_gaps(g["history_gaps"])
    graphs = [bool(x) for x in g["cuda_graphs"] if dev.type == "cuda" or not x]
    combos, skipped = device_combos(g, dev.type)
    pre_pts, dec_pts = grid_points(g, graphs)
    planned = len(combos) * (len(pre_pts) + len(dec_pts))
    errors: list[dict[str, Any]] = []
    kernels: dict[str, dict[str, str]] = {}
    prefill_rows: list[dict[str, Any]] = []
    decode_rows: list[dict[str, Any]] = []
    cut_reason = ""
    base_prec = "bf16" if dev.type == "cuda" else "fp32"

    try:
        switch, switch_detail = measure_switch_costs(model_name, dev, base_prec)
    except Exception as exc:  # one failed part must not end the run
        errors.append({"part": "switch", "error": error_text(exc)})
        switch = dict.fromkeys(SWITCH_KEYS, 0.0)
        switch_detail = {}
    free_cuda(dev)

    ctx = cfg.max_context
    slots = max([*g["prefill"]["B"], *g["decode"]["B"], 1]) + 1  # +1: a background request
    ex = TorchExecutor(
        model_name, str(dev), max_slots=slots, max_context=ctx, knobs=Knobs(precision=base_prec, attention="math")
    )
    cpu_malloc = dict(ex.cpu_malloc)
    passes = max(1, int(g.get("passes", 1)))
    bar = tqdm(total=planned * passes, desc=f"calibrate {model_name}/{dev.type}", disable=not progress, unit="pt")
    try:
        grid_run = GridRun(ex, cfg, dev, g, clock, bar, errors, kernels)
        cut_reason = grid_run.run(combos, pre_pts, dec_pts, passes)
        prefill_rows, decode_rows = grid_run.rows(combos, pre_pts, dec_pts)
        host_noise = None
        probe_s = float(g.get("noise_probe_s") or 0)
        if budget_s is not None:
            probe_s = min(probe_s, budget_s - clock.elapsed)
        if probe_s > 0 and combos:
            try:
                host_noise = probe_host_noise(ex, combos[0], int(g.get("noise_probe_batch", 8)), probe_s).to_dict()
            except Exception as exc:
                errors.append({"part": "noise_probe", "error": error_text(exc)})
    finally:
        bar.close()
    measured = len(prefill_rows) + len(decode_rows)
    # The grid's executor (its weights and whole KV cache) must be gone before the
    # allocator-pressure children share the card: `grid_run` holds it too.
    timing = dict(grid_run.timing)
    del ex, grid_run
    free_cuda(dev)

    allocator: dict[str, Any] = {}
    alloc_rows: list[dict[str, Any]] = []
    alloc_note = "no CUDA allocator on the CPU" if dev.type != "cuda" else ""
    if dev.type == "cuda" and g.get("alloc"):
        if clock.out():
            cut_reason = cut_reason or f"budget of {budget_s} s spent"
            alloc_note = "skipped: budget spent"
        else:
            try:
                alloc_rows, alloc_note, alloc_errors = run_alloc_pressure(cfg, dev, g["alloc"], clock, progress)
                errors += alloc_errors
            except Exception as exc:
                errors.append({"part": "alloc", "error": error_text(exc)})
            allocator, fit_note = fit_allocator(alloc_rows)
            alloc_note = "; ".join(x for x in (alloc_note, fit_note) if x)
            if out_path is not None and alloc_rows:
                side = Path(out_path).with_suffix(".alloc.jsonl")
                side.parent.mkdir(parents=True, exist_ok=True)
                side.write_text("".join(json.dumps(r) + "\n" for r in alloc_rows))
                alloc_note += f"; raw rows in {side.name}"
        torch.cuda.set_per_process_memory_fraction(1.0, dev)

    provenance = {
        "device_name": _device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
        "source": source or f"calibrate({model_name!r}, device={device!r}, budget_s={budget_s}, quick={quick})",
        "notes": notes or _default_notes(dev.type),
        "grid": g,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "cut": bool(cut_reason),
        "cut_reason": cut_reason,
        "planned_points": planned,
        "measured_points": measured,
        "elapsed_s": round(clock.elapsed, 3),
        "errors": errors,
        "skipped": skipped,
        "effective_kernels": kernels,
        "switch_detail": switch_detail,
        "allocator_note": alloc_note,
        "calibration_executor": {"max_slots": slots, "max_context": ctx, "seed": 0},
        # the host's malloc as the engine set it (CPU: fixed glibc thresholds, so that an
        # iteration's activations cost the same whatever ran before; see pin_cpu_malloc)
        "cpu_malloc": cpu_malloc,
        # Timings go through TorchExecutor.execute, whose eager decode pads every row to the
        # longest context in the batch: the simulator charges a mixed batch that way.
        "decode_context": "longest",
        "timing": {"passes": passes, **timing, "host_noise": host_noise},
    }
    profile = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": name or default_name(dev, model_name),
        "provenance": provenance,
        "device": {"type": dev.type, "total_mem_bytes": _total_mem(dev)},
        "model": {
            "name": cfg.name,
            "layers": cfg.layers,
            "d_model": cfg.d_model,
            "heads": cfg.heads,
            "vocab": cfg.vocab,
            "max_context": cfg.max_context,
        },
        "prefill": prefill_rows,
        "decode": decode_rows,
        "switch": switch,
        "allocator": allocator,
    }
    if out_path is not None:
        write_profile(profile, out_path)
    return profile


def _default_notes(device_type: str) -> str:
    common = (
        "Latencies: wall-clock (perf_counter, synchronised) times of TorchExecutor.execute iterations, "
        "seeded random weights, sampled over provenance.timing.passes sweeps of the grid; ms is the point's "
        "median ('median') or its median x the grid's mean sample/median ratio ('expected'; "
        "provenance.timing). Prefill samples run in a shuffled order, each after a decode step of a running "
        "request, on prompts of L tokens (grid prefill_lengths 'exact') or of L-1 down to L-1-L/64 "
        "('below': served prompts are rarely the GEMMs' aligned powers of two); decode rows time steps in a "
        "row of B prefilled requests whose mean attended context is C (eager decode attends over the "
        "longest context rounded up to 64, a captured graph over the full max_context); "
        "provenance.timing.decode_after_prefill_ms_by_prompt is the ms a decode step right after a prefill "
        "takes beyond a step after a step, by the prefill's prompt tokens (decode_after_prefill: the ratio "
        "after the longest prompt); provenance.timing.prefill_after holds how a prefill's time depends on "
        "the last prefill's shape and the decode steps since it, for a few grid points, relative to the rows' "
        "own condition (another shape, one decode step). Rows are "
        "labelled with the attention KNOB; provenance.effective_kernels says which SDPA "
        "kernel really ran (e.g. masked decode under 'flash' runs 'efficient' on CUDA). peak_alloc = "
        "weights + KV of the point (B*L or B*C positions) + activations"
    )
    if device_type == "cuda":
        return common + " (measured: max_memory_allocated above the baseline; graph rows add the graph's pool)."
    return common + " (estimated: engine.model.transient_bytes; the CPU has no allocator counters)."


def write_profile(profile: dict[str, Any], out_path: str | Path) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# -- CLI ----------------------------------------------------------------------------------
def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """`autoopt calibrate --model M --device D --out PROFILE.json [--budget-s S] [--quick]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="autoopt calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model preset (tiny, gpt2-small)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget; the grid is cut when spent")
    p.add_argument("--quick", action="store_true", help="a coarse grid with fewer runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (recorded in provenance)")
    p.add_argument("--name", default=None, help="profile name (default: <device>-<model>)")
    p.add_argument("--notes", default="", help="free text for provenance.notes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    source = "autoopt calibrate " + " ".join(argv)
    try:
        prof = calibrate(
            args.model,
            args.device,
            args.out,
            budget_s=args.budget_s,
            progress=not args.no_progress,
            quick=args.quick,
            threads=args.threads,
            name=args.name,
            source=source,
            notes=args.notes,
        )
    except ValueError as exc:
        print(f"autoopt calibrate: {exc}", file=sys.stderr)
        return 2
    pv = prof["provenance"]
    print(
        f"wrote {args.out}: {len(prof['prefill'])} prefill + {len(prof['decode'])} decode rows in "
        f"{pv['elapsed_s']:.1f} s{' (grid cut: ' + pv['cut_reason'] + ')' if pv['cut'] else ''}, "
        f"{len(pv['errors'])} error(s)"
    )
    if (pv.get("timing") or {}).get("host_noise"):
        print(HostNoise.from_dict(pv["timing"]["host_noise"]).describe())
    empty = [kind for kind in ("prefill", "decode") if not prof[kind]]
    if empty:  # kept for its provenance, but no simulator can run on it
        print(f"autoopt calibrate: no {' and no '.join(empty)} rows measured: the profile is unusable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(calibrate_main())
