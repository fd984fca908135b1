"""TorchExecutor: the Executor protocol on a real (tiny) transformer."""

from __future__ import annotations

import math

import pytest
import torch

from autoopt.engine.executor import Batch, MemoryReading
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request
from autoopt.engine.torch_executor import TorchExecutor

CUDA = torch.cuda.is_available()
FP32 = Knobs(precision="fp32", attention="math")


def reqs(lengths: list[int], start: int = 0, output_len: int = 8) -> list[Request]:
    return [Request(rid=start + i, arrival_s=0.0, prompt_len=n, output_len=output_len) for i, n in enumerate(lengths)]


def step(ex: TorchExecutor, prefill: list[Request], decode: list[Request]):
    """Execute and account like the scheduler: one token each on success."""
    res = ex.execute(Batch(list(prefill), list(decode)))
    if not res.oom:
        for r in [*prefill, *decode]:
            r.generated += 1
    return res


def kv_of(ex: TorchExecutor, rid: int) -> torch.Tensor:
    s, n = ex.slots[rid], ex.context_of(rid)
    return ex.cache.k[:, s, :, :n].float().clone()


def assert_compacted(ex: TorchExecutor) -> None:
    assert sorted(ex.slots.values()) == list(range(len(ex.slots)))


@pytest.fixture
def ex() -> TorchExecutor:
    return TorchExecutor("tiny", device="cpu", max_slots=8, seed=1, knobs=FP32)


def test_protocol_attributes(ex: TorchExecutor) -> None:
    assert ex.device_type == "cpu"
    assert ex.capacity.max_slots == 8 and ex.capacity.max_context == 512
    with pytest.raises(ValueError, match="max_context"):
        TorchExecutor("tiny", device="cpu", max_context=4096)
    with pytest.raises(ValueError, match="unknown model"):
        TorchExecutor("nope", device="cpu")


def test_knob_changes_are_reported_with_reasons(ex: TorchExecutor) -> None:
    new = Knobs(precision="bf16", attention="efficient", cuda_graphs=True, allocator="expandable", reclaim=True)
    rep = ex.apply_knobs(None, new)
    assert set(rep.changed) == {"precision", "attention", "cuda_graphs", "allocator", "reclaim"}
    assert "precision" in rep.cost_ms and "attention" in rep.cost_ms
    for knob in ("cuda_graphs", "allocator", "reclaim"):  # nothing acted, nothing charged
        assert knob not in rep.cost_ms
        assert knob in rep.not_applicable
    assert "CUDA" in rep.not_applicable["cuda_graphs"]
    assert "flash" in rep.not_applicable["attention"]  # the CPU runs flash instead
    assert ex.effective_kernels == {"prefill": "flash", "decode": "flash"}
    assert rep.ms == pytest.approx(sum(rep.cost_ms.values()))
    assert ex.knobs == new.replace(reclaim=False)
    again = ex.apply_knobs(new, new.replace(reclaim=False))
    assert again.changed == [] and again.cost_ms == {} and again.ms == 0.0
    assert "cuda_graphs" in again.not_applicable  # still reported while the knob is set


def test_precision_change_keeps_running_sequences_kv(ex: TorchExecutor) -> None:
    rs = reqs([7, 20, 33])
    step(ex, rs, [])
    step(ex, [], rs)
    before = {r.rid: kv_of(ex, r.rid) for r in rs}
    slots, toks = ex.slots, ex.last_tokens()
    rep = ex.apply_knobs(FP32, FP32.replace(precision="bf16"))
    assert rep.changed == ["precision"] and "precision" in rep.cost_ms
    assert ex.cache.k.dtype == torch.bfloat16 and ex.model.wte.weight.dtype == torch.bfloat16
    assert ex.slots == slots and ex.last_tokens() == toks
    for r in rs:
        assert torch.equal(kv_of(ex, r.rid), before[r.rid].to(torch.bfloat16).float())
    ctx = {r.rid: ex.context_of(r.rid) for r in rs}
    assert not step(ex, [], rs).oom
    assert all(ex.context_of(r.rid) == ctx[r.rid] + 1 for r in rs)


def test_compaction_does_not_change_other_sequences() -> None:
    """Two engines, same seed and prompts: one drops a middle sequence; the others' tokens agree."""
    a = TorchExecutor("tiny", device="cpu", max_slots=4, seed=5, knobs=FP32)
    b = TorchExecutor("tiny", device="cpu", max_slots=4, seed=5, knobs=FP32)
    ra, rb = reqs([12, 40, 25]), reqs([12, 40, 25])
    step(a, ra, [])
    step(b, rb, [])
    assert a.last_tokens() == b.last_tokens()
    b.release([rb[1]])
    assert b.slots == {0: 0, 2: 1}
    assert_compacted(b)
    for _ in range(4):
        step(a, [], ra)
        step(b, [], [rb[0], rb[2]])
        ta, tb = a.last_tokens(), b.last_tokens()
        assert (ta[0], ta[2]) == (tb[0], tb[2])
    assert b.context_of(2) == 25 + 4


def test_release_moves_last_slot_into_the_hole_and_is_idempotent(ex: TorchExecutor) -> None:
    rs = reqs([5, 6, 7, 8])
    step(ex, rs, [])
    kv3, tok3 = kv_of(ex, 3), ex.last_tokens()[3]
    ex.release([rs[1]])
    assert ex.slots == {0: 0, 3: 1, 2: 2}
    assert torch.equal(kv_of(ex, 3), kv3) and ex.last_tokens()[3] == tok3
    ex.release([rs[1], Request(99, 0.0, 3, 3)])  # no slot: nothing happens
    assert ex.slots == {0: 0, 3: 1, 2: 2}
    ex.release([rs[3], rs[0], rs[2]])
    assert ex.slots == {}


def test_decode_of_a_subset_moves_it_to_the_front(ex: TorchExecutor) -> None:
    rs = reqs([4, 9, 16, 25])
    step(ex, rs, [])
    kv3 = kv_of(ex, 3)
    step(ex, [], [rs[0], rs[3]])
    assert {ex.slots[0], ex.slots[3]} == {0, 1}
    assert_compacted(ex)
    assert ex.context_of(0) == 5 and ex.context_of(3) == 26
    assert ex.context_of(1) == 9 and ex.context_of(2) == 16
    assert torch.equal(kv_of(ex, 3)[:, :, :25], kv3)


def test_preempted_request_reprefills_its_generated_tokens(ex: TorchExecutor) -> None:
    r = Request(rid=1, arrival_s=0.0, prompt_len=10, output_len=9, generated=3)
    step(ex, [r], [])
    assert ex.context_of(1) == 13


def test_injected_oom_returns_without_raising_and_keeps_slots(ex: TorchExecutor) -> None:
    running = reqs([10, 11])
    step(ex, running, [])
    before = {r.rid: ex.context_of(r.rid) for r in running}
    newcomer = reqs([30], start=10)
    ex.inject_oom_next()
    res = ex.execute(Batch(newcomer, running))
    assert res.oom and "inject" in res.error
    assert 10 not in ex.slots  # no slot kept for the prefill of that batch
    assert {r.rid: ex.context_of(r.rid) for r in running} == before  # decode keeps its slots
    assert_compacted(ex)
    assert ex.memory(full=True).ooms == 1
    ok = step(ex, newcomer, running)
    assert not ok.oom and ex.context_of(10) == 30
    assert ex.context_of(0) == before[0] + 1
    ex.inject_oom_next(2)
    assert ex.execute(Batch([], running)).oom and ex.execute(Batch([], running)).oom
    assert not ex.execute(Batch([], running)).oom


def test_precision_switch_out_of_memory_is_refused_and_keeps_the_old_precision_whole(ex: TorchExecutor) -> None:
    """Out of memory once the new weights are built (before the KV is cast): nothing was
    assigned, so the executor serves on in fp32, and apply_knobs reports the refusal
    rather than raising out of the engine's set_knobs."""
    rs = reqs([7, 20, 33])
    step(ex, rs, [])
    step(ex, [], rs)
    kv, toks, capacity, wbytes = {r.rid: kv_of(ex, r.rid) for r in rs}, ex.last_tokens(), ex.capacity, ex.weight_bytes
    ex.inject_oom_next(where="precision")
    new = FP32.replace(precision="bf16", attention="flash", max_num_seqs=8)  # flash: half precision only
    rep = ex.apply_knobs(FP32, new)
    assert rep.not_applicable["precision"] == "out of memory casting to bf16, kept fp32"
    assert rep.not_applicable["attention"].startswith("kept 'math'")  # fp32 + flash is no valid config
    assert rep.changed == ["max_num_seqs"] and rep.cost_ms["precision"] >= 0.0
    assert ex.knobs == FP32.replace(max_num_seqs=8)
    assert {p.dtype for p in ex.model.parameters()} == {torch.float32}
    assert ex.cache.k.dtype == ex.cache.v.dtype == torch.float32
    assert ex.weight_bytes == wbytes and ex.capacity == capacity and ex.effective_kernels["decode"] == "math"
    assert ex.last_tokens() == toks and all(torch.equal(kv_of(ex, r.rid), kv[r.rid]) for r in rs)
    assert not step(ex, [], rs).oom
    ex.inject_oom_next(where="precision")  # a kernel that runs in fp32 is switched all the same
    rep = ex.apply_knobs(ex.knobs, ex.knobs.replace(precision="bf16", attention="efficient"))
    assert "precision" in rep.not_applicable and rep.changed == ["attention"]
    assert ex.knobs == FP32.replace(max_num_seqs=8, attention="efficient") and ex.cache.k.dtype == torch.float32
    rep = ex.apply_knobs(ex.knobs, ex.knobs.replace(precision="bf16"))  # no fault: it goes through
    assert rep.changed == ["precision"] and "precision" not in rep.not_applicable
    assert ex.cache.k.dtype == ex.cache.v.dtype == ex.model.wte.weight.dtype == torch.bfloat16
    assert not step(ex, [], rs).oom


def test_cap_memory_fraction_leaves_the_unused_kv_cache_out_of_the_cap() -> None:
    """gpt2-small in bf16 with 64 slots of 2048 positions (a 4.9 GB cache) on an 80 GiB card
    under a 2 GiB cap: the old fraction, cap/total, counted the whole preallocated cache
    against the cap and admitted nothing; the new one admits what the cap admits on the CPU
    and in the simulator (weights + KV in use + activations) and nothing more."""
    from autoopt.engine.torch_executor import cap_memory_fraction

    total, cap, weights, bpt = 80 << 30, 2 << 30, 250_000_000, 36_864
    cache = 65 * 2048 * bpt
    act = 150_000_000

    def allowed(kv_tokens: int) -> float:
        return cap_memory_fraction(cap, total, cache, kv_tokens, bpt) * total

    fits = 4 * 512  # four 512-token prompts: 75 MB of KV, well within the cap
    assert weights + fits * bpt + act <= cap < weights + cache
    assert allowed(fits) >= weights + cache + act  # the allocator holds the whole cache
    assert (cap / total) * total < weights + cache  # the old fraction: not even the idle executor fits
    assert allowed(fits) == pytest.approx(cap + cache - fits * bpt)
    too_many = (cap - weights - act) // bpt + 1_000  # over the cap, as the CPU's simulated cap says
    assert weights + too_many * bpt + act > cap and allowed(too_many) < weights + cache + act
    assert allowed(0) == pytest.approx(cap + cache)
    assert cap_memory_fraction(cap, total, cache, 10 * cache // bpt, bpt) == pytest.approx(cap / total)
    assert cap_memory_fraction(total, total, cache, 0, bpt) == 1.0  # at most the whole device
    assert type(cap_memory_fraction(cap, total, cache, 0, bpt)) is float  # torch refuses an int


def test_kv_swap_through_the_scratch_slot_matches_the_copying_swap() -> None:
    from autoopt.engine.model import KVCache

    def filled() -> KVCache:
        c = KVCache(2, 4, 2, 16, 4, torch.float32, "cpu")
        c.k.copy_(torch.arange(c.k.numel(), dtype=torch.float32).view_as(c.k))
        c.v.copy_(-c.k)
        return c

    a, b = filled(), filled()
    a.swap(0, 2, length=10)
    b.swap(0, 2, length=10, scratch=3)
    assert torch.equal(a.k[:, :3], b.k[:, :3]) and torch.equal(a.v[:, :3], b.v[:, :3])
    assert torch.equal(b.k[:, 0, :, :10], filled().k[:, 2, :, :10])
    with pytest.raises(ValueError, match="scratch"):
        b.swap(0, 3, scratch=3)


def test_simulated_memory_cap_on_cpu() -> None:
    probe = TorchExecutor("tiny", device="cpu", max_slots=8, knobs=FP32)
    cap = probe.weight_bytes + 300_000
    ex = TorchExecutor("tiny", device="cpu", max_slots=8, memory_cap_bytes=cap, knobs=FP32)
    small = reqs([16])
    assert not step(ex, small, []).oom
    big = reqs([256] * 4, start=1)  # ~1 MB of KV: over the cap
    res = ex.execute(Batch(big, small))
    assert res.oom and "simulated cap" in res.error
    assert set(ex.slots) == {0}
    mem = ex.memory(full=False)
    assert mem.capacity_bytes == cap and mem.ooms == 1


def test_memory_reading_cpu(ex: TorchExecutor) -> None:
    m0 = ex.memory(full=True)
    assert isinstance(m0, MemoryReading) and m0.full
    assert m0.capacity_bytes == 2 * (ex.weight_bytes + ex.cache.nbytes)
    assert m0.fragmentation_bytes == 0 and m0.retries == 0 and m0.ooms == 0
    step(ex, reqs([100, 200]), [])
    m1 = ex.memory(full=False)
    assert not m1.full
    assert m1.used_bytes >= ex.weight_bytes + 300 * ex.kv_bytes_per_token() > m0.used_bytes
    assert m1.reserved_bytes >= m1.used_bytes
    assert 0.0 < m1.headroom_frac < 1.0


def test_protocol_violations_are_clear_errors(ex: TorchExecutor) -> None:
    with pytest.raises(ValueError, match="holds no KV slot"):
        ex.execute(Batch([], reqs([5])))
    with pytest.raises(ValueError, match="KV slots"):
        ex.execute(Batch(reqs([5] * 9), []))
    with pytest.raises(ValueError, match="outside"):
        ex.execute(Batch(reqs([513]), []))
    assert ex.slots == {}
    assert ex.execute(Batch([], [])).ms == 0.0


def test_engine_serves_every_request_on_the_torch_executor() -> None:
    from autoopt.engine.engine import Engine

    ex = TorchExecutor("tiny", device="cpu", max_slots=4, knobs=FP32)
    rs = [Request(rid=i, arrival_s=0.001 * i, prompt_len=8 + 5 * i, output_len=3 + i % 4) for i in range(10)]
    eng = Engine(ex, rs, knobs=FP32.replace(max_num_seqs=4))
    eng.run(max_iterations=200)
    assert eng.scheduler.completed == 10 and eng.scheduler.balanced()
    assert ex.slots == {}


# -- CUDA only (run on a GPU machine) --------------------------------------------------
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
def test_cuda_graph_decode_matches_eager() -> None:
    knobs = Knobs(precision="fp32", attention="efficient")
    eager = TorchExecutor("tiny", device="cuda", max_slots=8, seed=2, knobs=knobs)
    graph = TorchExecutor("tiny", device="cuda", max_slots=8, seed=2, knobs=knobs)
    rep = graph.apply_knobs(knobs, knobs.replace(cuda_graphs=True))
    assert rep.changed == ["cuda_graphs"] and "cuda_graphs" not in rep.not_applicable
    re_, rg = reqs([9, 30, 17]), reqs([9, 30, 17])
    step(eager, re_, [])
    step(graph, rg, [])
    for i in range(5):
        step(eager, [], re_)
        step(graph, [], rg)
        assert eager.last_tokens() == graph.last_tokens()
        if i == 1:
            eager.release([re_[1]])
            graph.release([rg[1]])
            re_, rg = [re_[0], re_[2]], [rg[0], rg[2]]
    pending = graph.take_pending_switch_ms()
    assert pending["cuda_graphs"] > 0 and set(graph.capture_ms) == {2, 4}
    assert graph.take_pending_switch_ms() == {}
    rep = graph.apply_knobs(knobs.replace(cuda_graphs=True), knobs.replace(cuda_graphs=True, precision="bf16"))
    assert graph._graphs == {}  # invalidated by the precision change


@cuda_only
def test_cuda_flash_decode_kernel_is_reported() -> None:
    ex = TorchExecutor("tiny", device="cuda", max_slots=4, knobs=Knobs(precision="bf16", attention="math"))
    rep = ex.apply_knobs(None, Knobs(precision="bf16", attention="flash"))
    assert ex.effective_kernels["prefill"] == "flash"
    if ex.effective_kernels["decode"] != "flash":
        assert "attention.decode" in rep.not_applicable
        assert ex.effective_kernels["decode"] == "efficient"
    rs = reqs([20, 40])
    step(ex, rs, [])
    assert not step(ex, [], rs).oom


@cuda_only
def test_cuda_allocator_reclaim_memory_and_real_oom() -> None:
    from autoopt.engine.device import apply_allocator

    try:
        ex = TorchExecutor("tiny", device="cuda", max_slots=4, knobs=FP32)
        rep = ex.apply_knobs(None, FP32.replace(allocator="expandable", reclaim=True))
        assert "allocator" in rep.cost_ms and "reclaim" in rep.cost_ms
        assert "allocator" not in rep.not_applicable, rep.not_applicable
        rep = ex.apply_knobs(None, FP32.replace(allocator="split128"))
        assert "allocator" not in rep.not_applicable, rep.not_applicable
        m = ex.memory(full=True)
        assert m.full and m.allocated_bytes > 0 and m.reserved_bytes >= m.allocated_bytes
        assert 0 < m.used_bytes < m.capacity_bytes
    finally:  # the allocator's settings are process-wide: later tests get the default back
        apply_allocator("default")


@cuda_only
def test_cuda_real_oom_is_returned_not_raised() -> None:
    ex = TorchExecutor("gpt2-small", device="cuda", max_slots=4, knobs=FP32)
    running = reqs([64])
    step(ex, running, [])
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (256 << 20)) / total)
    try:
        res = ex.execute(Batch(reqs([2048] * 3, start=1), running))  # math attention: GBs of scores
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert res.oom and "memory" in res.error.lower()
    assert set(ex.slots) == {0} and ex.context_of(0) == 64  # the decode of that batch did not count
    assert ex.memory(full=True).ooms >= 1
    assert not step(ex, reqs([128], start=9), running).oom
    capped = TorchExecutor("tiny", device="cuda", max_slots=2, memory_cap_bytes=8 << 30)
    torch.cuda.set_per_process_memory_fraction(1.0)
    assert capped.memory(full=False).capacity_bytes == 8 << 30


@cuda_only
def test_cuda_memory_cap_below_weights_and_full_kv_cache_serves_within_the_cap() -> None:
    """The cap holds weights + KV in use + activations, as on the CPU and in the simulator:
    a cap below weights + the whole preallocated cache still serves (the old fraction,
    cap/total, OOMed every step once the cache was emptied, and a precision switch raised)."""
    cap = 2 << 30
    knobs = Knobs(precision="bf16", attention="efficient")
    ex = TorchExecutor("gpt2-small", device="cuda", max_slots=64, memory_cap_bytes=cap, knobs=knobs)
    try:
        assert ex.weight_bytes + ex.cache.nbytes > cap
        ex.apply_knobs(knobs, knobs.replace(reclaim=True))  # no leftover cached blocks to live on
        rs = reqs([512] * 4)
        assert not step(ex, rs, []).oom
        for _ in range(3):
            assert not step(ex, [], rs).oom
        rep = ex.apply_knobs(knobs, knobs.replace(precision="fp16"))  # the fp32 master goes to the card
        assert "precision" not in rep.not_applicable and ex.cache.k.dtype == torch.float16
        more = reqs([256] * 2, start=10)
        assert not step(ex, more, rs).oom
        assert not step(ex, [], [*rs, *more]).oom
        m = ex.memory(full=True)
        kv_in_use = sum(ex.context_of(r.rid) for r in [*rs, *more]) * ex.kv_bytes_per_token()
        assert m.capacity_bytes == cap
        assert ex.weight_bytes + kv_in_use <= m.used_bytes <= cap, (m.used_bytes, cap)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@cuda_only
def test_cuda_uncapped_executor_after_a_capped_one_is_not_held_to_its_cap() -> None:
    cap = 256 << 20
    capped = TorchExecutor("tiny", device="cuda", max_slots=2, memory_cap_bytes=cap, knobs=FP32)
    assert not step(capped, reqs([16]), []).oom  # its step set the fraction to its cap
    free = TorchExecutor("tiny", device="cuda", max_slots=2, knobs=FP32)
    big = torch.empty(cap + capped.cache.nbytes + (512 << 20), dtype=torch.uint8, device="cuda")
    del big
    assert not step(free, reqs([16]), []).oom
    assert free.memory(full=False).capacity_bytes > cap


@cuda_only
def test_cuda_graph_capture_failure_falls_back_to_eager() -> None:
    knobs = Knobs(precision="fp32", attention="efficient")
    eager = TorchExecutor("tiny", device="cuda", max_slots=8, seed=2, knobs=knobs)
    graph = TorchExecutor("tiny", device="cuda", max_slots=8, seed=2, knobs=knobs)
    graph.apply_knobs(knobs, knobs.replace(cuda_graphs=True))
    re_, rg = reqs([9, 30, 17]), reqs([9, 30, 17])
    step(eager, re_, [])
    step(graph, rg, [])
    default = torch.cuda.default_stream().cuda_stream
    graph.inject_oom_next(where="capture")
    for _ in range(3):  # the first step's capture fails; that bucket then decodes eagerly
        assert not step(graph, [], rg).oom
        step(eager, [], re_)
        assert eager.last_tokens() == graph.last_tokens()
        assert torch.cuda.current_stream().cuda_stream == default
    assert set(graph.capture_failures) == {4} and graph._graphs == {}
    assert "cuda_graphs" not in graph.take_pending_switch_ms()
    rep = graph.apply_knobs(graph.knobs, graph.knobs.replace(max_num_seqs=16))
    assert "bucket(s) 4" in rep.not_applicable["cuda_graphs"]
    rep = graph.apply_knobs(graph.knobs, graph.knobs.replace(reclaim=True))  # capture gets another try
    assert "cuda_graphs" not in rep.not_applicable and graph.capture_failures == {}
    assert not step(graph, [], rg).oom
    step(eager, [], re_)
    assert eager.last_tokens() == graph.last_tokens()
    assert set(graph._graphs) == {4}
    assert graph.graph_bytes[4] >= 1 << 20  # the graph's private pool: at least a fresh segment


def test_allocator_settings_strings() -> None:
    from autoopt.engine.device import allocator_settings_string

    assert allocator_settings_string("default") == "expandable_segments:False"
    assert allocator_settings_string("expandable") == "expandable_segments:True"
    assert (
        allocator_settings_string("gc08_split128")
        == "expandable_segments:False,max_split_size_mb:128,garbage_collection_threshold:0.8"
    )
    # under a cap the executor writes its own threshold; configs without one take none
    assert allocator_settings_string("gc08_split128", 0.941).endswith("garbage_collection_threshold:0.941")
    assert allocator_settings_string("split128", 0.941) == "expandable_segments:False,max_split_size_mb:128"


def test_capped_gc_threshold_collects_at_the_share_of_the_cap() -> None:
    """PyTorch collects once reserved > threshold x allowed, and under a cap the allowance
    and the reserved bytes both hold the unused KV cache: the written threshold must put
    the collection at 0.8 x the cap's own memory, not 0.8 x (cap + unused cache)."""
    from autoopt.engine.torch_executor import cap_memory_fraction, capped_gc_threshold

    gib = 1 << 30
    total, cache, per_token = 80 * gib, 5 * gib, 1 << 20  # 5,120 KV positions of 1 MiB
    cap, kv_tokens = 2 * gib, 1024
    unused = cache - kv_tokens * per_token
    allowed = cap_memory_fraction(cap, total, cache, kv_tokens, per_token) * total
    t = capped_gc_threshold(0.8, cap, unused, allowed)
    reserved_at_collection = t * allowed  # what the allocator compares with
    assert reserved_at_collection - unused == pytest.approx(0.8 * cap)  # in the cap's terms
    assert 0.8 < t < 1  # later than the config's own 0.8 of the allowance
    # no unused cache: the config's own threshold
    assert capped_gc_threshold(0.8, cap, 0, cap) == pytest.approx(0.8)
    # cap + unused cache past the device (the fraction clamped at 1): still 0.8 x the cap
    big = 78 * gib
    allowed = cap_memory_fraction(big, total, cache, kv_tokens, per_token) * total
    assert allowed == total
    assert capped_gc_threshold(0.8, big, unused, allowed) * allowed - unused == pytest.approx(0.8 * big)
    assert 0 < capped_gc_threshold(0.8, 100 * gib, 80 * gib, total) < 1  # kept inside (0, 1), as PyTorch asks


def test_cpu_malloc_is_pinned_so_activations_do_not_refault() -> None:
    """glibc's adaptive malloc made a prefill land on fresh pages or reused ones depending on
    the batches before it (2-20k page faults, +10-50 ms, on 2-4 prompts of 511 tokens after
    a big batch): the CPU executor pins its thresholds once per process."""
    import platform
    import resource

    from autoopt.engine.device import pin_cpu_malloc

    ex = TorchExecutor("tiny", "cpu", max_slots=24, knobs=Knobs(attention="math", precision="fp32"))
    assert ex.cpu_malloc is pin_cpu_malloc()  # once per process
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not ex.cpu_malloc["pinned"]:
        pytest.skip(f"malloc not pinned here: {ex.cpu_malloc}")
    rid = iter(range(10**6))

    def prefill(b: int, n: int) -> None:
        reqs = [Request(next(rid), 0.0, n, 1) for _ in range(b)]
        assert not ex.execute(Batch(reqs, [], b * n, 0)).oom
        ex.release(reqs[::-1])

    for b in (1, 2, 3, 4, 16, 4, 3):  # a big batch, then the small ones again
        prefill(b, 511 if b < 16 else 512)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for b in (3, 1, 4, 2) * 3:
        prefill(b, 511)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 12 * 500, f"{faults} page faults in 12 warm prefills"


def test_reference_decode_probe_times_each_kernel_and_restores_the_knobs() -> None:
    # under a memory cap the KV budget follows the precision: the probe runs bf16, so a
    # capacity left at its bf16 value would show
    ex = TorchExecutor("tiny", device="cpu", max_slots=8, seed=1, knobs=FP32, memory_cap_bytes=3 << 20)
    before, capacity = ex.knobs, ex.capacity
    ex._pending = {"cuda_graphs": 1.5}  # a capture cost not yet reported when the probe runs
    ms = {kernel: ex.reference_decode_ms(kernel) for kernel in ("flash", "math")}
    assert all(v > 0 for v in ms.values())
    assert ex.knobs == before and ex.capacity == capacity
    assert ex.take_pending_switch_ms() == {"cuda_graphs": 1.5}
    res = step(ex, reqs([5, 9]), [])
    assert not res.oom and set(ex.slots) == {0, 1}


def test_reference_decode_probe_with_the_switch_to_bf16_refused_reads_as_a_kernel_that_cannot_run(
    ex: TorchExecutor,
) -> None:
    """The probe's switch to bf16 out of memory: the probe cannot run (inf, not a timing of
    the fp32 executor's own kernel), and the restore leaves the knobs in force as they were."""
    ex.inject_oom_next(where="precision")
    assert ex.reference_decode_ms("flash") == math.inf
    assert ex.knobs == FP32 and ex.cache.k.dtype == torch.float32
    assert ex.take_pending_switch_ms() == {}
    assert 0 < ex.reference_decode_ms("flash") < math.inf  # no fault: the probe runs
    assert ex.knobs == FP32 and ex.cache.k.dtype == ex.model.wte.weight.dtype == torch.float32


def test_reference_decode_probe_refuses_an_executor_that_is_serving(ex: TorchExecutor) -> None:
    step(ex, reqs([5]), [])
    kv, tokens = kv_of(ex, 0), ex.last_tokens()
    with pytest.raises(RuntimeError, match="no running sequences"):
        ex.reference_decode_ms("flash")
    # refused before any switch: the running sequence's KV was not recast to bf16 and back
    assert ex.knobs == FP32 and set(ex.slots) == {0}
    assert torch.equal(kv_of(ex, 0), kv) and ex.last_tokens() == tokens


def test_reference_decode_probe_out_of_memory_reads_as_a_kernel_that_cannot_run(ex: TorchExecutor) -> None:
    """A tight cap can leave no room for the probe's batch: the engine still starts, the
    kernel is marked as one that cannot run, and the knobs are back as they were."""
    from autoopt.engine.device import OOM_ERRORS
    from autoopt.engine.engine import Engine
    from autoopt.engine.features import FEATURE_NAMES, ObservationBuilder

    real = ex.time_decode

    def out_of_memory_with_math(batch: int, context: int):
        if ex.knobs.attention == "math":
            raise OOM_ERRORS[0]("probe batch does not fit")
        return real(batch, context)

    ex.time_decode = out_of_memory_with_math  # the allocator's answer under a tight cap
    engine = Engine(ex, reqs([5, 9, 3]), FP32)
    assert engine.card["math"] == float("inf") and engine.card["flash"] > 0
    obs = ObservationBuilder().build(engine)
    assert obs[FEATURE_NAMES.index("card_decode_math")] == 1.0
    assert ex.knobs == FP32
    while engine.step() is not None:
        pass
    assert engine.counts()["completed"] == 3
