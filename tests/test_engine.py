"""The live engine (tiny model, CPU): no request lost, OOM recovery, both clocks, the replay CLI."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from autoopt.calibration.profile_clock import ProfileClockExecutor
from autoopt.calibration.sim_executor import SimExecutor
from autoopt.cli import main
from autoopt.engine.engine import Engine, EngineConfig
from autoopt.engine.executor import StepResult
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request, RequestState
from autoopt.engine.telemetry import SLO
from autoopt.engine.torch_executor import TorchExecutor
from autoopt.engine.traces import load_trace

CPU_KNOBS = Knobs(attention="math", precision="fp32", max_num_seqs=16)


def _requests(n: int, gap_s: float = 0.05, prompt: int = 24, output: int = 6) -> list[Request]:
    return [Request(rid=i, arrival_s=i * gap_s, prompt_len=prompt + i % 7, output_len=output + i % 5) for i in range(n)]


def _run_checking_balance(engine: Engine) -> dict:
    def check(_stats):
        c = engine.counts()
        assert c["arrived"] == c["completed"] + c["queued"] + c["running"] + c["rejected"]

    return engine.run(on_step=check)


@pytest.fixture(scope="module")
def executor_factory():
    def make(**kw):
        return TorchExecutor("tiny", device="cpu", max_slots=16, seed=0, **kw)

    return make


def test_every_request_completes_and_the_count_balances(executor_factory):
    engine = Engine(executor_factory(), _requests(30), CPU_KNOBS)
    report = _run_checking_balance(engine)
    assert report["completed"] == report["arrived"] == 30
    assert report["queued"] == report["running"] == report["rejected"] == 0
    for r in engine.requests:
        assert r.state == RequestState.DONE and r.generated == r.output_len
        assert r.arrival_s <= r.first_token_s <= r.finish_s


def test_injected_ooms_lose_nothing(executor_factory):
    ex = executor_factory()
    engine = Engine(ex, _requests(20, gap_s=0.0), CPU_KNOBS)
    engine.step()
    ex.inject_oom_next(3)
    report = _run_checking_balance(engine)
    assert report["ooms"] == 3
    assert report["completed"] == 20 and report["rejected"] == 0


def test_persistent_oom_rejects_with_a_reason_and_still_balances(executor_factory):
    ex = executor_factory()
    engine = Engine(ex, _requests(6, gap_s=0.0), CPU_KNOBS, EngineConfig(max_tries=2))
    ex.inject_oom_next(1000)
    report = _run_checking_balance(engine)
    assert report["rejected"] == 6 and report["completed"] == 0
    assert all("out of memory" in r.reject_reason for r in engine.requests)


def test_memory_cap_causes_real_ooms_that_recover(executor_factory):
    weights = executor_factory(knobs=CPU_KNOBS).weight_bytes
    # The KV budget holds every request, but a 16-prompt prefill's activations (math
    # attention materialises B x H x L x L scores) do not fit: OOM, back off, recover.
    ex = executor_factory(memory_cap_bytes=weights + 6_000_000, knobs=CPU_KNOBS)
    engine = Engine(ex, _requests(24, gap_s=0.0, prompt=200, output=8), CPU_KNOBS.replace(max_num_seqs=16))
    report = _run_checking_balance(engine)
    assert report["ooms"] > 0
    assert report["completed"] > 0 and report["completed"] + report["rejected"] == 24


def test_virtual_clock_skips_idle_time(executor_factory):
    reqs = [Request(rid=i, arrival_s=i * 100.0, prompt_len=16, output_len=4) for i in range(5)]
    engine = Engine(executor_factory(), reqs, CPU_KNOBS)
    t0 = time.perf_counter()
    report = engine.run()
    assert time.perf_counter() - t0 < 60  # 400 s of trace, only the busy time is paid
    assert engine.now_s >= 400.0 and report["completed"] == 5
    # Each request starts when it arrives, not earlier: the clock follows the trace.
    assert all(r.first_token_s >= r.arrival_s for r in engine.requests)
    assert report["ttft_p99_ms"] < 1000


def test_realtime_clock_waits_for_arrivals(executor_factory):
    reqs = [Request(rid=i, arrival_s=0.2 * i, prompt_len=16, output_len=2) for i in range(4)]
    engine = Engine(executor_factory(), reqs, CPU_KNOBS, EngineConfig(clock="realtime"))
    t0 = time.perf_counter()
    report = engine.run()
    assert time.perf_counter() - t0 >= 0.6 and report["completed"] == 4


def test_slo_attainment_counts_both_targets(executor_factory):
    engine = Engine(executor_factory(), _requests(10), CPU_KNOBS, EngineConfig(slo=SLO(ttft_s=1e-9, tpot_s=10.0)))
    report = engine.run()
    assert report["completed"] == 10 and report["met_slo"] == 0 and report["goodput_rps"] == 0


def test_replay_cli_on_the_shipped_azure_trace(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(
        [
            "replay",
            "--trace",
            "azure-conv",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--duration",
            "20",
            "--speedup",
            "1",
            "--slo-ttft-ms",
            "2000",
            "--slo-tpot-ms",
            "200",
            "--report",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["arrived"] == report["completed"] + report["queued"] + report["running"] + report["rejected"]
    assert report["arrived"] == len(load_trace("azure-conv").window(0, 20))
    assert report["goodput_rps"] > 0
    # probed with fixed knobs too (a warm-up alike for static and policy replays): the CPU
    # runs math, not the CUDA-only kernels
    assert report["card_ms"]["math"] > 0 and report["card_ms"]["cudnn"] is None
    for key in (
        "goodput_rps",
        "slo_attainment",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "tokens_per_s",
        "ooms",
        "rejected",
        "knobs",
    ):
        assert key in report
    assert "goodput" in capsys.readouterr().out


def _sim() -> SimExecutor:
    return SimExecutor("cpu-tiny", max_slots=16, seed=0)


def test_arrivals_the_last_iteration_passed_are_queued_not_dropped():
    # A 500-token prefill takes ~10 ms: the run stops after it, with the clock past the
    # other nine arrivals (1 ms apart). They must be in the report, as queued.
    reqs = [Request(rid=i, arrival_s=i * 1e-3, prompt_len=500, output_len=4) for i in range(10)]
    reqs.append(Request(rid=10, arrival_s=5.0, prompt_len=20, output_len=4))  # after the end
    report = Engine(_sim(), reqs, CPU_KNOBS.replace(max_num_seqs=1)).run(until_s=1e-4)
    assert report["iterations"] == 1
    assert report["arrived"] == 10 and report["running"] == 1 and report["queued"] == 9
    assert report["requests"] == 11 and report["not_arrived"] == 1 and report["lost"] == 0


class _BadTimeExecutor(SimExecutor):
    """The simulator, reporting `bad_ms` as the time of its `at`-th iteration (a broken timer)."""

    def __init__(self, bad_ms: float, at: int = 3) -> None:
        super().__init__("cpu-tiny", max_slots=16, seed=0)
        self.bad_ms, self.at, self.n = bad_ms, at, 0

    def execute(self, batch):
        result = super().execute(batch)
        self.n += 1
        return result if self.n != self.at else StepResult(ms=self.bad_ms)


@pytest.mark.parametrize("bad_ms", [math.nan, math.inf, -5.0])
def test_a_non_finite_or_negative_iteration_time_is_an_error_not_a_stalled_clock(bad_ms):
    engine = Engine(_BadTimeExecutor(bad_ms), _requests(20), CPU_KNOBS)
    with pytest.raises(ValueError, match="iteration time"):
        engine.run(until_s=60.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"arrival_s": math.nan}, "arrival_s"),
        ({"arrival_s": math.inf}, "arrival_s"),
        ({"arrival_s": -1.0}, "arrival_s"),
        ({"prompt_len": 10.5}, "prompt_len"),
        ({"output_len": 0}, "output_len"),
        ({"rid": 0}, "twice"),
    ],
)
def test_requests_the_loop_cannot_serve_are_refused(bad, match):
    reqs = _requests(3)
    last = reqs[-1]
    reqs[-1] = Request(**{"rid": last.rid, "arrival_s": 1.0, "prompt_len": 8, "output_len": 2, **bad})
    with pytest.raises(ValueError, match=match):
        Engine(_sim(), reqs, CPU_KNOBS)


@pytest.mark.parametrize("on_profile_clock", [False, True])
def test_a_refused_precision_switch_leaves_the_engine_reporting_what_runs(executor_factory, on_profile_clock):
    ex = executor_factory()
    wrapped = ProfileClockExecutor(ex, "cpu-tiny") if on_profile_clock else ex  # as the live env runs it
    engine = Engine(wrapped, _requests(5), CPU_KNOBS)  # fp32
    ex.inject_oom_next(where="precision")  # the cast runs out of memory, as on a full card
    report = engine.set_knobs(CPU_KNOBS.replace(precision="bf16", max_num_seqs=8))
    assert "precision" in report.not_applicable and "precision" not in report.changed
    assert engine.knobs.precision == "fp32" and engine.knobs.max_num_seqs == 8  # the rest applied
    assert ex.cache.dtype == torch.float32
    if on_profile_clock:  # the clock predicts the precision that runs, and charged no cast
        assert wrapped.timer.knobs.precision == "fp32" and "precision" not in report.cost_ms
    done = _run_checking_balance(engine)
    assert done["completed"] == 5


def test_numpy_integer_lengths_are_served_and_a_report_mid_run_loses_nothing():
    reqs = [Request(rid=i, arrival_s=i * 1e-3, prompt_len=np.int64(500), output_len=np.int32(4)) for i in range(10)]
    engine = Engine(_sim(), reqs, CPU_KNOBS.replace(max_num_seqs=1))
    engine.step()  # ~10 ms: the clock passes the other arrivals, which no step has taken up yet
    report = engine.report()
    assert report["arrived"] == 10 and report["lost"] == 0 and report["not_arrived"] == 0
