"""The simulator: an executor whose time and memory come from a calibrated profile.

It implements the same `Executor` protocol as the torch engine, so the engine's scheduler
and loop run unchanged on top of it. An iteration costs a prefill of the admitted
requests (padded to the longest, as the torch engine pads) plus one decode step of the
running set (over the longest context in it when the profile says the engine pads its
decode, as the torch engine does); memory is weights + the KV cache in use + the
iteration's transient activations, and the allocator model decides, per config and
headroom, whether the batch hits an OOM or an allocator retry.

Deterministic under its seed; run-to-run noise is optional and drawn from the same seeded
generator: the host's speed as the profile's noise probe measured it, stretches of slow
steps included (`host_noise.py`), or for profiles without a probe the spread measured
around each point's typical time, drawn independently per iteration.
"""

from __future__ import annotations

import heapq
import math
from functools import lru_cache

import numpy as np

from ..engine.card import reference_shape
from ..engine.executor import Batch, Capacity, MemoryReading, StepResult, SwitchReport, kv_token_budget
from ..engine.knobs import Knobs, not_applicable
from ..engine.request import Request
from .alloc_model import AllocatorState
from .host_noise import HostNoise, NoiseProcess
from .prefill_history import PrefillHistory, history_for_mode
from .profile import Profile, load_profile, profile_path

# Latency lookups are memoised on inputs rounded to this relative step (~3%): the model
# is smooth, and a dictionary hit costs far less than a prediction.
_LOG_STEP = 0.03
_KNOB_NAMES = tuple(Knobs().to_dict())


_LOADED: dict[tuple[str, int], Profile] = {}


def cached_profile(name_or_path: str) -> Profile:
    """A profile loaded (and its models fitted) once per process and file version: an
    environment resets thousands of times and must not refit the latency model each time."""
    path = profile_path(name_or_path).resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _LOADED:
        profile = load_profile(path)
        profile.latency()._sim_memo = {}  # latency lookups shared by every executor of this profile
        _LOADED[key] = profile
    return _LOADED[key]


# Knob settings repeat (a policy may ask for the same ones every step): cache what they imply.
@lru_cache(maxsize=4096)
def _without_reclaim(knobs: Knobs) -> Knobs:
    return knobs.replace(reclaim=False)


@lru_cache(maxsize=4096)
def _not_applicable(knobs: Knobs, device_type: str) -> dict[str, str]:
    return not_applicable(knobs, device_type)  # copied by the caller: the cached dict is shared


def _prefill_shape(prefill: list) -> tuple[int, int]:
    """(prompts, longest prompt): the torch engine pads a prefill batch to its longest."""
    n = len(prefill)
    return n, (max([r.context_len for r in prefill]) if n > 1 else prefill[0].context_len)


def _bucket(x: float) -> int:
    return int(round(math.log(max(x, 1.0)) / _LOG_STEP))


def _bucket_value(bucket: int) -> float:
    """The point a bucket stands for: every input in it gets the prediction made here, so a
    lookup never depends on which input reached the shared memo first (reproducibility)."""
    return math.exp(bucket * _LOG_STEP)


def _graph_bucket(b: int) -> int:
    return 1 << max(0, (b - 1).bit_length())


class SimExecutor:
    """A profile-driven stand-in for `TorchExecutor` (same protocol, no torch)."""

    def __init__(
        self,
        profile: Profile | str,
        *,
        max_slots: int = 256,
        max_context: int | None = None,
        memory_cap_bytes: int | None = None,
        seed: int = 0,
        noise: bool = False,
        time_scale: float = 1.0,
    ) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        if max_slots < 1:  # as the live executor: a run on no KV slots would still "complete"
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if memory_cap_bytes is not None and not memory_cap_bytes > 0:
            raise ValueError(f"memory_cap_bytes must be > 0 or None (no cap), got {memory_cap_bytes!r}")
        self.profile = cached_profile(profile) if isinstance(profile, str) else profile
        # every iteration (and the card probe's reference step) takes the profile's time x
        # this: a card that much slower (> 1) or faster (< 1) than the one calibrated, for
        # training a policy across card speeds and judging it on cards it has not seen
        self.time_scale = float(time_scale)
        self.device_type = self.profile.device["type"]
        self._cuda = self.device_type == "cuda"
        self.latency = self.profile.latency()
        self.mem_model = self.profile.memory()
        total = int(self.profile.device["total_mem_bytes"])
        self.capacity_bytes = int(memory_cap_bytes) if memory_cap_bytes else total
        self._max_slots = max_slots
        self._max_context = max_context or int(self.profile.model["max_context"])
        self.capacity = self._capacity("bf16")
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.knobs = Knobs()
        self._alloc: AllocatorState | None = None
        self._cache: dict[tuple, float] = getattr(self.latency, "_sim_memo", {})
        self._graph_buckets: set[int] = set()
        self._context_tokens = 0  # KV tokens held by running requests (mirrors the scheduler)
        # rid -> context minus iterations run, for every request holding KV: a running
        # request's context grows by one a step, so the longest context in the decode set is
        # the largest offset plus the iteration count (a lazy max-heap finds it).
        self._held: dict[int, int] = {}
        self._offsets: list[tuple[int, int]] = []  # (-offset, rid), stale entries popped lazily
        self._iterations = 0
        self._pending_ms = 0.0
        self._ooms = 0
        self._retries = 0
        self._reserved = 0
        self._frag = 0
        self._used = 0
        self._switch = self.profile.switch
        # How a decode step's cost follows the contexts of a mixed batch: "longest" (every row
        # padded to the longest, as TorchExecutor's decode does; what `autoopt calibrate`
        # measures) or "mean" (the KV read, e.g. paged attention; profiles that do not say).
        self._pads_decode = self.profile.provenance.get("decode_context", "mean") == "longest"
        # An eager decode step in (or right after) an iteration with a prefill runs on caches
        # the prefill filled. Profiles that measured the extra ms by the prefill's size
        # (decode_after_prefill_ms_by_prompt: [prompt tokens, ms] rows) add it, interpolated
        # in the prefill's padded tokens (0 ms at 0 tokens, flat beyond the largest); older
        # ones multiply by decode_after_prefill after any prefill (1 when they have none).
        timing = self.profile.provenance.get("timing") or {}
        self._cold_decode = float(timing.get("decode_after_prefill", 1.0))
        by_prompt = sorted((float(n), float(ms)) for n, ms in timing.get("decode_after_prefill_ms_by_prompt") or [])
        self._cold_points = [(0.0, 0.0), *by_prompt] if by_prompt else None
        self._cold_memo: dict[int, float] = {}
        # A prefill's row holds the condition it was timed in (after another shape and one
        # decode step); profiles that measured more (prefill_after) scale it by the last
        # prefill's shape and the decode-only iterations since (prefill_history.py).
        self._prefill_after = timing.get("prefill_after")
        self._histories: dict[tuple[str, str], PrefillHistory | None] = {}
        self._history: PrefillHistory | None = None  # this mode's, set by _set_mode
        self._last_prefill: tuple[int, int] | None = None
        self._since_prefill = 0  # decode-only iterations since the last prefill
        # noise=True: multipliers of mean 1 from the spread measured per kind of iteration
        # (equal-probability quantiles; a 2% lognormal for profiles without them). A profile
        # with a host-noise probe draws their ranks from its correlated process, advanced by
        # each iteration's own time (the virtual clock a replay runs on); older ones draw
        # them independently.
        host = timing.get("host_noise")
        self._host_noise = NoiseProcess(HostNoise.from_dict(host), self.rng) if noise and host else None
        self._last_ms = 0.0
        quantiles = timing.get("noise_quantiles") or {}
        self._noise_q = {kind: [float(q) for q in quantiles.get(kind) or []] for kind in ("prefill", "decode")}
        self._after_prefill = 0  # padded prompt tokens of the last iteration's prefill (0: none)
        self._act_memos: dict[str, dict[tuple[int, int], int]] = {}
        self._set_mode(self.knobs)

    def _capacity(self, precision: str) -> Capacity:
        mm = self.mem_model
        budget = kv_token_budget(self.capacity_bytes, mm.weight_bytes(precision), mm.kv_bytes_per_token(precision))
        return Capacity(self._max_slots, self._max_context, budget)

    def _set_mode(self, k: Knobs) -> None:
        """What the knobs mean on this device (the CPU runs 'flash' for CUDA-only kernels and
        fp32 for TF32), and the memory figures of that precision, looked up once."""
        self._mode = (k.attention, k.precision, k.cuda_graphs)
        cuda = self._cuda
        self._attention = k.attention if cuda or k.attention in ("flash", "math") else "flash"
        self._precision = k.precision if cuda or k.precision != "fp32_tf32" else "fp32"
        self._graphs = k.cuda_graphs and cuda
        # exact-input memos of this mode over the shared rounded-input one (an int key is
        # cheaper than rounding a log): prefill (B << 20 | L), decode (B << 20 | C)
        memo = self._cache
        self._pre_memo = memo.setdefault(("prefill-exact", self._attention, self._precision), {})
        self._dec_memo = memo.setdefault(("decode-exact", self._attention, self._precision, self._graphs), {})
        mm = self.mem_model
        self._weight_bytes = mm.weight_bytes(self._precision)
        self._kv_bytes = mm.kv_bytes_per_token(self._precision)
        # activation bytes of (prefill B, L) or (0, decode B), per precision
        self._act_memo = self._act_memos.setdefault(self._precision, {})
        # a switch of kernel or precision leaves the caches holding the other mode's buffers:
        # the next prefill follows no prefill of its own mode
        self._last_prefill = None
        if self._prefill_after:
            key = (self._attention, self._precision)
            if key not in self._histories:
                attention, precision = key

                def size(b: int, n: int) -> float:  # the prefill's working set, by this mode's kernel
                    return mm.prefill_activation_bytes(b, n, precision, attention) or b * n

                self._histories[key] = history_for_mode(self._prefill_after, attention, precision, size)
            self._history = self._histories[key]

    # -- knobs ------------------------------------------------------------------------
    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        report = SwitchReport(not_applicable=dict(_not_applicable(new, self.device_type)))
        sw = self._switch
        if old is None or old.precision != new.precision:
            if old is not None:
                report.cost_ms["precision"] = float(sw.get("precision_change_ms", 0.0))
            self._graph_buckets.clear()
            eff = new.precision if self.device_type == "cuda" or new.precision != "fp32_tf32" else "fp32"
            self.capacity = self._capacity(eff)
        if old is not None and old.attention != new.attention:
            report.cost_ms["attention"] = 0.0
            self._graph_buckets.clear()
        if old is not None and old.cuda_graphs != new.cuda_graphs:
            report.cost_ms["cuda_graphs"] = 0.0  # captures are charged when they happen
        if (old is None or old.allocator != new.allocator) and self.device_type == "cuda":
            if old is not None:
                report.cost_ms["allocator"] = float(sw.get("set_allocator_ms", 0.0))
            self._alloc = AllocatorState(self.profile.allocator_model(), new.allocator)
        if new.reclaim and self.device_type == "cuda":
            report.cost_ms["reclaim"] = float(sw.get("empty_cache_ms", 0.0))
            if self._alloc is not None:
                self._alloc.reclaim()
        if old is not None:
            report.changed = [k for k in _KNOB_NAMES if getattr(old, k) != getattr(new, k)]
        for name in report.not_applicable:
            report.cost_ms.pop(name, None)
        report.ms = sum(report.cost_ms.values())
        self.knobs = _without_reclaim(new) if new.reclaim else new
        if (new.attention, new.precision, new.cuda_graphs) != self._mode:
            self._set_mode(self.knobs)
        return report

    def reference_decode_ms(self, attention: str) -> float:
        """The profile's ms for the card probe's reference decode step (`engine.card`)."""
        b, c = reference_shape(self.capacity)
        key = ("reference", b, c, attention, self._cuda)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = float(self.latency.decode_ms(b, c, attention, "bf16", self._cuda))
        return ms * self.time_scale

    # -- execution --------------------------------------------------------------------
    def iteration_ms(
        self, batch: Batch, decode_context: int | None = None, prefill_shape: tuple[int, int] | None = None
    ) -> float:
        """The predicted time of one iteration (charging a graph capture the first time a
        batch-size bucket replays), without touching the memory state.

        `decode_context`: the longest context in `batch.decode`; found from the batch when
        not given (the executor knows it without a scan when it runs the batch itself).
        `prefill_shape`: (prompts, longest prompt) of `batch.prefill`, when already known.
        The time follows the iterations asked about before (a prefill's history, a decode
        step after a prefill): ask once per iteration, in order.
        """
        graphs = self._graphs
        ms = 0.0
        prefill = batch.prefill
        pre_tokens = 0
        if prefill:
            n_pre, l_max = prefill_shape if prefill_shape is not None else _prefill_shape(prefill)
            pre_tokens = n_pre * l_max
            ms = self._pre_memo.get(n_pre << 20 | l_max)
            if ms is None:
                ms = self._pre_memo[n_pre << 20 | l_max] = self._prefill_ms(n_pre, l_max)
            if self._history is not None:
                ms *= self._history.factor((n_pre, l_max), self._last_prefill, self._since_prefill)
            self._last_prefill, self._since_prefill = (n_pre, l_max), 0
        else:
            self._since_prefill += 1
        n_dec = len(batch.decode)
        if n_dec:
            b = _graph_bucket(n_dec) if graphs else n_dec
            if self._pads_decode:
                if decode_context is None:
                    decode_context = max([r.context_len for r in batch.decode])
                c = decode_context + 1  # positions attended: the longest context plus the new token
            else:
                c = batch.decode_context_tokens / n_dec
            if graphs and b not in self._graph_buckets:
                self._graph_buckets.add(b)
                ms += self.latency.capture_ms(b, c, self._attention, self._precision)
            if self._pads_decode:
                dec = self._dec_memo.get(b << 20 | c)
                if dec is None:
                    dec = self._dec_memo[b << 20 | c] = self._decode_ms(b, c)
            else:
                dec = self._decode_ms(b, c)
            if not graphs and (prefill or self._after_prefill):
                if self._cold_points is None:
                    dec *= self._cold_decode
                else:
                    dec += self._cold_ms(pre_tokens or self._after_prefill)
            ms += dec
        self._after_prefill = pre_tokens
        if self.time_scale != 1.0:
            ms *= self.time_scale
        if self.noise:
            qs = self._noise_q["prefill" if prefill else "decode"]
            if self._host_noise is not None:
                ms *= self._host_noise.multiplier(self._last_ms * 1e-3, qs)
                self._last_ms = ms
            elif qs:
                ms *= qs[int(self.rng.random() * len(qs))]
            else:
                ms *= float(self.rng.lognormal(0.0, 0.02))
        return ms

    def _cold_ms(self, tokens: int) -> float:
        """The extra ms of a decode step after a prefill of `tokens` (padded) prompt tokens."""
        ms = self._cold_memo.get(tokens)
        if ms is None:
            points = self._cold_points or [(0.0, 0.0)]
            ms = points[-1][1]
            for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
                if tokens <= x1:
                    ms = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
                    break
            self._cold_memo[tokens] = ms
        return ms

    def _longest_held(self) -> int:
        """The longest context among the requests holding KV (0 when none)."""
        heap, held = self._offsets, self._held
        while heap and held.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)
        return -heap[0][0] + self._iterations if heap else 0

    def execute(self, batch: Batch) -> StepResult:
        decode = batch.decode
        n_dec = len(decode)
        # The decode set is every request holding KV when the scheduler drives this executor.
        longest = self._longest_held() if n_dec and self._pads_decode and n_dec == len(self._held) else None
        shape = _prefill_shape(batch.prefill) if batch.prefill else (0, 0)
        ms = self._pending_ms + self.iteration_ms(batch, longest, shape)
        self._pending_ms = 0.0
        need, transient = self._need_bytes(batch, shape)
        self._used = need
        if need > self.capacity_bytes:
            return self._oom(ms)
        if self._alloc is not None:
            oom, retries, self._reserved, self._frag = self._alloc.advance(
                need, self.capacity_bytes, self.rng, transient
            )[:4]
            self._retries += retries
            if oom:
                return self._oom(ms)
        it = self._iterations
        for r in batch.prefill:
            offset = r.context_len - it
            self._held[r.rid] = offset
            if self._pads_decode:
                heapq.heappush(self._offsets, (-offset, r.rid))
            self._context_tokens += r.context_len + 1
        self._context_tokens += n_dec
        self._iterations = it + 1
        return StepResult(ms)

    def _oom(self, ms: float) -> StepResult:
        self._ooms += 1
        self._pending_ms += float(self._switch.get("empty_cache_ms", 0.0))
        return StepResult(ms=ms, oom=True, error="out of memory (simulated)")

    def _need_bytes(self, batch: Batch, prefill_shape: tuple[int, int]) -> tuple[int, int]:
        """Bytes the iteration needs at its peak, and the transient (activation) part."""
        memo = self._act_memo
        transient = 0
        n_pre, l_max = prefill_shape
        if n_pre:
            transient = memo.get((n_pre, l_max))
            if transient is None:
                act = self.mem_model.prefill_activation_bytes(n_pre, l_max, self._precision)
                transient = memo[(n_pre, l_max)] = act
        n_dec = len(batch.decode)
        if n_dec:
            act = memo.get((0, n_dec))
            if act is None:
                act = memo[(0, n_dec)] = self.mem_model.decode_activation_bytes(n_dec, self._precision)
            if act > transient:
                transient = act
        kv_tokens = self._context_tokens + batch.prefill_tokens + n_dec
        return int(self._weight_bytes + kv_tokens * self._kv_bytes + transient), int(transient)

    def _prefill_ms(self, b: int, length: int) -> float:
        attention, precision = self._attention, self._precision
        bucket = _bucket(length)
        key = (0, b, bucket, attention, precision)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = float(self.latency.prefill_ms(b, _bucket_value(bucket), attention, precision))
        return ms

    def _decode_ms(self, b: int, context: float) -> float:
        attention, precision, graphs = self._attention, self._precision, self._graphs
        bucket = _bucket(context)
        key = (1, b, bucket, attention, precision, graphs)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = float(
                self.latency.decode_ms(b, _bucket_value(bucket), attention, precision, graphs)
            )
        return ms

    # -- state ------------------------------------------------------------------------
    def release(self, requests: list[Request]) -> None:
        held = self._held
        for r in requests:
            if held.pop(r.rid, None) is not None:
                self._context_tokens -= r.context_len  # its prompt plus every token generated
        self._context_tokens = max(0, self._context_tokens)
        if not held:
            self._offsets.clear()

    def memory(self, full: bool) -> MemoryReading:
        used, reserved = self._used, self._reserved
        return MemoryReading(
            used if used > reserved else reserved,
            self.capacity_bytes,
            reserved,
            used,
            self._frag,
            self._retries,
            self._ooms,
            full,
        )
