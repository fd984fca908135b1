"""The baselines answer the common call and behave as their papers describe."""

from __future__ import annotations

import numpy as np

from autoopt.agents.aimd import AIMDPolicy
from autoopt.agents.base import as_controller, default_policy
from autoopt.agents.best_static import search_best_static
from autoopt.agents.oracle import OraclePolicy, build_oracle
from autoopt.engine.knobs import Knobs
from autoopt.engine.telemetry import SLO
from autoopt.envs.scenario import Scenario, build_engine, run_scenario

SLO_ = SLO(0.5, 0.02)
SCENARIO = Scenario("azure-conv", load_scale=8.0, memory_cap_gib=3.0, start_s=120.0, duration_s=10.0)


def test_aimd_grows_while_batches_meet_the_slo_and_backs_off_when_they_miss():
    policy = AIMDPolicy(Knobs(max_num_seqs=8, cuda_graphs=True), interval_s=0.0)
    engine = build_engine(SCENARIO, SLO(0.5, 1.0), controller=as_controller(policy))  # lenient TPOT: no misses
    for _ in range(50):
        engine.step()
    assert policy.seqs > 8 and engine.knobs.max_num_seqs == policy.seqs
    shrinking = AIMDPolicy(Knobs(max_num_seqs=64, cuda_graphs=True), interval_s=0.0)
    strict = build_engine(SCENARIO, SLO(0.5, 1e-6), controller=as_controller(shrinking))  # every batch misses
    for _ in range(10):
        strict.step()
    assert shrinking.seqs < 64 * 0.9**5
    assert strict.knobs.cuda_graphs  # the other knobs stay at the base config


def test_best_static_beats_the_default_on_its_scenarios_and_is_cached(tmp_path):
    calls = []
    res = search_best_static([SCENARIO], SLO_, "cuda", max_passes=1, cache_dir=tmp_path, progress=calls.append)
    default = run_scenario(SCENARIO, SLO_, Knobs())["goodput_rps"]
    assert res.goodput_rps >= default
    assert res.goodput_rps == max(v for _, v in res.scores)
    assert len(res.scores) == len(calls) > 20
    again = search_best_static([SCENARIO], SLO_, "cuda", max_passes=1, cache_dir=tmp_path, progress=calls.append)
    assert again.knobs == res.knobs and len(calls) == len(res.scores)  # read from the cache, nothing re-run


def test_best_static_on_a_cpu_profile_only_picks_runnable_knobs(tmp_path):
    s = Scenario("poisson:rate=20,duration=20", profile="cpu-tiny", duration_s=8.0)
    res = search_best_static([s], SLO(2.0, 0.2), "cpu", max_passes=1, cache_dir=tmp_path)
    assert res.knobs.attention in ("flash", "math") and not res.knobs.cuda_graphs
    assert res.knobs.allocator == "default" and res.knobs.precision != "fp32_tf32"


def test_oracle_switches_at_window_boundaries_and_is_at_least_its_best_static():
    candidates = [Knobs(max_num_seqs=4), Knobs(max_num_seqs=256, max_batched_tokens=16384, cuda_graphs=True)]
    oracle = build_oracle(SCENARIO, SLO_, candidates, window_s=5.0)
    assert isinstance(oracle, OraclePolicy) and oracle.starts_s == [0.0, 5.0]
    engine = build_engine(SCENARIO, SLO_)
    engine.now_s = 6.0
    assert oracle.knobs(np.zeros(1), engine) == oracle.configs[1]
    got = run_scenario(SCENARIO, SLO_, controller=as_controller(oracle))["goodput_rps"]
    best_single = max(run_scenario(SCENARIO, SLO_, k)["goodput_rps"] for k in candidates)
    assert got >= 0.9 * best_single


def test_default_policy_is_the_engine_default():
    assert default_policy().knobs(np.zeros(1), build_engine(SCENARIO, SLO_)) == Knobs()
