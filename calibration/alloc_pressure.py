"""The CUDA caching allocator under memory pressure: a stream of variable-shape batches
served once per (allocator config, memory cap; 0: uncapped), each in a fresh process. Gives rows
in the format of the shared H100 alloc.jsonl and the allocator model fitted to them."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.device import OOM_ERRORS, allocator_settings_string
from ..engine.knobs import ALLOCATOR_MODES
from ..engine.model import SDPA_BACKENDS, DecoderLM, model_config
from .alloc_model import AllocatorModel
from .measure import Clock, error_text, run_with_peak

# The allocator config's environment variables: the CUDA one, and the device-generic name
# that newer torch reads first (so a value left in it would override the CUDA one).
_ALLOC_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def alloc_stream(spec: dict[str, Any], max_context: int) -> list[tuple[int, int]]:
    """A variable-shape prefill stream: lognormal prompt lengths, random batch sizes."""
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    out = []
    for _ in range(int(spec["steps"])):
        n = int(np.clip(rng.lognormal(math.log(spec["median_len"]), spec["sigma"]), 16, max_context))
        b = int(rng.integers(1, int(spec["max_batch"]) + 1))
        b = max(1, min(b, int(spec["max_tokens"]) // n))
        out.append((b, n))
    return out


def run_alloc_pressure(
    cfg: Any, dev: torch.device, spec: dict[str, Any], clock: Clock, progress: bool
) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]]]:
    """Serve the stream once per (allocator config, cap), each in a fresh process with
    PYTORCH_CUDA_ALLOC_CONF and PYTORCH_ALLOC_CONF set before CUDA starts (as the shared
    h100 runs did: a process that already ran the grid holds cached segments that would
    skew the cap). Returns rows in the format of shared/data/h100/alloc.jsonl, notes and
    errors."""
    import multiprocessing as mp
    import tempfile

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    errors: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for cfg_name, cap_frac in spec["runs"]:
        if clock.out():
            notes.append(f"cut before {cfg_name}/{cap_frac}: budget spent")
            break
        if cfg_name not in ALLOCATOR_MODES:
            raise ValueError(f"alloc run config {cfg_name!r} is not one of {list(ALLOCATOR_MODES)}")
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "rows.jsonl"
            old = {name: os.environ.get(name) for name in _ALLOC_ENVS}
            settings = allocator_settings_string(cfg_name)
            try:
                for name in _ALLOC_ENVS:
                    os.environ[name] = settings
                proc = ctx.Process(
                    target=_alloc_worker,
                    args=(cfg.name, cfg_name, float(cap_frac), spec, dev.index or 0, str(out), progress),
                )
                proc.start()
            finally:
                for name, value in old.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            left = None if clock.budget_s is None else max(60.0, clock.budget_s - clock.elapsed + 60.0)
            proc.join(left)
            if proc.is_alive():
                proc.kill()
                proc.join()
                errors.append({"part": "alloc", "cfg": cfg_name, "cap_frac": cap_frac, "error": "timed out"})
            elif proc.exitcode != 0:
                errors.append(
                    {"part": "alloc", "cfg": cfg_name, "cap_frac": cap_frac, "error": f"exit code {proc.exitcode}"}
                )
            if out.exists():
                rows += [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    notes.append(
        "each config in a fresh process, PYTORCH_CUDA_ALLOC_CONF and PYTORCH_ALLOC_CONF set before CUDA starts"
    )
    return rows, "; ".join(notes), errors


def _alloc_worker(
    model_name: str,
    cfg_name: str,
    cap_frac: float,
    spec: dict[str, Any],
    device_index: int,
    out_path: str,
    progress: bool,
) -> None:
    """One run of the stream (child process): bf16 prefill forwards, logits only."""
    from tqdm.auto import tqdm

    dev = torch.device("cuda", device_index)
    cfg = model_config(model_name)
    model = DecoderLM(cfg, seed=0).to(torch.bfloat16).to(dev)  # cast on the host: no fp32 temporaries
    model.prefill_backends = [SDPA_BACKENDS["flash"]]
    stream = alloc_stream(spec, cfg.max_context)
    gen = torch.Generator(device=dev).manual_seed(0)
    total = torch.cuda.get_device_properties(dev).total_memory
    weights = model.weight_bytes()

    def run(b: int, n: int) -> None:
        toks = torch.randint(cfg.vocab, (b, n), generator=gen, device=dev)
        with torch.inference_mode():
            model.prefill_logits(toks, torch.full((b,), n, device=dev))

    rows: list[dict[str, Any]] = []
    head = {"cfg": cfg_name, "cap_frac": float(cap_frac), "reclaim_every": 0}
    if cap_frac:
        bmax, nmax = max(stream, key=lambda x: x[0] * x[1])  # the transient need of the largest batch
        _, need = run_with_peak(dev, lambda: run(bmax, nmax))
        torch.cuda.empty_cache()
        cap = weights + cap_frac * need
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
        rows.append({**head, "cap_bytes": cap, "weights_bytes": weights, "max_batch_need_bytes": need})
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.reset_accumulated_memory_stats(dev)
    t_run = time.perf_counter()
    for step, (b, n) in enumerate(tqdm(stream, desc=f"alloc {cfg_name}/{cap_frac}", disable=not progress)):
        t0 = time.perf_counter()
        ok = True
        try:
            run(b, n)
            torch.cuda.synchronize(dev)
        except OOM_ERRORS:
            ok = False
            torch.cuda.empty_cache()
        ms = (time.perf_counter() - t0) * 1e3
        st = torch.cuda.memory_stats(dev)
        rows.append(
            {
                **head,
                "step": step,
                "B": b,
                "L": n,
                "ok": ok,
                "ms": ms,
                "allocated": int(st.get("allocated_bytes.all.current", 0)),
                "reserved": int(st.get("reserved_bytes.all.current", 0)),
                "active": int(st.get("active_bytes.all.current", 0)),
                "inactive_split": int(st.get("inactive_split_bytes.all.current", 0)),
                "segments": int(st.get("segment.all.current", 0)),
                "retries": int(st.get("num_alloc_retries", 0)),
                "ooms": int(st.get("num_ooms", 0)),
                "peak_reserved": int(st.get("reserved_bytes.all.peak", 0)),
            }
        )
    rows.append({**head, "summary": True, "wall_s": time.perf_counter() - t_run})
    Path(out_path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def fit_allocator(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The allocator model's parameters fitted to the pressure rows, and a note of how."""
    if not rows:
        return {}, "no allocator rows"
    try:
        params = AllocatorModel.fit(rows).params()
    except Exception as exc:  # a failed fit must not lose the latency grid measured before it
        return {}, f"allocator model fit failed: {error_text(exc)}"
    return params, "fitted by calibration.alloc_model.AllocatorModel"
