"""The live engine's executor: runs batches on a torch transformer (`engine.model`).

Implements the `Executor` protocol. Running sequences hold KV-cache slots kept compacted
in 0..n-1 (`rid -> slot`), so a decode step attends over `cache[:, :n]`. Knob changes are
real: SDPA kernels pinned with `sdpa_kernel`, weights and KV cast from an fp32 master
copy, CUDA graphs captured lazily per batch-size bucket, the CUDA allocator reconfigured
at run time. Knobs that cannot act on the device are reported, never faked.

Out of memory in a step never raises: the batch's prefill requests lose their slots, the cache is
emptied, and `StepResult(oom=True)` goes back to the scheduler; a precision switch out of
memory is refused and reported, a graph capture out of memory falls back to eager decode.

`memory_cap_bytes` means the same on every device, and the same as in the simulator:
weights + KV in use + activations (+ on CUDA the allocator's cached blocks) <= the cap.
On CUDA the caching allocator enforces it through the per-process memory fraction, set
before each step so that the unused part of the preallocated KV cache does not count
(`cap_memory_fraction`). The fraction is the process's, so hold one capped executor per
process: another executor's memory would count against this one's cap. On the CPU there
is no allocator to run out of, so the cap is simulated from an estimate of the bytes
needed. `inject_oom_next` forces OOMs (in a step, a precision switch or a graph capture)
in tests and drills.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .card import reference_shape
from .device import DTYPES, OOM_ERRORS, apply_allocator, pin_cpu_malloc, resolve_device
from .errors import InputError
from .executor import Batch, Capacity, MemoryReading, StepResult, SwitchReport, kv_token_budget
from .knobs import ALLOCATOR_MODES, KnobError, Knobs, not_applicable
from .model import SDPA_BACKENDS, DecoderLM, model_config, resolve_kernel, round_ctx, transient_bytes
from .request import Request

_KNOB_FIELDS = tuple(f.name for f in dataclasses.fields(Knobs))


@dataclass(slots=True)
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [b] static input
    io: torch.Tensor  # [2, b]: positions, write slots
    out: torch.Tensor  # [b] static output ids


_INJECT_AT = ("execute", "precision", "capture")
# Whether an executor of this process has set the CUDA allocator's memory fraction (a cap)
_FRACTION_SET = False


def _oom(msg: str) -> BaseException:
    return OOM_ERRORS[0](msg)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:160] if text.strip() else type(exc).__name__


def unused_kv_bytes(cache_bytes: int, kv_tokens: int, kv_bytes_per_token: int) -> int:
    """Bytes of a preallocated KV cache that `kv_tokens` positions in use leave unused."""
    return max(0, cache_bytes - kv_tokens * kv_bytes_per_token)


def cap_memory_fraction(
    cap_bytes: int, total_bytes: int, cache_bytes: int, kv_tokens: int, kv_bytes_per_token: int
) -> float:
    """The CUDA allocator's per-process memory fraction that holds weights + KV in use +
    activations + cached blocks to `cap_bytes`, with `kv_tokens` KV positions in use.

    Why not cap/total: the allocator's limit counts every byte it has reserved, and the KV
    cache is preallocated whole (all slots x max_context), so cap/total counts the unused
    part of the cache against the cap. A cap below weights + full cache then leaves no room
    for a step at all, and any other cap leaves less than the scheduler was told
    (`kv_token_budget` counts only the KV in use, as the CPU's simulated cap and the
    simulator do). Adding the unused part of the preallocated cache to the cap gives the
    allocator the cap those count. At most 1 (the whole device).
    """
    unused = unused_kv_bytes(cache_bytes, kv_tokens, kv_bytes_per_token)
    return float(min(1.0, (cap_bytes + unused) / total_bytes))


def capped_gc_threshold(threshold: float, cap_bytes: int, unused_bytes: int, allowed_bytes: float) -> float:
    """The allocator's garbage-collection threshold that collects at `threshold` x the cap.

    Why: PyTorch collects once its reserved bytes pass threshold x the memory fraction's
    allowed bytes, and under a cap that allowance also holds the unused part of the
    preallocated KV cache (`cap_memory_fraction`, above), which counts as reserved. The
    config's own threshold would then collect long before the cap's memory (weights + KV
    in use + activations + cached blocks) is at `threshold` of it. Kept inside (0, 1), as
    PyTorch asks.
    """
    return min(0.999, max(0.001, (threshold * cap_bytes + unused_bytes) / allowed_bytes))


class TorchExecutor:
    """Runs the scheduler's batches on a seeded random-weight transformer."""

    def __init__(
        self,
        model_name: str = "tiny",
        device: str = "auto",
        max_slots: int = 64,
        max_context: int | None = None,
        seed: int = 0,
        memory_cap_bytes: int | None = None,
        full_stats_every: int = 16,
        knobs: Knobs | None = None,
    ) -> None:
        self.cfg = model_config(model_name)
        self.device = resolve_device(device)
        self.device_type = self.device.type
        self._cuda = self.device_type == "cuda"
        # the host's malloc, for the CPU's activations (see pin_cpu_malloc)
        self.cpu_malloc = pin_cpu_malloc() if not self._cuda else {"pinned": False, "reason": "CUDA device"}
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        ctx = self.cfg.max_context if max_context is None else int(max_context)
        if not 1 <= ctx <= self.cfg.max_context:
            raise ValueError(f"max_context must be in [1, {self.cfg.max_context}] for {model_name!r}, got {ctx}")
        if full_stats_every < 1:
            raise ValueError(f"full_stats_every must be >= 1, got {full_stats_every}")
        self.capacity = Capacity(max_slots=max_slots, max_context=ctx)
        self.memory_cap_bytes = int(memory_cap_bytes) if memory_cap_bytes else None
        self._total_mem = 0
        if self._cuda:
            if _FRACTION_SET:
                # The fraction is process-wide: lift what an earlier, capped executor left, so
                # that building this one (and serving, without a cap) is not held to its cap.
                # Only then: a fraction once set also arms the allocator's
                # garbage_collection_threshold, which an uncapped allocator config must not get.
                # (Older torch releases keep it armed even at 1.0, collecting at
                # the threshold x the whole device: later than any cap, so harmless.)
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self._total_mem = torch.cuda.mem_get_info(self.device)[1]
        self.full_stats_every = full_stats_every
        self._knobs = knobs or Knobs()
        self._precision = self._knobs.precision
        self._attention = self._knobs.attention
        self._graphs_on = self._knobs.cuda_graphs and self._cuda
        self._allocator = "default"
        self._gc_threshold: float | None = None  # as last written under a cap (None: the config's own)

        # fp32 master weights in host memory, one flat buffer (pinned on CUDA): a precision
        # change copies it to the device in one allocation, casts each parameter out of it
        # and frees it whole, so no half-used segment is left behind.
        self.model = DecoderLM(self.cfg, seed)
        params = list(self.model.named_parameters())
        self._master = torch.cat([p.detach().reshape(-1) for _, p in params])
        if self._cuda:
            self._master = self._master.pin_memory()
        self._master_index: list[tuple[str, int, int, torch.Size]] = []
        off = 0
        for name, p in params:
            self._master_index.append((name, off, p.numel(), p.shape))
            off += p.numel()
        self.scratch_slot = max_slots  # padding rows of a captured graph write here
        with torch.no_grad():
            self._load_weights(self._working_dtype(self._precision))
            try:
                self.cache = self.model.new_cache(max_slots + 1, ctx)
            except RuntimeError as exc:  # torch.OutOfMemoryError, or the CPU allocator's refusal
                c = self.cfg
                need = 2 * c.layers * (max_slots + 1) * ctx * c.d_model
                need = need * torch.tensor([], dtype=self._working_dtype(self._precision)).element_size()
                raise InputError(
                    f"the KV cache of {max_slots} slots x {ctx} positions needs {need / 2**30:.1f} GiB, more than "
                    f"{self.device} could give ({_first_line(exc)}); lower max_slots"
                ) from exc
            self._next_tok = torch.zeros(max_slots + 1, dtype=torch.long, device=self.device)
            self._arange = torch.arange(max_slots + 1, device=self.device)
        self._tok_gen = torch.Generator(device=self.device).manual_seed(seed)

        # slot bookkeeping: slot i holds request _rids[i] with _lens[i] cached positions
        self._rids: list[int] = []
        self._lens: list[int] = []
        self._slot_of: dict[int, int] = {}

        self._graphs: dict[int, _Graph] = {}
        self._side: Any = None  # torch.cuda.Stream for warm-ups and captures, made at first use
        # bucket -> why its capture failed: it decodes eagerly until graphs are dropped
        self._capture_failures: dict[int, str] = {}
        self._graph_notes: dict[str, str] = {}
        self.capture_ms: dict[int, float] = {}
        self.graph_bytes: dict[int, int] = {}
        self._pending: dict[str, float] = {}
        self._probe_cache: dict[tuple[str, torch.dtype, bool], tuple[str, str]] = {}
        self.effective_kernels: dict[str, str] = {}
        self._kernel_notes: dict[str, str] = {}
        self._alloc_notes: dict[str, str] = {}
        self._set_tf32(self._precision)
        self._resolve_kernels()

        self._inject = dict.fromkeys(_INJECT_AT, 0)
        self._ooms = 0
        self._last_transient = 0
        self._mem_calls = 0
        self._last_full: dict[str, int] = dict.fromkeys(
            ("reserved", "allocated", "fragmentation", "retries", "ooms"), 0
        )
        self._outside = 0
        self._ooms_before = 0
        if self._cuda:
            self._apply_cap(0)  # built uncapped (a one-off); serving is held to the cap from here
            if self._knobs.allocator != "default":
                self.set_allocator(self._knobs.allocator)
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            # bytes held outside this process's caching allocator (CUDA context, other processes)
            self._outside = max(0, total - free - torch.cuda.memory_reserved(self.device))
            self._full_stats()
            # the allocator counts OOMs for the whole process: this executor's are those after now
            self._ooms_before = self._last_full["ooms"]
        self._update_capacity()

    def _update_capacity(self) -> None:
        """Under a memory cap the KV budget is what the cap leaves after the weights
        (it moves with precision); without one, the preallocated cache is the limit."""
        cap = self.capacity
        kv = cap.max_slots * cap.max_context
        if self.memory_cap_bytes:
            kv = min(kv, kv_token_budget(self.memory_cap_bytes, self.weight_bytes, self.cache.bytes_per_token()))
        self.capacity = Capacity(cap.max_slots, cap.max_context, kv)

    # -- introspection ----------------------------------------------------------------
    @property
    def knobs(self) -> Knobs:
        return self._knobs

    @property
    def slots(self) -> dict[int, int]:
        """rid -> KV slot of every running sequence (a copy)."""
        return dict(self._slot_of)

    def context_of(self, rid: int) -> int:
        """Positions cached for `rid` (0 if it holds no slot)."""
        s = self._slot_of.get(rid)
        return 0 if s is None else self._lens[s]

    def last_tokens(self) -> dict[int, int]:
        """rid -> the token each running sequence feeds to its next decode step (syncs)."""
        ids = self._next_tok[: len(self._rids)].tolist()
        return {rid: ids[s] for s, rid in enumerate(self._rids)}

    @property
    def weight_bytes(self) -> int:
        return self._weight_bytes

    def kv_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def take_pending_switch_ms(self) -> dict[str, float]:
        """Costs of lazy switches (CUDA graph captures) since the last call.

        For reporting only: each is already inside the `StepResult.ms` of the step that
        captured, the way the simulator charges it.
        """
        out, self._pending = self._pending, {}
        return out

    @property
    def runtime_notes(self) -> dict[str, str]:
        """Knobs that stopped acting while serving (a bucket whose graph capture ran out of
        memory decodes eagerly): for the engine's report, whose not_applicable is otherwise
        refreshed only when knobs switch."""
        return dict(self._graph_notes)

    @property
    def capture_failures(self) -> dict[int, str]:
        """Batch bucket -> why its CUDA graph capture failed (it decodes eagerly until graphs
        are dropped or memory is reclaimed); a copy."""
        return dict(self._capture_failures)

    def inject_oom_next(self, n: int = 1, where: str = "execute") -> None:
        """Make the next `n` of `where` fail as out of memory (for tests and drills).

        "execute": the step (the batch's prefills lose their slots, `StepResult.oom`).
        "precision": a precision switch, once the new weights are built and before the KV
        cache is cast (the switch is refused, the old precision kept whole). "capture": a
        CUDA graph capture, after the step was recorded (the bucket decodes eagerly).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if where not in _INJECT_AT:
            raise ValueError(f"where must be one of {list(_INJECT_AT)}, got {where!r}")
        self._inject[where] += n

    def _injected(self, where: str) -> bool:
        if self._inject[where] > 0:
            self._inject[where] -= 1
            return True
        return False

    # -- knobs ------------------------------------------------------------------------
    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        """Switch from the knobs in force (the executor's own record; `old` is advisory).

        A precision switch that runs out of memory is refused, not raised: the old precision
        stays whole (and the old attention kernel too when the new one runs only in half
        precision), `not_applicable` says so, `changed` leaves them out, `cost_ms` keeps the
        time the attempt took, and the knobs in force record what really runs.
        """
        cur = self._knobs
        report = SwitchReport()
        report.changed = [f for f in _KNOB_FIELDS if f != "reclaim" and getattr(cur, f) != getattr(new, f)]
        if new.reclaim:
            report.changed.append("reclaim")
        cost = report.cost_ms
        refused: dict[str, str] = {}
        target = new
        if "precision" in report.changed:
            t0 = self._now()
            try:
                cost["precision"] = self.set_precision(new.precision)
            except OOM_ERRORS:
                cost["precision"] = self._since(t0)
                refused["precision"] = f"out of memory casting to {new.precision}, kept {cur.precision}"
                try:
                    target = new.replace(precision=cur.precision)
                except KnobError:  # the new kernel runs only in half precision
                    target = new.replace(precision=cur.precision, attention=cur.attention)
                    refused["attention"] = (
                        f"kept {cur.attention!r}: {new.attention!r} runs only in half precision "
                        f"and the switch to {new.precision} was refused"
                    )
                report.changed = [f for f in report.changed if f not in refused]
        if "attention" in report.changed:
            cost["attention"] = self.set_attention(target.attention)
        if "cuda_graphs" in report.changed:
            ms = self.set_cuda_graphs(new.cuda_graphs)
            if ms is not None:
                cost["cuda_graphs"] = ms
        if "allocator" in report.changed:
            ms = self.set_allocator(new.allocator)
            if ms is not None:
                cost["allocator"] = ms
        if new.reclaim:
            ms = self.reclaim()
            if ms is not None:
                cost["reclaim"] = ms
        na = not_applicable(new, self.device_type)
        for key, why in {**self._kernel_notes, **self._alloc_notes, **self._graph_notes}.items():
            na.setdefault(key, why)
        na.update(refused)
        report.not_applicable = na
        report.ms = float(sum(cost.values()))
        self._knobs = target.replace(reclaim=False) if target.reclaim else target
        return report

    def _working_dtype(self, precision: str) -> torch.dtype:
        return DTYPES[precision]

    @torch.no_grad()
    def _load_weights(self, dtype: torch.dtype) -> None:
        self._assign_weights(self._cast_weights(dtype))

    @torch.no_grad()
    def _cast_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every parameter in `dtype`, from the fp32 master; the model is untouched."""
        src = self._master.to(self.device, non_blocking=True)  # the CPU: the master itself
        # fp32: views of `src` (which then stays alive as the weights); else cast copies
        # (and `src` is freed whole on return)
        return {name: src[off : off + n].view(shape).to(dtype) for name, off, n, shape in self._master_index}

    def _assign_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, t in weights.items():
            params[name].data = t
        self._weight_bytes = self.model.weight_bytes()

    def _cast_state(
        self, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """The weights and the KV cache's (K, V) in `dtype` (None: the KV keeps its dtype),
        all built, none assigned."""
        weights = self._cast_weights(dtype)
        if self._injected("precision"):
            raise _oom("out of memory (injected by inject_oom_next, where='precision')")
        kv = self.cache.cast(dtype) if dtype != self.cache.dtype else None
        return weights, kv

    def _set_tf32(self, precision: str) -> None:
        if self._cuda:  # TF32 is a CUDA matmul mode; the CPU runs plain fp32
            torch.set_float32_matmul_precision("high" if precision == "fp32_tf32" else "highest")

    def set_precision(self, precision: str) -> float:
        """Cast the working weights (from the fp32 master) and the KV cache; returns ms.

        Running sequences keep their KV: the cache's contents are cast, not dropped. All
        or nothing: every new parameter and both new KV tensors are built before any is
        assigned. Out of memory, they are dropped, the allocator's cache is emptied, the
        old precision stays whole and torch.OutOfMemoryError is raised (`apply_knobs`
        reports the switch as refused). On CUDA the memory fraction is lifted to 1 for the
        switch: its transient copies (the fp32 master on the device, old and new tensors
        side by side) are a one-off, not serving memory; the next step sets the cap again.
        """
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
        t0 = self._now()
        dtype = self._working_dtype(precision)
        self._drop_graphs()  # they hold the old weights and KV; their pools go back first
        if self._cuda and _FRACTION_SET:  # a cap is in force (see __init__ for why only then)
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        failed = ""
        with torch.inference_mode(False), torch.no_grad():
            try:
                weights, kv = self._cast_state(dtype)
            except OOM_ERRORS as exc:
                failed = _first_line(exc)
            if not failed:
                self._assign_weights(weights)
                if kv is not None:
                    self.cache.assign(*kv)
                del weights, kv
        if self._cuda:  # give back the old (or, refused, the half-built) tensors' segments
            torch.cuda.empty_cache()
        if failed:  # the exception and the frames holding the new tensors are gone by now
            raise _oom(f"out of memory casting to {precision}, kept {self._precision}: {failed}")
        self._set_tf32(precision)
        self._precision = precision
        self._resolve_kernels()
        self._update_capacity()
        return self._since(t0)

    def set_attention(self, attention: str) -> float:
        if attention not in SDPA_BACKENDS:
            raise ValueError(f"attention must be one of {list(SDPA_BACKENDS)}, got {attention!r}")
        t0 = self._now()
        self._attention = attention
        self._drop_graphs()
        self._resolve_kernels()
        return self._since(t0)

    def set_cuda_graphs(self, on: bool) -> float | None:
        """Graphs are captured lazily at the first decode of each bucket; None on the CPU."""
        if not self._cuda:
            return None
        t0 = self._now()
        self._graphs_on = bool(on)
        if not on:
            self._drop_graphs()
        return self._since(t0)

    def set_allocator(self, name: str) -> float | None:
        """Reconfigure the CUDA caching allocator at run time; None on the CPU.

        A setting PyTorch refuses is reported under not_applicable['allocator'].
        """
        if name not in ALLOCATOR_MODES:
            raise ValueError(f"allocator must be one of {list(ALLOCATOR_MODES)}, got {name!r}")
        if not self._cuda:
            return None
        ms, notes = apply_allocator(name)
        self._allocator = name
        self._gc_threshold = None  # the config's own; the next capped step sets the cap's
        self._alloc_notes = {"allocator": notes} if notes else {}
        return ms

    def reclaim(self) -> float | None:
        """Empty the CUDA allocator's cache; None on the CPU. Buckets whose graph capture
        failed get another try."""
        if not self._cuda:
            return None
        t0 = self._now()
        self.forget_capture_failures()
        torch.cuda.empty_cache()
        return self._since(t0)

    def _resolve_kernels(self) -> None:
        dtype = self._working_dtype(self._precision)
        hd = self.cfg.head_dim
        out: dict[str, str] = {}
        notes: dict[str, str] = {}
        for part, masked in (("prefill", False), ("decode", True)):
            key = (self._attention, dtype, masked)
            if key not in self._probe_cache:
                self._probe_cache[key] = resolve_kernel(
                    self._attention, self.device, dtype, hd, masked, self.capacity.max_context
                )
            kernel, why = self._probe_cache[key]
            out[part] = kernel
            if why:
                notes[f"attention.{part}"] = why
        self.model.prefill_backends = [SDPA_BACKENDS[out["prefill"]]]
        self.model.decode_backends = [SDPA_BACKENDS[out["decode"]]]
        self.effective_kernels = out
        self._kernel_notes = notes

    def _drop_graphs(self) -> None:
        """Drop the captured graphs (and the record of failed captures). On CUDA their
        private pools are then given back: a dropped graph's pool stays reserved until the
        cache is emptied, and would count as used memory (and against a cap) meanwhile."""
        self.forget_capture_failures()
        if self._graphs:
            if self._cuda:
                torch.cuda.synchronize(self.device)
            self._graphs.clear()
            if self._cuda:
                torch.cuda.empty_cache()

    def forget_capture_failures(self) -> None:
        """Let buckets whose graph capture failed try again at their next decode."""
        self._capture_failures.clear()
        self._graph_notes.clear()

    # -- execution --------------------------------------------------------------------
    def execute(self, batch: Batch) -> StepResult:
        if batch.empty:
            return StepResult(ms=0.0)
        self._check_batch(batch)
        if self._cuda and self.memory_cap_bytes:
            self._apply_cap(self._kv_tokens_after(batch))
        t0 = self._now()
        try:
            if self._injected("execute"):
                raise _oom("out of memory (injected by inject_oom_next)")
            self._check_cap(batch)
            with torch.inference_mode():
                # prefill first: if it fails, the decode has not run (nothing to undo); if
                # the decode fails, its state is updated only after success
                if batch.prefill:
                    self._prefill_requests(batch.prefill)
                if batch.decode:
                    self._decode_requests(batch.decode)
                if self._cuda:
                    torch.cuda.synchronize(self.device)
        except OOM_ERRORS as exc:
            self._ooms += 1
            self.release(batch.prefill)  # no slot kept; decode requests keep theirs
            if self._cuda:
                torch.cuda.empty_cache()
            return StepResult(ms=self._since(t0), oom=True, error=_first_line(exc))
        return StepResult(ms=self._since(t0))

    def _check_batch(self, batch: Batch) -> None:
        cap = self.capacity
        dec = {r.rid for r in batch.decode}
        for r in batch.decode:
            s = self._slot_of.get(r.rid)
            if s is None:
                raise ValueError(f"request {r.rid} is in batch.decode but holds no KV slot (prefill it first)")
            if self._lens[s] >= cap.max_context:
                raise ValueError(f"request {r.rid} would decode at position {self._lens[s]} >= max_context")
        new = 0
        for r in batch.prefill:
            if r.rid in dec:
                raise ValueError(f"request {r.rid} is in both batch.prefill and batch.decode")
            if not 1 <= r.context_len <= cap.max_context:
                raise ValueError(f"request {r.rid}: context {r.context_len} tokens is outside [1, {cap.max_context}]")
            new += r.rid not in self._slot_of
        if len(self._rids) + new > cap.max_slots:
            raise ValueError(
                f"batch needs {len(self._rids) + new} KV slots, the executor has {cap.max_slots} "
                "(the scheduler must respect capacity.max_slots)"
            )

    def _kv_tokens_after(self, batch: Batch) -> int:
        """KV positions in use once `batch` has run: the running sequences' (a prefill's
        old slot counted afresh), the prefills' contexts and one per decode row."""
        pre = {r.rid for r in batch.prefill}
        held = sum(n for rid, n in zip(self._rids, self._lens, strict=True) if rid not in pre)
        return held + sum(r.context_len for r in batch.prefill) + len(batch.decode)

    def _unused_kv_bytes(self, kv_tokens: int) -> int:
        return unused_kv_bytes(self.cache.nbytes, kv_tokens, self.cache.bytes_per_token())

    def _apply_cap(self, kv_tokens: int) -> None:
        """CUDA under a cap: the allocator's fraction for `kv_tokens` KV positions in use
        (`cap_memory_fraction`), and for an allocator config with a garbage-collection
        threshold, the threshold that collects at that share of the cap
        (`capped_gc_threshold`); a no-op otherwise."""
        if self._cuda and self.memory_cap_bytes:
            global _FRACTION_SET
            unused = self._unused_kv_bytes(kv_tokens)
            frac = cap_memory_fraction(
                self.memory_cap_bytes, self._total_mem, self.cache.nbytes, kv_tokens, self.cache.bytes_per_token()
            )
            torch.cuda.set_per_process_memory_fraction(frac, self.device)
            _FRACTION_SET = True
            threshold = ALLOCATOR_MODES[self._allocator]["garbage_collection_threshold"]
            if threshold is not None:
                gc = round(capped_gc_threshold(threshold, self.memory_cap_bytes, unused, frac * self._total_mem), 3)
                if gc != self._gc_threshold:  # a settings call only when it moves (by 0.1% of the allowance)
                    apply_allocator(self._allocator, gc)
                    self._gc_threshold = gc

    def _need_bytes(self, batch: Batch) -> int:
        """Estimated bytes this batch needs: weights + KV in use after it + activations."""
        elem = self.cache.k.element_size()
        kv_tokens = self._kv_tokens_after(batch)
        transient = 0
        if batch.prefill:
            lmax = max(r.context_len for r in batch.prefill)
            kernel = self.effective_kernels["prefill"]
            transient = transient_bytes(self.cfg, len(batch.prefill), lmax, elem, kernel)
        if batch.decode:
            ctx = round_ctx(max(self.context_of(r.rid) for r in batch.decode) + 1, self.capacity.max_context)
            kernel = self.effective_kernels["decode"]
            transient = max(transient, transient_bytes(self.cfg, len(batch.decode), ctx, elem, kernel, decode=True))
        self._last_transient = transient
        return self.weight_bytes + kv_tokens * self.cache.bytes_per_token() + transient

    def _check_cap(self, batch: Batch) -> None:
        need = self._need_bytes(batch)
        if not self._cuda and self.memory_cap_bytes and need > self.memory_cap_bytes:
            raise _oom(f"out of memory (simulated cap): needs {need} bytes > cap {self.memory_cap_bytes}")

    def _prefill_requests(self, reqs: list[Request]) -> None:
        slots: list[int] = []
        for r in reqs:
            s = self._slot_of.get(r.rid)
            if s is None:
                s = len(self._rids)
                self._rids.append(r.rid)
                self._lens.append(0)
                self._slot_of[r.rid] = s
            slots.append(s)
        lengths = [r.context_len for r in reqs]
        self._run_prefill(slots, lengths)
        for s, n in zip(slots, lengths, strict=True):
            self._lens[s] = n

    def _run_prefill(self, slots: list[int], lengths: list[int]) -> None:
        dev = self.device
        tokens = torch.randint(
            self.cfg.vocab, (len(slots), max(lengths)), generator=self._tok_gen, device=dev, dtype=torch.long
        )
        slot_t = torch.tensor(slots, device=dev)
        ids = self.model.prefill(tokens, torch.tensor(lengths, device=dev), slot_t, self.cache)
        self._next_tok[slot_t] = ids

    def _decode_requests(self, reqs: list[Request]) -> None:
        n = len(reqs)
        self._arrange_front(reqs)
        self._run_decode(n, self._lens[:n])
        for s in range(n):
            self._lens[s] += 1

    def _run_decode(self, n: int, positions: list[int]) -> float | None:
        """One decode step over slots 0..n-1; returns the capture ms if a graph was captured."""
        if self._graphs_on and self._bucket(n) not in self._capture_failures:
            return self._decode_graph(n, positions)
        self._decode_eager(n, positions)
        return None

    def _decode_eager(self, n: int, positions: list[int]) -> None:
        ctx = round_ctx(max(positions) + 1, self.capacity.max_context)
        pos = torch.tensor(positions, device=self.device)
        ids = self.model.decode_step(self._next_tok[:n], pos, self.cache, ctx=ctx, write_slots=self._arange[:n])
        self._next_tok[:n] = ids

    def _bucket(self, n: int) -> int:
        return min(1 << max(0, (n - 1).bit_length()), self.capacity.max_slots)

    def _decode_graph(self, n: int, positions: list[int]) -> float | None:
        b = self._bucket(n)
        host = list(positions) + [0] * (b - n) + list(range(n)) + [self.scratch_slot] * (b - n)
        captured = None
        g = self._graphs.get(b)
        if g is None:
            got = self._capture(b, n, host)
            if got is None:  # the capture failed: this bucket decodes eagerly for now
                self._decode_eager(n, positions)
                return None
            g, captured = got
        else:
            g.io.copy_(torch.tensor(host, device=self.device).view(2, b))
            g.tokens[:n].copy_(self._next_tok[:n])
        g.graph.replay()
        self._next_tok[:n].copy_(g.out[:n])
        return captured

    def _side_stream(self) -> Any:
        """The executor's one side stream for warm-ups and captures, made at first use
        (every new stream gets a cuBLAS workspace of its own, kept for the process)."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(self, b: int, n: int, host: list[int]) -> tuple[_Graph, float] | None:
        """Capture the decode step for bucket `b` over the full max_context, with the mask.

        Warm-ups and capture run on the executor's side stream under its device (a capture
        begun on another device's stream would record nothing). If either runs out of
        memory, returns None: the current stream is put back if the capture left its own
        current, the partial graph is dropped, the cache emptied, and the
        bucket decodes eagerly (over a rounded span, not the full max_context the graph
        needs) until graphs are next dropped (a knob change) or memory is reclaimed, with
        the reason under not_applicable['cuda_graphs'] (and in the engine's report). Any
        other error is raised, the stream put back first. `graph_bytes` is what the capture
        adds to the reserved memory from an emptied cache: the graph's private pool included.
        """
        dev = self.device
        with torch.cuda.device(dev):
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            side = self._side_stream()
            main = torch.cuda.current_stream(dev)
            graph: Any = None
            out: Any = None  # the static output ids, in the graph's pool
            before = 0
            failed = ""
            try:
                io = torch.tensor(host, device=dev).view(2, b)
                tokens = torch.zeros(b, dtype=torch.long, device=dev)
                tokens[:n].copy_(self._next_tok[:n])
                ctx = self.capacity.max_context

                def step() -> torch.Tensor:
                    return self.model.decode_step(tokens, io[0], self.cache, ctx=ctx, write_slots=io[1])

                side.wait_stream(main)
                with torch.cuda.stream(side):  # warm-ups: rewrite the same K/V, so idempotent
                    for _ in range(2):
                        step()
                main.wait_stream(side)
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()  # the warm-ups' blocks: not the graph's
                before = torch.cuda.memory_reserved(dev)
                graph = torch.cuda.CUDAGraph()
                # a capture that fails leaves an empty graph, and torch warns of it on every try
                with warnings.catch_warnings(), torch.cuda.graph(graph, stream=side):
                    warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
                    out = step()
                    if self._injected("capture"):
                        raise _oom("out of memory (injected by inject_oom_next, where='capture')")
            except OOM_ERRORS as exc:
                failed = _first_line(exc)
            except RuntimeError as exc:
                # Not memory: a CUDA error or a step that cannot be captured is a bug to see,
                # not a condition to serve around (and torch may consider the capture still
                # underway). Put the stream back so the traceback is the only damage done
                # here, and mark the bucket failed so a caller that goes on does not capture
                # it again at every step.
                if torch.cuda.current_stream(dev).cuda_stream != main.cuda_stream:
                    torch.cuda.set_stream(main)
                self._capture_failures[b] = _first_line(exc)
                raise
            if failed:
                if torch.cuda.current_stream(dev).cuda_stream != main.cuda_stream:  # capture_end raised first
                    torch.cuda.set_stream(main)
                main.wait_stream(side)  # a failed warm-up's queued kernels finish before the eager step
                graph = out = None
                torch.cuda.empty_cache()
                self._capture_failures[b] = failed
                buckets = ", ".join(str(x) for x in sorted(self._capture_failures))
                self._graph_notes["cuda_graphs"] = (
                    f"capture failed for batch bucket(s) {buckets} (last: {failed}); "
                    "they decode eagerly until graphs are dropped or memory is reclaimed"
                )
                return None
            torch.cuda.synchronize(dev)
            ms = (time.perf_counter() - t0) * 1e3
            self.graph_bytes[b] = max(0, torch.cuda.memory_reserved(dev) - before)
        entry = _Graph(graph, tokens, io, out)
        self._graphs[b] = entry
        self.capture_ms[b] = ms
        self._pending["cuda_graphs"] = self._pending.get("cuda_graphs", 0.0) + ms
        return entry, ms

    def _arrange_front(self, reqs: list[Request]) -> None:
        """Make the decode set occupy slots 0..n-1 (a no-op when it is every running request)."""
        n = len(reqs)
        want = {r.rid for r in reqs}
        outside = [self._slot_of[r.rid] for r in reqs if self._slot_of[r.rid] >= n]
        if not outside:
            return
        free = [s for s in range(n) if self._rids[s] not in want]
        for a, b in zip(outside, free, strict=True):
            self._swap(a, b)

    def _swap(self, a: int, b: int) -> None:
        # Through the scratch slot: nothing allocated, so no OOM can leave K swapped and V
        # not. Only a graph's padding rows write that slot (in a capture's warm-ups and in
        # replays, after this step's swaps, in stream order), and nothing reads it back.
        self.cache.swap(a, b, max(self._lens[a], self._lens[b]), scratch=self.scratch_slot)
        nt = self._next_tok
        nt[a], nt[b] = nt[b].clone(), nt[a].clone()
        ra, rb = self._rids[a], self._rids[b]
        self._rids[a], self._rids[b] = rb, ra
        self._lens[a], self._lens[b] = self._lens[b], self._lens[a]
        self._slot_of[ra], self._slot_of[rb] = b, a

    def release(self, requests: list[Request]) -> None:
        """Free slots, moving the last occupied slot into each hole (one sequence copy)."""
        with torch.inference_mode():
            for r in requests:
                s = self._slot_of.pop(r.rid, None)
                if s is None:
                    continue
                last = len(self._rids) - 1
                if s != last:
                    self.cache.move(last, s, self._lens[last])
                    self._next_tok[s] = self._next_tok[last]
                    moved = self._rids[last]
                    self._rids[s] = moved
                    self._lens[s] = self._lens[last]
                    self._slot_of[moved] = s
                self._rids.pop()
                self._lens.pop()

    # -- calibration hooks ------------------------------------------------------------
    def time_prefill(self, batch: int, length: int) -> float:
        """ms of one prefill of `batch` random prompts of `length` tokens into slots 0..B-1.

        The same code path as `execute`; needs an executor with no running sequences.
        """
        self._check_bench(batch, length)
        self._apply_cap(batch * length)
        t0 = self._now()
        with torch.inference_mode():
            self._run_prefill(list(range(batch)), [length] * batch)
        return self._since(t0)

    def time_decode(self, batch: int, context: int) -> tuple[float, float | None]:
        """(ms, capture ms or None) of one decode step of `batch` sequences at `context`.

        Every row decodes at position context-1 (a static cache of `context` positions);
        with graphs on, the bucket's first call captures (capture time not in ms; None if
        the capture failed and the bucket decodes eagerly, see `capture_failures`).
        """
        self._check_bench(batch, context)
        self._apply_cap(batch * context)
        b = self._bucket(batch)
        captured: float | None = None
        with torch.inference_mode():
            if self._graphs_on and b not in self._graphs and b not in self._capture_failures:
                self._run_decode(batch, [context - 1] * batch)  # capture, untimed
                captured = self.capture_ms[b] if b in self._graphs else None  # None: it failed
            t0 = self._now()
            self._run_decode(batch, [context - 1] * batch)
            return self._since(t0), captured

    def reference_decode_ms(self, attention: str) -> float:
        """ms of the card probe's reference decode step (`engine.card`) with `attention`.

        bf16, CUDA graphs where the device has them; the median of three after a warm-up
        (and capture). Only an idle executor can be probed (the precision switch would
        recast running sequences' KV). Afterwards the knobs in force are back, the probe's
        graphs and cached blocks are freed, and its switch costs are not reported. Out of
        memory (a tight cap, or the switch to bf16 refused), the step is infinitely slow:
        the kernel reads as one that cannot run, and serving starts all the same. The
        restore diffs against the executor's own record of the knobs in force, so it undoes
        exactly what the probe's switch did.
        """
        b, c = reference_shape(self.capacity)
        self._check_bench(b, c)  # before any switch
        saved, pending = self._knobs, dict(self._pending)
        probe = saved.replace(attention=attention, precision="bf16", cuda_graphs=self._cuda, reclaim=False)
        try:
            self.apply_knobs(saved, probe)
            if self._knobs != probe:  # the switch to bf16 ran out of memory and was refused
                raise _oom(f"out of memory switching to the probe's knobs {probe}")
            self.time_decode(b, c)
            ms = sorted(self.time_decode(b, c)[0] for _ in range(3))[1]
        except OOM_ERRORS:
            ms = math.inf
        finally:
            self._drop_graphs()
            self.apply_knobs(probe, saved)
            if self._cuda:
                torch.cuda.empty_cache()
            self._pending = pending
        return ms

    def _check_bench(self, batch: int, length: int) -> None:
        if self._rids:
            raise RuntimeError("time_prefill/time_decode need an executor with no running sequences")
        if not 1 <= batch <= self.capacity.max_slots:
            raise ValueError(f"batch {batch} is outside [1, max_slots={self.capacity.max_slots}]")
        if not 1 <= length <= self.capacity.max_context:
            raise ValueError(f"length {length} is outside [1, max_context={self.capacity.max_context}]")

    # -- memory -----------------------------------------------------------------------
    def _full_stats(self) -> None:
        st = torch.cuda.memory_stats(self.device)
        self._last_full = {
            "reserved": int(st.get("reserved_bytes.all.current", 0)),
            "allocated": int(st.get("allocated_bytes.all.current", 0)),
            "fragmentation": int(st.get("inactive_split_bytes.all.current", 0)),
            "retries": int(st.get("num_alloc_retries", 0)),
            "ooms": int(st.get("num_ooms", 0)),
        }

    def memory(self, full: bool) -> MemoryReading:
        """CUDA: `mem_get_info` always (~9 us), `memory_stats` when `full` or when
        `full_stats_every` readings passed without one.

        used = device bytes in use minus those held outside this process's allocator at
        start (CUDA context, other processes) and minus the unused part of the preallocated
        KV cache: weights + KV in use + activations + the allocator's cached blocks, what a
        cap holds (`cap_memory_fraction`) and what the simulator's policy was trained on;
        capacity = memory_cap_bytes or the rest.
        CPU: used = weights + KV in use + the last batch's activation estimate (what the
        simulated cap is checked against); reserved = weights + the whole preallocated KV
        cache + activations; capacity = memory_cap_bytes or 2 x (weights + KV cache).
        """
        self._mem_calls += 1
        if self._cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            read_full = full or self._mem_calls >= self.full_stats_every
            if read_full:
                self._full_stats()
                self._mem_calls = 0
            lf = self._last_full
            unused_kv = self._unused_kv_bytes(sum(self._lens))
            return MemoryReading(
                used_bytes=max(0, total - free - self._outside - unused_kv),
                capacity_bytes=self.memory_cap_bytes or max(1, total - self._outside),
                reserved_bytes=lf["reserved"],
                allocated_bytes=lf["allocated"],
                fragmentation_bytes=lf["fragmentation"],
                retries=lf["retries"],
                ooms=max(lf["ooms"] - self._ooms_before, self._ooms),
                full=read_full,
            )
        weights = self.weight_bytes
        kv_used = sum(self._lens) * self.cache.bytes_per_token()
        used = weights + kv_used + self._last_transient
        return MemoryReading(
            used_bytes=used,
            capacity_bytes=self.memory_cap_bytes or 2 * (weights + self.cache.nbytes),
            reserved_bytes=weights + self.cache.nbytes + self._last_transient,
            allocated_bytes=used,
            fragmentation_bytes=0,
            retries=0,
            ooms=self._ooms,
            full=full,
        )

    # -- timing -----------------------------------------------------------------------
    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _since(self, t0: float) -> float:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) * 1e3
