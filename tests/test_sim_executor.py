"""The simulator executor: seeded determinism and noise, memory accounting, allocator OOMs,
graph captures, the decode-context bookkeeping that stands in for a scan of the batch, and
the scheduler it shares with the live engine (fed a live replay's times, it retraces it)."""

from __future__ import annotations

import json
import statistics

import pytest

from autoopt.calibration.profile import load_profile
from autoopt.calibration.sim_executor import SimExecutor
from autoopt.engine.engine import Engine
from autoopt.engine.executor import Batch, kv_token_budget
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request
from autoopt.engine.traces import load_trace

GIB = 1 << 30
H100 = "h100-gpt2-small"
CPU = "cpu-tiny"


def _replay(profile: str, *, seed: int = 0, noise: bool = False, cap_gib: float | None = None, **knobs) -> tuple:
    """A short Azure window through the engine: (report as JSON, per-iteration trail)."""
    ex = SimExecutor(
        profile, max_slots=256, seed=seed, noise=noise, memory_cap_bytes=int(cap_gib * GIB) if cap_gib else None
    )
    trace = load_trace("azure-conv").scaled(10).window(0, 30).clip(ex.capacity.max_context)
    engine = Engine(ex, trace.to_requests(), Knobs(**knobs) if knobs else None)
    trail: list[tuple] = []
    report = engine.run(
        until_s=60, on_step=lambda s: trail.append((s.now_s, s.ms, s.running, s.oom, s.memory.used_bytes))
    )
    return json.dumps(report, sort_keys=True), trail


@pytest.mark.parametrize(
    "profile, knobs",
    [
        (H100, {"cuda_graphs": True, "max_num_seqs": 64}),
        (H100, {"max_num_seqs": 256, "max_batched_tokens": 32768, "allocator": "default"}),
        (CPU, {"attention": "math", "precision": "fp32"}),
    ],
)
def test_same_seed_gives_the_same_replay(profile, knobs):
    cap = 2.0 if profile == H100 and "allocator" in knobs else None  # under pressure the allocator draws too
    first = _replay(profile, seed=3, noise=True, cap_gib=cap, **knobs)
    again = _replay(profile, seed=3, noise=True, cap_gib=cap, **knobs)
    assert first == again
    assert first[1] and any(step[1] > 0 for step in first[1])


def test_a_replay_does_not_depend_on_what_ran_before_it_in_the_process():
    """Executors of a profile share a latency memo: a lookup must not depend on which
    input reached it first, or the same seed gives different trajectories by run order."""
    from autoopt.calibration.sim_executor import cached_profile

    def fresh_memo():
        cached_profile(H100).latency()._sim_memo = {}

    fresh_memo()
    alone = _replay(H100, max_num_seqs=128, max_batched_tokens=8192)
    fresh_memo()
    for seqs, tokens in ((256, 32768), (32, 1024), (64, 16384)):  # other batch shapes fill the memo first
        _replay(H100, max_num_seqs=seqs, max_batched_tokens=tokens)
    after_others = _replay(H100, max_num_seqs=128, max_batched_tokens=8192)
    assert alone == after_others


def _decode_batches(n: int = 300) -> list[Batch]:
    reqs = [Request(i, 0.0, 100 + 10 * i, 1000) for i in range(8)]
    return [Batch([], reqs, 0, sum(r.context_len for r in reqs)) for _ in range(n)]


@pytest.mark.parametrize("profile", [H100, CPU])
def test_noise_changes_times_but_is_seeded(profile):
    def times(noise: bool, seed: int) -> list[float]:
        ex = SimExecutor(profile, seed=seed, noise=noise)
        return [ex.iteration_ms(b) for b in _decode_batches()]

    clean = times(False, 0)
    assert len(set(clean)) == 1  # the same batch costs the same without noise
    noisy = times(True, 1)
    assert noisy == times(True, 1)  # seeded
    assert noisy != times(True, 2)
    assert len(set(noisy)) > 10
    # noise widens the spread around the profile's time, it does not move it
    assert statistics.fmean(noisy) == pytest.approx(clean[0], rel=0.1)


def test_kv_budget_follows_the_memory_cap_and_the_precision():
    big = SimExecutor(H100)
    small = SimExecutor(H100, memory_cap_bytes=4 * GIB)
    mm = small.mem_model
    for ex in (big, small):
        expected = kv_token_budget(ex.capacity_bytes, mm.weight_bytes("bf16"), mm.kv_bytes_per_token("bf16"))
        assert ex.capacity.max_kv_tokens == expected
    assert small.capacity.max_kv_tokens < big.capacity.max_kv_tokens
    bf16 = small.capacity.max_kv_tokens
    small.apply_knobs(Knobs(), Knobs(precision="fp32", attention="efficient"))
    fp32 = small.capacity.max_kv_tokens
    assert fp32 == kv_token_budget(4 * GIB, mm.weight_bytes("fp32"), mm.kv_bytes_per_token("fp32"))
    assert 0 < fp32 < bf16 / 2  # twice the bytes per token, and heavier weights


def test_memory_reading_counts_weights_kv_and_activations():
    ex = SimExecutor(H100, memory_cap_bytes=8 * GIB)
    mm, w, kv = ex.mem_model, ex.mem_model.weight_bytes("bf16"), ex.mem_model.kv_bytes_per_token("bf16")
    a, b = Request(1, 0.0, 100, 10), Request(2, 0.0, 120, 10)
    assert not ex.execute(Batch([a, b], [], 220, 0)).oom
    prefill_act = mm.prefill_activation_bytes(2, 120, "bf16")
    assert ex.memory(full=True).used_bytes == w + 220 * kv + prefill_act
    for r in (a, b):
        r.generated = 1  # what the scheduler does after the prefill
    assert not ex.execute(Batch([], [a, b], 0, a.context_len + b.context_len)).oom
    # the two prompts, the token each prefill emitted, one decode token each
    assert ex.memory(full=True).used_bytes == w + 224 * kv + mm.decode_activation_bytes(2, "bf16")
    for r in (a, b):
        r.generated = 2
    ex.release([a, b])
    c = Request(3, 0.0, 50, 10)
    assert not ex.execute(Batch([c], [], 50, 0)).oom
    assert ex.memory(full=True).used_bytes == w + 50 * kv + mm.prefill_activation_bytes(1, 50, "bf16")


def test_a_tight_cap_ooms_more_with_the_default_allocator_than_with_expandable_segments():
    knobs = {"max_num_seqs": 128, "max_batched_tokens": 16384}
    for seed in (0, 1):
        default = json.loads(_replay(H100, seed=seed, cap_gib=2.0, allocator="default", **knobs)[0])
        expandable = json.loads(_replay(H100, seed=seed, cap_gib=2.0, allocator="expandable", **knobs)[0])
        assert default["ooms"] >= 10 > expandable["ooms"]
        for report in (default, expandable):  # nothing lost to the OOMs
            assert report["balanced"] and report["arrived"] == report["completed"] + report["rejected"]
    roomy = json.loads(_replay(H100, cap_gib=40.0, allocator="default", **knobs)[0])
    assert roomy["ooms"] == 0


def test_a_graph_capture_is_charged_once_per_batch_size_bucket():
    ex = SimExecutor(H100)
    ex.apply_knobs(None, Knobs(cuda_graphs=True))
    lat = ex.latency

    def decode(n: int) -> tuple[Batch, float]:
        reqs = [Request(i, 0.0, 300, 100) for i in range(n)]
        return Batch([], reqs, 0, 300 * n), 300.0

    def replay(bucket: int, c: float) -> float:
        return lat.decode_ms(bucket, c, "flash", "bf16", True)

    batch3, c = decode(3)  # bucket 4
    first, second = ex.iteration_ms(batch3), ex.iteration_ms(batch3)
    assert second == pytest.approx(replay(4, c), rel=0.05)
    assert first - second == pytest.approx(lat.capture_ms(4, c, "flash", "bf16"))
    assert ex.iteration_ms(decode(4)[0]) == pytest.approx(second)  # same bucket: no capture
    batch5, _ = decode(5)  # bucket 8: a new capture
    assert ex.iteration_ms(batch5) - ex.iteration_ms(batch5) == pytest.approx(lat.capture_ms(8, c, "flash", "bf16"))
    ex.apply_knobs(Knobs(cuda_graphs=True), Knobs(cuda_graphs=True, precision="fp16"))  # graphs are re-captured
    assert ex.iteration_ms(batch3) > ex.iteration_ms(batch3)
    ex.apply_knobs(Knobs(cuda_graphs=True, precision="fp16"), Knobs(cuda_graphs=False, precision="fp16"))
    assert ex.iteration_ms(batch3) == ex.iteration_ms(batch3)  # eager: nothing to capture


class _Checked(SimExecutor):
    """Checks, before every iteration, the longest-context bookkeeping against a scan."""

    checked = 0

    def execute(self, batch: Batch):
        if batch.decode:
            assert self._longest_held() == max(r.context_len for r in batch.decode)
            self.checked += 1
        return super().execute(batch)


@pytest.mark.parametrize("pressure", [False, True])
def test_the_longest_decode_context_is_tracked_without_a_scan(pressure):
    if pressure:  # OOMs, preemptions and re-prefills, on a profile told that decode pads
        profile = load_profile(H100)
        profile.provenance["decode_context"] = "longest"
        ex = _Checked(profile, max_slots=256, memory_cap_bytes=2 * GIB)
        knobs = Knobs(max_num_seqs=128, max_batched_tokens=16384)
        trace = load_trace("azure-conv").scaled(10).window(0, 20)
    else:
        ex = _Checked(CPU, max_slots=32)
        knobs = Knobs(attention="math", precision="fp32")
        trace = load_trace("poisson:rate=300,duration=3,prompt_median=100,output_median=60", seed=1)
    assert ex._pads_decode  # `autoopt calibrate` profiles say the engine pads decode to the longest context
    engine = Engine(ex, trace.clip(ex.capacity.max_context).to_requests(), knobs)
    report = engine.run()
    assert ex.checked > 100 and report["completed"] > 0 and report["balanced"]
    assert (report["ooms"] > 5) == pressure


def test_the_longest_context_prices_a_padded_decode():
    """A mixed-length decode batch costs what its longest row costs (TorchExecutor pads)."""
    ex = SimExecutor(CPU)
    ex.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    short = [Request(i, 0.0, 40, 100) for i in range(7)]
    long_ = Request(9, 0.0, 400, 100)
    mixed = ex.iteration_ms(Batch([], [*short, long_], 0, 7 * 40 + 400))
    uniform = ex.iteration_ms(Batch([], [Request(i, 0.0, 400, 100) for i in range(8)], 0, 8 * 400))
    assert mixed == uniform


def test_a_decode_step_in_or_after_a_prefill_iteration_costs_the_measured_cold_extra():
    ex = SimExecutor(CPU)
    ex.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    timing = ex.profile.provenance["timing"]
    assert timing["decode_after_prefill"] > 1.0  # calibrate measured it: caches are cold after a prefill
    by_prompt = dict(timing["decode_after_prefill_ms_by_prompt"])  # ms, by the prefill's size
    assert max(by_prompt) == ex.capacity.max_context - 1 and by_prompt[max(by_prompt)] > 0
    extra = ex._cold_ms(300)
    lo, hi = max(n for n in by_prompt if n <= 300), min(n for n in by_prompt if n >= 300)
    assert min(by_prompt[lo], by_prompt[hi]) <= extra <= max(by_prompt[lo], by_prompt[hi])
    running = [Request(i, 0.0, 200, 100) for i in range(4)]
    decode = Batch([], running, 0, 800)
    prefill = Batch([Request(9, 0.0, 300, 5)], [], 300, 0)
    warm = ex.iteration_ms(decode)
    assert ex.iteration_ms(decode) == warm  # a step after a step
    ex.iteration_ms(prefill)
    assert ex.iteration_ms(decode) == pytest.approx(warm + extra)  # right after the prefill
    assert ex.iteration_ms(decode) == warm
    mixed = ex.iteration_ms(Batch([Request(9, 0.0, 300, 5)], running, 300, 800))
    # the same prefill alone after the same iterations (a prefill's own time follows them:
    # prefill_history.py), on a fresh executor
    twin = SimExecutor(CPU)
    twin.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    for batch in (decode, decode, prefill, decode, decode):
        twin.iteration_ms(batch)
    assert mixed == pytest.approx(twin.iteration_ms(prefill) + warm + extra)


def test_the_cold_extra_follows_the_prefill_size_and_old_profiles_keep_their_factor():
    """A small prefill leaves the caches nearly as they were, a full-context one does not:
    calibrate measures the extra ms per prompt size. A profile without that table (older
    ones, the h100 profiles) multiplies by its one factor after any prefill."""
    prof = load_profile(CPU)
    timing = prof.provenance["timing"]
    timing["decode_after_prefill_ms_by_prompt"] = [[64, 0.0], [256, 0.1], [511, 0.3]]
    ex = SimExecutor(prof)
    assert [ex._cold_ms(n) for n in (0, 32, 64, 160, 256, 511, 1022)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.05, 0.1, 0.3, 0.3]
    )
    ex.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    running = [Request(i, 0.0, 200, 100) for i in range(4)]
    decode = Batch([], running, 0, 800)
    warm = ex.iteration_ms(decode)
    pairs = Batch([Request(8, 0.0, 128, 5), Request(9, 0.0, 256, 5)], [], 384, 0)  # padded: 2 x 256 tokens
    ex.iteration_ms(pairs)
    assert ex.iteration_ms(decode) == pytest.approx(warm + 0.3)
    del timing["decode_after_prefill_ms_by_prompt"]
    timing["decode_after_prefill"] = 1.3
    old = SimExecutor(prof)
    old.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    warm = old.iteration_ms(decode)
    old.iteration_ms(Batch([Request(9, 0.0, 16, 5)], [], 16, 0))
    assert old.iteration_ms(decode) == pytest.approx(warm * 1.3)
    h100 = SimExecutor(H100)  # loads; no per-size table there
    assert h100._cold_points is None


def test_time_scale_runs_the_card_slower_and_the_probe_sees_it():
    """time_scale=2 doubles every iteration and the card probe's reference step, on shared
    memos: the scaled executor runs first on an empty memo, so a scaled value it left there
    would reach the unscaled one after it, which must match one run on a fresh memo."""
    from autoopt.calibration.sim_executor import cached_profile

    latency = cached_profile(H100).latency()
    saved = getattr(latency, "_sim_memo", {})
    times: dict[float, list[tuple[float, float, float]]] = {}
    for scale in (2.0, 1.0, 1.0):
        if scale == 2.0 or len(times.get(1.0, [])) == 1:
            latency._sim_memo = {}  # the scaled run, and the control, start on an empty memo
        reqs = [Request(i, 0.0, 200 + 10 * i, 8) for i in range(4)]
        ex = SimExecutor(H100, max_slots=64, time_scale=scale)
        ex.apply_knobs(None, Knobs(cuda_graphs=False))
        prefill = ex.execute(Batch(reqs, [], sum(r.prompt_len for r in reqs), 0)).ms
        for r in reqs:
            r.generated = 1  # what the scheduler does after the prefill
        decode = ex.execute(Batch([], reqs, 0, sum(r.context_len for r in reqs))).ms
        times.setdefault(scale, []).append((prefill, decode, ex.reference_decode_ms("flash")))
    latency._sim_memo = saved
    (base, control), (slow,) = times[1.0], times[2.0]
    assert base == control
    assert all(abs(s - 2 * b) < 1e-9 for s, b in zip(slow, base, strict=True)) and base[0] > 0
    with pytest.raises(ValueError, match="time_scale"):
        SimExecutor(H100, time_scale=0.0)


def test_fed_the_live_iteration_times_the_simulator_retraces_the_live_replay():
    """The engine and the simulator share one scheduler and only execution differs: a
    simulator that takes each iteration's time from a live replay (real torch, the tiny
    model on the CPU) batches the same requests in the same order and serves every one at
    the same instants. So a sim-versus-live gap lies in the iterations' times alone."""
    from autoopt.engine.executor import StepResult
    from autoopt.engine.torch_executor import TorchExecutor

    def ids(batch: Batch) -> tuple:
        return tuple(r.rid for r in batch.prefill), tuple(r.rid for r in batch.decode)

    class Recording(TorchExecutor):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            self.trail: list[tuple] = []

        def execute(self, batch: Batch) -> StepResult:
            result = super().execute(batch)
            self.trail.append((ids(batch), result.ms, result.oom))
            return result

    class Retracing(SimExecutor):
        def __init__(self, times: list[float], *args, **kw) -> None:
            super().__init__(*args, **kw)
            self.times, self.trail = iter(times), []

        def execute(self, batch: Batch) -> StepResult:
            result = super().execute(batch)
            ms = next(self.times)
            self.trail.append((ids(batch), ms, result.oom))
            return StepResult(ms, result.oom, result.error)

    knobs = Knobs(attention="math", precision="fp32", max_num_seqs=8, max_batched_tokens=512)
    trace = load_trace("poisson:rate=150,duration=1,prompt_median=64,output_median=16", seed=5)  # a queue forms

    def serve(ex) -> tuple[list, dict]:
        requests = trace.clip(ex.capacity.max_context).to_requests()
        report = Engine(ex, requests, knobs).run(until_s=30)
        return [(r.rid, r.state, r.first_token_s, r.finish_s) for r in requests], report

    live = Recording("tiny", "cpu", max_slots=16, seed=0)
    live_served, live_report = serve(live)
    sim = Retracing([ms for _, ms, _ in live.trail], CPU, max_slots=16, max_context=live.capacity.max_context, seed=0)
    sim_served, sim_report = serve(sim)

    batches = [b for b, _, _ in live.trail]
    assert any(len(pre) > 1 for pre, _ in batches) and any(pre and dec for pre, dec in batches)  # queued, mixed
    assert live_report["completed"] == live_report["arrived"] > 100
    assert sim.trail == live.trail
    assert sim_served == live_served
    for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tokens_per_s", "goodput_rps"):
        assert sim_report[key] == live_report[key], key
