"""The AIMD teacher and the behaviour-cloning kick-start that PPO starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoopt.agents.aimd import AIMDTeacher
from autoopt.agents.learned import LearnedPolicy
from autoopt.engine.features import FEATURE_NAMES
from autoopt.engine.knob_space import KNOB_NAMES, LIMIT_MOVES, action_mask, knobs_to_action
from autoopt.engine.knobs import Knobs
from autoopt.engine.telemetry import SLO
from autoopt.envs.scenario import Scenario
from autoopt.training.evaluate import run_policy
from autoopt.training.kickstart import ProfileTeachers, collect, discounted_returns, kickstart
from autoopt.training.train import make_env

BASE = Knobs(max_num_seqs=64, max_batched_tokens=8192, precision="fp16")
IT, OOM = FEATURE_NAMES.index("iteration_vs_tpot"), FEATURE_NAMES.index("recent_ooms")


def test_teacher_steps_the_limits_down_on_a_miss_and_up_otherwise():
    teacher = AIMDTeacher(BASE, pressure_allocator=None)  # the allocator's switch: tested below
    obs = np.zeros((3, len(FEATURE_NAMES)), np.float32)
    obs[:, FEATURE_NAMES.index("tokens_per_s")] = 0.5  # the engine is producing tokens
    obs[0, IT] = -0.2  # iterations under the TPOT SLO
    obs[1, IT] = 0.3  # over it
    obs[2, IT], obs[2, OOM] = -0.2, 0.2  # under it, but OOMs are recent
    acts = teacher.act(obs)
    assert [LIMIT_MOVES[a] for a in acts[:, 0]] == [1.05, 0.95, 0.95]
    assert (acts[:, 1] == acts[:, 0]).all()
    assert (acts[:, 2:] == knobs_to_action(BASE)[2:]).all()  # the other knobs stay at the base
    assert (teacher.act(obs[1]) == acts[1]).all()


def test_teacher_moves_to_expandable_segments_under_memory_pressure_and_stays():
    teacher = AIMDTeacher(BASE)
    alloc = KNOB_NAMES.index("allocator")
    expandable = FEATURE_NAMES.index("knob_allocator=expandable")
    obs = np.zeros((4, len(FEATURE_NAMES)), np.float32)
    obs[:, FEATURE_NAMES.index("tokens_per_s")] = 0.5
    obs[:, FEATURE_NAMES.index("memory_headroom")] = 0.5
    obs[:, FEATURE_NAMES.index("knob_allocator=default")] = 1.0
    obs[1, OOM] = 0.01  # an OOM a while ago
    obs[2, FEATURE_NAMES.index("knob_allocator=default")], obs[2, expandable] = 0.0, 1.0  # switched before
    obs[3, FEATURE_NAMES.index("memory_headroom")] = 0.02
    acts = teacher.act(obs)
    assert acts[:, alloc].tolist() == [0, 1, 1, 0]  # default, expandable, expandable, default
    assert AIMDTeacher(BASE, pressure_headroom=0.05).act(obs)[3, alloc] == 1
    assert (AIMDTeacher(BASE, pressure_allocator=None).act(obs)[:, alloc] == 0).all()
    cpu = np.tile(action_mask("cpu"), (4, 1))  # a device without expandable segments keeps the base
    assert (teacher.act(obs, cpu)[:, alloc] == 0).all()


def test_the_pressure_switch_cuts_the_teachers_ooms_at_a_tight_memory_cap():
    s = Scenario("azure-conv", 16.0, 4.0, "h100-gpt2-small", 0.0, 60.0)
    slo = SLO(0.5, 0.02)
    ooms = {}
    for alloc in (None, "expandable"):
        policy = LearnedPolicy(AIMDTeacher(BASE, pressure_allocator=alloc), "cuda", name="teacher", decide_every_s=0.05)
        report, series = run_policy(policy, s, slo, seed=0)
        assert report["lost"] == 0
        ooms[alloc] = report["ooms"]
    assert ooms["expandable"] < ooms[None]


def test_teacher_settles_the_batch_where_iterations_meet_the_tpot_slo():
    """From a tiny batch under a heavy load it climbs until iterations reach the SLO (here ~3
    ms at most batch sizes on the H100 profile); with a looser SLO it settles on a bigger
    batch, and neither is at a bound of the limit."""
    s = Scenario("azure-conv", 24.0, 8.0, "h100-gpt2-small", 0.0, 30.0)
    settled = []
    for tpot_ms in (3.0, 4.0):
        slo = SLO(0.5, tpot_ms / 1e3)
        policy = LearnedPolicy(
            AIMDTeacher(BASE.replace(max_num_seqs=4, max_batched_tokens=1024)), "cuda", name="teacher", decide_every=16
        )
        report, series = run_policy(policy, s, slo, seed=0)
        assert report["lost"] == 0
        tail = series.knobs["max_num_seqs"][len(series.knobs["max_num_seqs"]) // 2 :]
        settled.append(float(np.mean(tail)))
    assert 0.0 < settled[0] < settled[1] < 6.0  # positions in the table 4..256


def test_discounted_returns_cut_at_episode_ends():
    r = np.array([[1.0], [1.0], [1.0]])
    d = np.array([[False], [True], [False]])
    assert discounted_returns(r, d, 0.5)[:, 0].tolist() == [1.5, 1.0, 1.0]


@pytest.fixture(scope="module")
def small_model():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import VecNormalize

    # a TPOT SLO near the H100 profile's iteration time, so the teacher both climbs and backs off
    cfg = {
        "env_kwargs": {
            "profile": "h100-gpt2-small",
            "slo_ttft_ms": 500,
            "slo_tpot_ms": 3.5,
            "episode_steps": 64,
            "iterations_per_step": 4,
            "window_s": 30,
            "randomize": {"load_scale": [8.0, 24.0], "memory_cap_gib": [4.0, 8.0], "initial_limits": True},
        }
    }
    venv = VecNormalize(make_env(cfg, 2, seed=1))
    model = MaskablePPO("MlpPolicy", venv, n_steps=64, batch_size=64, seed=1, policy_kwargs={"net_arch": [32, 32]})
    return model, venv


def test_kickstart_makes_the_actor_pick_the_teachers_actions(small_model):
    model, venv = small_model
    teacher = AIMDTeacher(BASE)
    stats = kickstart(model, venv, teacher, steps=1024, epochs=150, seed=1)
    assert stats["steps"] == 1024 and stats["agreement"] > 0.9
    # on a state it was not fitted to, the deterministic actor answers as the teacher does
    for _ in range(5):  # a few steps into an episode, under the teacher's knobs
        venv.step(teacher.act(venv.get_original_obs()))
    raw = np.repeat(venv.get_original_obs()[:1], 2, axis=0)
    raw[:, OOM] = 0.0
    raw[0, IT], raw[1, IT] = -0.5, 0.5
    with torch.no_grad():
        picked = model.policy.predict(venv.normalize_obs(raw), deterministic=True)[0]
    assert (picked == teacher.act(raw)).all()


def test_profile_teachers_answer_by_each_episodes_profile():
    """A privileged teacher per profile: each env's action comes from its own episode's
    profile's teacher, across resets that change the profile."""
    from stable_baselines3.common.vec_env import VecNormalize

    from autoopt.engine.knob_space import KNOB_NAMES

    cfg = {
        "env_kwargs": {
            "slo_ttft_ms": 500,
            "slo_tpot_ms": 20,
            "episode_steps": 8,
            "step_s": 0.05,
            "window_s": 30,
            "randomize": {"profiles": ["h100-gpt2-small", "h100-gpt2-small-engine"]},
        }
    }
    venv = VecNormalize(make_env(cfg, 3, seed=2))
    teachers = ProfileTeachers(
        {"h100-gpt2-small": AIMDTeacher(BASE), "h100-gpt2-small-engine": AIMDTeacher(BASE.replace(attention="cudnn"))}
    )
    data = collect(venv, teachers, steps=60)
    att = data["actions"][:, :, KNOB_NAMES.index("attention")]
    flowing = data["obs"][:, :, FEATURE_NAMES.index("tokens_per_s")] > 0  # past an episode's first step
    engine = (data["profiles"] == "h100-gpt2-small-engine") & flowing
    shared = (data["profiles"] == "h100-gpt2-small") & flowing
    assert engine.any() and shared.any()
    assert (att[engine] == knobs_to_action(BASE.replace(attention="cudnn"))[2]).all()
    assert (att[shared] == knobs_to_action(BASE)[2]).all()


def test_teacher_keeps_the_knobs_in_force_until_the_engine_has_produced_a_token():
    """The first observation of an episode says nothing about the card, so the teacher
    does not switch kernel or precision on it; once tokens flow it moves to its base."""
    from autoopt.envs.inference_tuning import InferenceTuningEnv

    env = InferenceTuningEnv(load_scale=10.0, step_s=0.05, initial_knobs={"attention": "flash", "precision": "bf16"})
    obs, _ = env.reset(seed=0)
    teacher = AIMDTeacher(BASE.replace(attention="cudnn", precision="fp16"))
    first = teacher.act(obs)
    assert (first[2:] == knobs_to_action(env.engine.knobs)[2:]).all()  # flash, bf16 kept
    obs, *_ = env.step(first)
    assert obs[FEATURE_NAMES.index("tokens_per_s")] > 0
    assert (teacher.act(obs)[2:] == knobs_to_action(BASE.replace(attention="cudnn", precision="fp16"))[2:]).all()
