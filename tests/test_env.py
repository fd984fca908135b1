"""InferenceTuning-v0: conformance, determinism, invariants, bad input, and a short PPO run."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoopt  # noqa: F401  (registers the id)
from autoopt.calibration.profile import ProfileError
from autoopt.engine.knobs import KnobError, Knobs
from autoopt.engine.request import Request
from autoopt.engine.traces import TraceError
from autoopt.envs import ENV_ID
from autoopt.envs.inference_tuning import InferenceTuningEnv

SIM = dict(load_scale=8.0, memory_cap_gib=2.0, episode_steps=64, window_s=60.0)
LIVE = dict(
    backend="live",
    model="tiny",
    device="cpu",
    trace="poisson:rate=20,duration=20",
    episode_steps=8,
    window_s=20.0,
    initial_knobs={"attention": "math", "precision": "fp32"},
)


def _balanced(info: dict) -> bool:
    c = info["counts"]
    return c["arrived"] == c["completed"] + c["queued"] + c["running"] + c["rejected"]


def test_registered_with_gymnasium():
    env = gym.make(ENV_ID, **SIM)
    assert isinstance(env.unwrapped, InferenceTuningEnv)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("kwargs", [SIM, LIVE], ids=["sim", "live"])
def test_gymnasium_and_sb3_checkers_pass(kwargs):
    # Gymnasium's checker replays a seed and demands identical observations: a live
    # episode timed by the stopwatch cannot give that, so it runs the real model on the
    # profile's clock there (everything but the clock live); SB3's checker runs it as is.
    det = {**kwargs, "live_clock": "profile", "profile": "cpu-tiny"} if kwargs.get("backend") == "live" else kwargs
    gym_check_env(InferenceTuningEnv(**det), skip_render_check=True)
    sb3_check_env(InferenceTuningEnv(**kwargs), warn=True)


def _rollout(seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    env = InferenceTuningEnv(**SIM, randomize={"load_scale": [2.0, 12.0], "memory_cap_gib": [1.0, 6.0]})
    obs, _ = env.reset(seed=seed)
    out_obs, out_rew = [obs], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out_obs.append(obs)
        out_rew.append(r)
        if term or trunc:
            break
    return np.array(out_obs), np.array(out_rew)


def test_same_seed_and_actions_give_the_same_trajectory():
    rng = np.random.default_rng(0)
    actions = np.stack([rng.integers(0, n, size=40) for n in InferenceTuningEnv().action_space.nvec], axis=1)
    o1, r1 = _rollout(3, actions)
    o2, r2 = _rollout(3, actions)
    o3, _ = _rollout(4, actions)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(o1, o3)  # another seed draws another scenario


_trace_specs = st.one_of(
    st.builds(lambda r, d: f"poisson:rate={r},duration={d}", st.integers(1, 80), st.integers(5, 60)),
    st.builds(
        lambda a, b, p: f"bursty:rate_on={a},rate_off={b},period={p},duration=60",
        st.integers(5, 80),
        st.integers(1, 5),
        st.integers(2, 30),
    ),
    st.builds(lambda a, b: f"ramp:start={a},end={b},duration=40", st.integers(1, 20), st.integers(1, 120)),
    st.just("azure-conv"),
    st.just("mooncake-conv"),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trace=_trace_specs,
    cap=st.one_of(st.none(), st.floats(0.5, 16.0)),
    scale=st.floats(0.5, 30.0),
    actions=st.lists(st.lists(st.integers(-2, 9), min_size=7, max_size=7), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_invariants_under_random_actions_and_traces(trace, cap, scale, actions, seed):
    env = InferenceTuningEnv(
        trace=trace, load_scale=scale, memory_cap_gib=cap, episode_steps=200, iterations_per_step=2, window_s=60.0
    )
    obs, info = env.reset(seed=seed)
    space = env.observation_space
    for a in actions:  # includes out-of-range indices: repaired and flagged, never raised
        obs, reward, term, trunc, info = env.step(np.array(a))
        assert space.contains(obs) and np.all(np.isfinite(obs))
        assert math.isfinite(reward)
        assert _balanced(info)
        if any(not 0 <= x < n for x, n in zip(a, space.shape and env.action_space.nvec, strict=True)):
            assert info["action_repairs"]
        if term or trunc:
            break


def test_invalid_action_is_repaired_and_flagged():
    env = InferenceTuningEnv(**SIM)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([2, 2, 0, 1, 3, 0, 0]))  # flash attention in fp32
    assert info["knobs"]["attention"] == "efficient" and info["action_repairs"]
    mask = env.action_masks()
    assert mask.dtype == bool and mask.shape == (int(env.action_space.nvec.sum()),)


def test_masks_follow_the_device_on_the_live_cpu_backend():
    env = InferenceTuningEnv(**LIVE)
    env.reset(seed=0)
    mask = env.action_masks()
    nvec = env.action_space.nvec
    graphs = mask[int(nvec[:3].sum()) : int(nvec[:4].sum())]
    assert graphs.tolist() == [True, False]
    _, _, _, _, info = env.step(np.array([1, 0, 1, 1, 3, 1, 1]))
    assert info["knobs"]["cuda_graphs"] is False and info["action_repairs"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"trace": "no-such-trace"}, TraceError, "no-such-trace"),
        ({"profile": "no-such-profile"}, ProfileError, "no-such-profile"),
        ({"initial_knobs": {"max_num_seqs": 0}}, KnobError, "max_num_seqs"),
        ({"initial_knobs": {"turbo": 1}}, KnobError, "turbo"),
        ({"backend": "quantum"}, ValueError, "backend"),
        ({"load_scale": float("nan")}, ValueError, "load_scale"),
        ({"randomize": {"load_scale": [3, 1]}}, ValueError, "load_scale"),
        ({"randomize": {"wind": [1, 2]}}, ValueError, "wind"),
        ({"reward_weights": {"speed": 1.0}}, ValueError, "speed"),
        ({"reward_weights": {"oom": float("nan")}}, ValueError, "reward_weights"),
    ],
)
def test_bad_input_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        InferenceTuningEnv(**kwargs)


def test_malformed_trace_file_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,12,-3\n")
    with pytest.raises(TraceError, match=r"bad.csv.*line 2"):
        InferenceTuningEnv(trace=str(bad))


def test_nan_telemetry_gives_a_finite_observation_and_a_flag():
    env = InferenceTuningEnv(**SIM)
    env.reset(seed=0)
    env.engine.telemetry.slo_avg = float("nan")  # a moving average poisoned by a NaN reading
    env.engine.telemetry.busy_frac = float("inf")
    obs, reward, _, _, info = env.step(env.action_space.sample())
    assert np.all(np.isfinite(obs)) and env.observation_space.contains(obs)
    assert info["nonfinite_obs"] >= 1 and math.isfinite(reward)


def test_reward_parts_sum_to_the_reward_and_episode_ends():
    env = InferenceTuningEnv(**{**SIM, "episode_steps": 30})
    env.reset(seed=1)
    action = np.array([5, 3, 0, 1, 0, 1, 0])
    for _ in range(30):
        _, reward, term, trunc, info = env.step(action)
        assert reward == pytest.approx(sum(info["reward_parts"].values()))
        if term or trunc:
            break
    assert trunc and not term


def test_reward_weights_scale_their_parts_only():
    """The same seed and actions under other weights: each part scales by its weight."""
    kwargs = {**SIM, "memory_cap_gib": 1.0, "load_scale": 24.0, "episode_steps": 40, "iterations_per_step": 16}
    base = InferenceTuningEnv(**kwargs)
    heavy = InferenceTuningEnv(**kwargs, reward_weights={"oom": 5.0, "goodput": 2.0})
    base.reset(seed=3)
    heavy.reset(seed=3)
    action = np.array([6, 5, 0, 0, 0, 0, 0])  # the largest batches under a tight cap: OOMs
    totals = {
        "base": dict.fromkeys(("goodput", "oom", "demand"), 0.0),
        "heavy": dict.fromkeys(("goodput", "oom", "demand"), 0.0),
    }
    for _ in range(40):
        for name, env in (("base", base), ("heavy", heavy)):
            _, reward, _, _, info = env.step(action)
            assert reward == pytest.approx(sum(info["reward_parts"].values()))
            for k in totals[name]:
                totals[name][k] += info["reward_parts"][k]
    assert totals["base"]["oom"] < 0, "the scenario should OOM"
    assert totals["heavy"]["oom"] == pytest.approx(10 * totals["base"]["oom"])  # 5.0 against the default 0.5
    assert totals["heavy"]["goodput"] == pytest.approx(2 * totals["base"]["goodput"])
    assert totals["heavy"]["demand"] == pytest.approx(totals["base"]["demand"])


def test_episode_terminates_when_the_window_is_served():
    env = InferenceTuningEnv(
        trace="poisson:rate=5,duration=10", window_s=10.0, episode_steps=100_000, iterations_per_step=16
    )
    env.reset(seed=0)
    action = np.array([4, 3, 0, 1, 0, 0, 0])
    for _ in range(100_000):
        _, _, term, trunc, info = env.step(action)
        if term or trunc:
            break
    assert term and info["counts"]["completed"] == info["counts"]["arrived"] > 0


def test_short_maskable_ppo_run_learns_without_error():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    venv = make_vec_env(ENV_ID, n_envs=2, seed=0, env_kwargs={"render_mode": None, **SIM})
    model = MaskablePPO("MlpPolicy", venv, n_steps=128, batch_size=128, n_epochs=2, seed=0, verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # no /tmp/SB3-* directory per run
    model.learn(total_timesteps=1024)
    assert model.num_timesteps >= 1024
    obs = venv.reset()
    masks = np.stack(venv.env_method("action_masks"))
    action, _ = model.predict(obs, action_masks=masks, deterministic=True)
    assert action.shape == (2, 7)


def test_random_initial_limits_are_seeded_and_within_bounds():
    from autoopt.engine.knob_space import LIMIT_BOUNDS

    env = InferenceTuningEnv(**SIM, randomize={"initial_limits": True})
    starts = []
    for seed in (0, 1, 2, 0):
        env.reset(seed=seed)
        starts.append((env.engine.knobs.max_num_seqs, env.engine.knobs.max_batched_tokens))
    assert starts[0] == starts[3] and len(set(starts[:3])) == 3
    for seqs, tokens in starts:
        assert LIMIT_BOUNDS["max_num_seqs"][0] <= seqs <= LIMIT_BOUNDS["max_num_seqs"][1]
        assert LIMIT_BOUNDS["max_batched_tokens"][0] <= tokens <= LIMIT_BOUNDS["max_batched_tokens"][1]
    env.reset(seed=0)
    assert (env.engine.knobs.max_num_seqs, env.engine.knobs.max_batched_tokens) == starts[0]
    fixed = InferenceTuningEnv(**SIM)
    fixed.reset(seed=0)
    assert fixed.engine.knobs.max_num_seqs == 32  # without it, the engine's defaults


def test_limit_moves_compound_from_the_limits_in_force():
    from autoopt.engine.knob_space import LIMIT_MOVES

    env = InferenceTuningEnv(**SIM, initial_knobs={"max_num_seqs": 40, "max_batched_tokens": 3000})
    env.reset(seed=0)
    up = np.array([LIMIT_MOVES.index(1.25), LIMIT_MOVES.index(0.8), 0, 0, 0, 0, 0])
    env.step(up)
    assert (env.engine.knobs.max_num_seqs, env.engine.knobs.max_batched_tokens) == (50, 2400)
    env.step(up)
    assert (env.engine.knobs.max_num_seqs, env.engine.knobs.max_batched_tokens) == (62, 1920)


def test_iteration_feature_tracks_the_engines_iteration_time():
    from autoopt.engine.features import FEATURE_NAMES

    i = FEATURE_NAMES.index("iteration_vs_tpot")
    env = InferenceTuningEnv(**SIM, slo_tpot_ms=20.0)
    env.reset(seed=0)
    ms = []
    for _ in range(8):
        obs, *_ = env.step(np.array([3, 3, 0, 0, 1, 0, 0]))
        ms.append(env.engine.last_iteration_ms)
    avg_ms = env.engine.telemetry.iteration_avg_s * 1e3
    assert 0.0 < avg_ms <= max(ms) * 1.01
    assert obs[i] == pytest.approx(math.log2(avg_ms / 20.0) / 4.0, abs=1e-5)


def test_time_based_steps_cover_equal_engine_time_whatever_the_batch():
    """With step_s every step moves the engine clock by step_s (to the iteration that crosses
    it), so a policy cannot shorten its steps, and with them the arrivals it answers for,
    by shrinking the batch; with a fixed iteration count a step lasts what its iterations do."""
    from autoopt.engine.knob_space import LIMIT_MOVES

    def run(step_s, move):
        env = InferenceTuningEnv(
            load_scale=20.0,
            memory_cap_gib=8.0,
            episode_steps=40,
            window_s=30.0,
            slo_tpot_ms=20.0,
            iterations_per_step=16,
            step_s=step_s,
        )
        env.reset(seed=0)
        spans, arrivals = [], 0
        for _ in range(40):
            t0 = env.engine.now_s
            _, _, _, _, info = env.step(np.array([LIMIT_MOVES.index(move), 3, 0, 0, 1, 0, 0]))
            spans.append(env.engine.now_s - t0)
            arrivals -= info["reward_parts"]["demand"]
        return np.array(spans), arrivals

    spans, _ = run(0.05, 0.5)
    assert (spans >= 0.05).all() and (spans < 0.05 + 0.02).all()
    small_t, small_arrivals = run(0.05, 0.5)  # batch limit driven to its floor
    big_t, big_arrivals = run(0.05, 2.0)  # and to its ceiling
    assert abs(small_t.sum() - big_t.sum()) < 0.05 * big_t.sum()
    assert abs(small_arrivals - big_arrivals) <= 0.1 * big_arrivals
    counted, _ = run(None, 0.5)  # by iteration count, a step lasts what 16 iterations last
    assert counted.std() > 0 and not (counted >= 0.05).all()


def test_card_features_tell_two_cards_apart_at_the_same_load():
    """Same trace, seed and knobs on the shared H100 profile and on the engine's own (2x
    slower decode): only the card features differ at reset, and they rank the kernels as
    each profile does (flash ahead of cuDNN on the first, behind it on the second)."""
    names = list(InferenceTuningEnv(**SIM).feature_names)
    card = [names.index(f"card_decode_{k}") for k in ("flash", "efficient", "math", "cudnn")]
    obs = {}
    for profile in ("h100-gpt2-small", "h100-gpt2-small-engine"):
        env = InferenceTuningEnv(**SIM, profile=profile, slo_tpot_ms=20)
        obs[profile], _ = env.reset(seed=3)
    fast, slow = obs["h100-gpt2-small"], obs["h100-gpt2-small-engine"]
    rest = [i for i in range(len(names)) if i not in card]
    np.testing.assert_array_equal(fast[rest], slow[rest])
    f = dict(zip(("flash", "efficient", "math", "cudnn"), fast[card], strict=True))
    s = dict(zip(("flash", "efficient", "math", "cudnn"), slow[card], strict=True))
    assert f["flash"] < f["cudnn"] and s["cudnn"] < s["flash"]
    assert s["flash"] > f["flash"]  # the slower card's step is longer against the same SLO


def test_card_features_on_the_live_cpu_engine_mark_cuda_only_kernels():
    env = InferenceTuningEnv(**LIVE)
    obs, _ = env.reset(seed=0)
    names = list(env.feature_names)
    card = env.engine.card
    assert card["efficient"] is None and card["cudnn"] is None
    assert card["flash"] > 0 and card["math"] > 0
    assert obs[names.index("card_decode_cudnn")] == 1.0
    assert -1.0 <= obs[names.index("card_decode_math")] < 1.0


def test_a_nan_card_reading_is_neutral_and_counted():
    env = InferenceTuningEnv(**SIM)
    env.reset(seed=0)
    env.engine.card = {**env.engine.card, "math": float("nan")}
    obs, _, _, _, info = env.step(env.action_space.sample())
    assert obs[list(env.feature_names).index("card_decode_math")] == 0.0
    assert info["nonfinite_obs"] == 1 and env.observation_space.contains(obs)
    # counted at every observation, not once: the guard falls back while it lasts
    _, _, _, _, info = env.step(env.action_space.sample())
    assert info["nonfinite_obs"] == 2


def test_an_engine_built_without_the_card_probe_skips_it_and_refuses_to_be_observed():
    """A fixed-knob replay does not time the card; reading its observation is an error, not
    a made-up card (every kernel would read as one the device cannot run)."""
    from autoopt.calibration.sim_executor import SimExecutor
    from autoopt.engine.engine import Engine, EngineConfig
    from autoopt.engine.features import ObservationBuilder

    class CountingSim(SimExecutor):
        probes = 0

        def reference_decode_ms(self, attention: str) -> float:
            CountingSim.probes += 1
            return super().reference_decode_ms(attention)

    requests = [Request(rid=i, arrival_s=0.01 * i, prompt_len=64, output_len=8) for i in range(20)]
    probed = Engine(CountingSim("cpu-tiny", max_slots=64), requests, Knobs(attention="math", precision="fp32"))
    assert CountingSim.probes > 0 and probed.card["math"] > 0
    CountingSim.probes = 0
    engine = Engine(
        CountingSim("cpu-tiny", max_slots=64),
        requests,
        Knobs(attention="math", precision="fp32"),
        EngineConfig(probe_card=False),
    )
    assert CountingSim.probes == 0 and engine.card is None
    report = engine.run()
    assert report["completed"] == len(requests)
    with pytest.raises(RuntimeError, match="probe_card"):
        ObservationBuilder().build(engine)


def test_a_randomized_card_speed_is_drawn_in_range_reproducibly_and_slows_the_engine():
    from autoopt.envs.scenario import Scenario, build_executor

    env = InferenceTuningEnv(**SIM, randomize={"time_scale": [0.5, 2.0]})
    draws, calibrated = [], set()
    for seed in range(8):
        env.reset(seed=seed)
        draws.append(env.scenario.time_scale)
        # the card probe reads the slower card: its reference step over the draw is the profile's
        calibrated.add(round(env.engine.card["flash"] / env.scenario.time_scale, 9))
        assert abs(env.scenario.load_scale * env.scenario.time_scale - SIM["load_scale"]) < 1e-9  # its own knee
    assert all(0.5 <= x <= 2.0 for x in draws) and min(draws) < 0.9 and max(draws) > 1.1
    assert len(calibrated) == 1
    env.reset(seed=3)
    assert env.scenario.time_scale == draws[3]  # the same seed, the same card
    # the card as calibrated keeps the scenario's dict (and the caches keyed on it) as before
    s = Scenario("azure-conv", 10.0, 4.0)
    assert "time_scale" not in s.to_dict() and Scenario("azure-conv", time_scale=2.0).to_dict()["time_scale"] == 2.0
    with pytest.raises(ValueError, match="simulator only"):
        build_executor(Scenario("azure-conv", time_scale=2.0), "live")
    with pytest.raises(ValueError, match="time_scale"):
        InferenceTuningEnv(**SIM, randomize={"time_scale": [0.0, 2.0]})
    with pytest.raises(ValueError, match="simulator only"):
        InferenceTuningEnv(**LIVE, randomize={"time_scale": [0.5, 2.0]})
