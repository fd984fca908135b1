"""export_policy: a real PPO / MaskablePPO model out, the same actions back from numpy alone.

Small models are trained here (a few hundred steps, seconds) so parity is checked against
SB3 itself, on 100,000 random observations.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from autoopt.policies import RuntimePolicy
from autoopt.policies.export import ExportError, export_main, export_policy, sample_observations, sb3_predict

NVEC = [3, 4, 2, 2, 5]
OBS_DIM = 12


class KnobEnv(gym.Env):
    """Observations far from zero mean / unit scale (VecNormalize matters); reward depends on the action."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = spaces.MultiDiscrete(NVEC)
        self._t = 0
        self._obs = np.zeros(OBS_DIM, np.float32)

    def _draw(self) -> np.ndarray:
        self._obs = self.np_random.normal(50.0, 20.0, OBS_DIM).astype(np.float32)
        return self._obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        return self._draw(), {}

    def step(self, action):
        self._t += 1
        reward = float(action[0] == (self._obs[0] > 50)) + 0.5 * float(action[4] == int(self._obs[1]) % 5)
        return self._draw(), reward, False, self._t >= 32, {}


class MaskedKnobEnv(KnobEnv):
    """The same env with invalid actions: a mask that depends on the observation."""

    def action_masks(self) -> np.ndarray:
        return obs_mask(self._obs)


def obs_mask(obs: np.ndarray) -> np.ndarray:
    m = np.ones(sum(NVEC), dtype=bool)
    if obs[2] > 50:
        m[3 + 3] = False  # the largest max_batched_tokens
    if obs[3] > 50:
        m[11 + 3 : 11 + 5] = False  # two attention kernels
    return m


def train(tmp: Path, algo: str, normalize: bool = True) -> tuple[Path, Path | None]:
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    env_cls = MaskedKnobEnv if algo == "MaskablePPO" else KnobEnv
    venv = DummyVecEnv([env_cls])
    if normalize:
        venv = VecNormalize(venv, norm_reward=True, clip_obs=5.0)
    venv.seed(3)
    if algo == "MaskablePPO":
        from sb3_contrib import MaskablePPO as Algo
    else:
        from stable_baselines3 import PPO as Algo
    model = Algo("MlpPolicy", venv, n_steps=64, batch_size=32, n_epochs=2, seed=3, device="cpu", verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3 would otherwise make a /tmp/SB3-* dir per run
    model.learn(256)
    tmp.mkdir(parents=True, exist_ok=True)
    model.save(tmp / "model.zip")
    if not normalize:
        return tmp / "model.zip", None
    venv.save(str(tmp / "vecnormalize.pkl"))
    return tmp / "model.zip", tmp / "vecnormalize.pkl"


@pytest.fixture(scope="module")
def ppo(tmp_path_factory) -> tuple[Path, Path]:
    return train(tmp_path_factory.mktemp("ppo"), "PPO")


@pytest.fixture(scope="module")
def maskable(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("sb3_contrib")
    return train(tmp_path_factory.mktemp("maskable"), "MaskablePPO")


TABLES = [
    {"name": "max_num_seqs", "values": [8, 16, 32]},
    {"name": "max_batched_tokens", "values": [1024, 2048, 4096, 8192]},
    {"name": "cuda_graphs", "values": [False, True]},
    {"name": "reclaim", "values": [False, True]},
    {"name": "attention", "values": ["flash", "efficient", "math", "cudnn", "flash"]},
]
FEATURES = [f"feat_{i}" for i in range(OBS_DIM)]


def test_manifest_records_everything(ppo, tmp_path: Path) -> None:
    model_path, vn_path = ppo
    out = export_policy(
        model_path,
        tmp_path / "pol",
        vecnormalize_path=vn_path,
        obs_features=FEATURES,
        action_tables=TABLES,
        mask_rules={"rule": "flash needs half precision"},
        env_id="autoopt/Serve-v0",
        env_kwargs={"trace": "bursty"},
        profile={"name": "cpu-tiny", "sha256": "ab" * 32},
        evaluation={"mean_reward": 1.5},
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "autoopt-policy" and m["version"] == 1
    assert m["algo"] == "PPO" and m["activation"] == "tanh"
    assert m["obs_features"] == FEATURES and m["action_tables"] == TABLES
    assert m["mask_rules"] == {"rule": "flash needs half precision"}
    assert m["env_id"] == "autoopt/Serve-v0" and m["env_kwargs"] == {"trace": "bursty"}
    assert m["profile"]["sha256"] == "ab" * 32 and m["evaluation"] == {"mean_reward": 1.5}
    assert m["seed"] == 3 and m["timesteps"] == 256
    assert m["verification"] == {"observations": 2000, "seed": 0, "differing": 0, "near_ties": 0}
    assert m["weights_sha256"] == hashlib.sha256((out / "weights.npz").read_bytes()).hexdigest()
    assert m["obs_norm"]["clip_obs"] == 5.0 and len(m["obs_norm"]["mean"]) == OBS_DIM
    assert abs(np.mean(m["obs_norm"]["mean"]) - 50) < 10  # the real running statistics, not defaults
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["action_b", "action_w", "pi_0_b", "pi_0_w", "pi_1_b", "pi_1_w"]
        assert z["pi_0_w"].shape == (64, OBS_DIM) and z["action_w"].shape == (sum(NVEC), 64)
    policy = RuntimePolicy.load(out, expected_features=FEATURES)
    assert policy.decode(policy.act(np.full(OBS_DIM, 50.0)))["attention"] in {"flash", "efficient", "math", "cudnn"}


def test_ppo_parity_on_100k_observations(ppo, tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    model_path, vn_path = ppo
    out = export_policy(model_path, tmp_path / "pol", vecnormalize_path=vn_path)
    policy = RuntimePolicy.load(out)
    model = PPO.load(model_path, device="cpu")
    vecnorm = _load_vecnorm(vn_path)  # SB3's own object: its normalize_obs is the reference
    obs = sample_observations(policy, 100_000, seed=11)
    theirs, _ = model.predict(vecnorm.normalize_obs(obs), deterministic=True)
    ours = policy.act_batch(obs)
    assert ours.shape == theirs.shape == (100_000, len(NVEC))
    assert int((ours != theirs).any(axis=1).sum()) == 0
    assert sum(len(np.unique(ours[:, i])) for i in range(len(NVEC))) > len(NVEC)  # not a constant policy
    # the single-observation path (what the engine calls) agrees too
    single = np.array([policy.act(o) for o in obs[:3000]])
    np.testing.assert_array_equal(single, ours[:3000])
    # and so does a float32 observation, as a gymnasium Box hands it out
    obs32 = obs[:3000].astype(np.float32)
    theirs32, _ = model.predict(vecnorm.normalize_obs(obs32), deterministic=True)
    np.testing.assert_array_equal(policy.act_batch(obs32), theirs32)


def _load_vecnorm(path: Path):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def test_maskable_parity_with_and_without_masks(maskable, tmp_path: Path) -> None:
    from sb3_contrib import MaskablePPO

    model_path, vn_path = maskable
    out = export_policy(model_path, tmp_path / "pol", vecnormalize_path=vn_path, mask_rules={"by": "obs_mask"})
    policy = RuntimePolicy.load(out)
    assert policy.manifest["algo"] == "MaskablePPO"
    model = MaskablePPO.load(model_path, device="cpu")
    vecnorm = _load_vecnorm(vn_path)
    obs = sample_observations(policy, 100_000, seed=12)
    theirs, _ = model.predict(vecnorm.normalize_obs(obs), deterministic=True)
    assert int((policy.act_batch(obs) != theirs).any(axis=1).sum()) == 0
    sub = obs[:5000]
    masks = np.stack([obs_mask(o) for o in sub])
    assert (~masks).any(axis=1).mean() > 0.5  # most observations are really masked
    theirs, _ = model.predict(vecnorm.normalize_obs(sub), deterministic=True, action_masks=masks)
    ours = policy.act_batch(sub, masks)
    assert int((ours != theirs).any(axis=1).sum()) == 0
    single = np.array([policy.act(o, m) for o, m in zip(sub[:1000], masks[:1000], strict=True)])
    np.testing.assert_array_equal(single, ours[:1000])


def test_vecnormalize_next_to_model_is_found(ppo, tmp_path: Path) -> None:
    model_path, _ = ppo  # the fixture saved vecnormalize.pkl beside model.zip
    m = RuntimePolicy.load(export_policy(model_path, tmp_path / "pol")).manifest
    assert m["obs_norm"] is not None and m["source"]["vecnormalize"] == "vecnormalize.pkl"


def test_model_without_normalisation(tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    model_path, _ = train(tmp_path / "raw", "PPO", normalize=False)
    policy = RuntimePolicy.load(export_policy(model_path, tmp_path / "pol"))
    assert policy.manifest["obs_norm"] is None
    assert policy.obs_features[:2] == ("obs_0", "obs_1")
    assert policy.manifest["action_tables"][4] == {"name": "action_4", "values": [0, 1, 2, 3, 4]}
    obs = sample_observations(policy, 20_000, seed=2)
    theirs, _ = PPO.load(model_path, device="cpu").predict(obs, deterministic=True)
    np.testing.assert_array_equal(policy.act_batch(obs), theirs)


def test_export_refuses_mismatched_layout(ppo, tmp_path: Path) -> None:
    model_path, vn_path = ppo
    with pytest.raises(ExportError, match="obs_features has 3 names, the model observes 12"):
        export_policy(model_path, tmp_path / "a", obs_features=["a", "b", "c"], verify=0)
    with pytest.raises(ExportError, match=r"action tables have sizes \[3, 4, 2, 2, 2\].*\[3, 4, 2, 2, 5\]"):
        bad = [*TABLES[:4], {"name": "attention", "values": ["flash", "math"]}]
        export_policy(model_path, tmp_path / "b", action_tables=bad, verify=0)
    with pytest.raises(ExportError, match="model file not found"):
        export_policy(tmp_path / "missing.zip", tmp_path / "c")
    (tmp_path / "junk.zip").write_bytes(b"junk")
    with pytest.raises(ExportError, match="not a stable-baselines3 model zip"):
        export_policy(tmp_path / "junk.zip", tmp_path / "d")


def test_verification_catches_a_real_disagreement(ppo, maskable, tmp_path: Path) -> None:
    """The check export runs is not a formality: the PPO policy against the MaskablePPO model fails it."""
    from sb3_contrib import MaskablePPO

    from autoopt.policies.export import verify_against_sb3

    pol = RuntimePolicy.load(export_policy(ppo[0], tmp_path / "pol", vecnormalize_path=ppo[1], verify=0))
    other = MaskablePPO.load(maskable[0], device="cpu")
    with pytest.raises(ExportError, match=r"disagrees with SB3 on \d+ of 500 observations beyond float32 noise"):
        verify_against_sb3(pol, other, 500)


def test_metadata_must_be_json(ppo, tmp_path: Path) -> None:
    model_path, vn_path = ppo
    out = export_policy(
        model_path, tmp_path / "a", verify=0, env_kwargs={"trace": tmp_path / "t.jsonl", "n": np.int64(3)}
    )
    assert RuntimePolicy.load(out).manifest["env_kwargs"] == {"trace": str(tmp_path / "t.jsonl"), "n": 3}
    with pytest.raises(ExportError, match="manifest metadata holds a set"):
        export_policy(model_path, tmp_path / "b", verify=0, evaluation={"bad": {1, 2}})
    with pytest.raises(ExportError, match="not valid JSON"):
        export_policy(model_path, tmp_path / "c", verify=0, evaluation={"reward": float("nan")})


def test_export_is_reproducible(ppo, tmp_path: Path) -> None:
    model_path, vn_path = ppo
    a = export_policy(model_path, tmp_path / "a", vecnormalize_path=vn_path, verify=0)
    b = export_policy(model_path, tmp_path / "b", vecnormalize_path=vn_path, verify=0)
    assert (a / "weights.npz").read_bytes() == (b / "weights.npz").read_bytes()


def test_cli(ppo, tmp_path: Path, capsys) -> None:
    model_path, vn_path = ppo
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"env_id": "autoopt/Serve-v0", "obs_features": FEATURES, "seed": 9, "timesteps": 1000}))
    assert export_main([str(model_path), "--out", str(tmp_path / "pol"), "--meta", str(meta), "--verify", "500"]) == 0
    assert "wrote" in capsys.readouterr().out
    m = RuntimePolicy.load(tmp_path / "pol").manifest
    assert m["env_id"] == "autoopt/Serve-v0" and m["seed"] == 9 and m["timesteps"] == 1000
    # the same through the `autoopt` entry point
    from autoopt.cli import main as autoopt_main

    assert autoopt_main(["export", str(model_path), "--out", str(tmp_path / "pol3"), "--verify", "0"]) == 0
    assert RuntimePolicy.load(tmp_path / "pol3").manifest["source"]["vecnormalize"] == "vecnormalize.pkl"
    meta.write_text(json.dumps({"colour": "red"}))
    assert export_main([str(model_path), "--out", str(tmp_path / "pol2"), "--meta", str(meta)]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err


def test_onnx_matches_runtime(ppo, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from autoopt.policies.onnx_export import check_onnx, export_onnx

    model_path, vn_path = ppo
    pol = export_policy(model_path, tmp_path / "pol", vecnormalize_path=vn_path, verify=0)
    onnx_path = export_onnx(pol, tmp_path / "actor.onnx")
    report = check_onnx(pol, onnx_path, n=20_000)
    assert report["n"] == 20_000 and report["mismatches"] == 0
    # and ONNX agrees with SB3 directly, not only with the runtime
    from stable_baselines3 import PPO

    from autoopt.policies.onnx_export import onnx_session

    policy = RuntimePolicy.load(pol)
    obs = sample_observations(policy, 5000, seed=5)
    onnx_actions = onnx_session(onnx_path).run(["action"], {"obs": obs})[0]
    sb3_actions = sb3_predict(PPO.load(model_path, device="cpu"), obs, policy.manifest["obs_norm"])
    np.testing.assert_array_equal(onnx_actions, sb3_actions)
