"""RuntimePolicy: exact actions from numpy alone, and a clear refusal of every bad file.

Policies here are built from random weights (no SB3 needed); parity with SB3 itself is in
test_export.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from autoopt.policies import PolicyFileError, RuntimePolicy
from autoopt.policies.export import write_npz

FEATURES = [f"f{i}" for i in range(12)]
TABLES = [
    {"name": "max_num_seqs", "values": [8, 16, 32]},
    {"name": "max_batched_tokens", "values": [1024, 2048, 4096, 8192]},
    {"name": "cuda_graphs", "values": [False, True]},
    {"name": "reclaim", "values": [False, True]},
    {"name": "attention", "values": ["flash", "efficient", "math", "cudnn", "flash"]},
]


def make_policy(
    path: Path,
    hidden: tuple[int, ...] = (64, 64),
    activation: str = "tanh",
    norm: bool = True,
    seed: int = 0,
    tables: list[dict] | None = None,
    features: list[str] | None = None,
) -> Path:
    """Write a valid policy with random weights, as export_policy lays it out."""
    rng = np.random.default_rng(seed)
    tables = tables or TABLES
    features = features or FEATURES
    sizes = [len(features), *hidden]
    arrays, refs = {}, []
    for i in range(len(hidden)):
        arrays[f"pi_{i}_w"] = (rng.standard_normal((sizes[i + 1], sizes[i])) / np.sqrt(sizes[i])).astype(np.float32)
        arrays[f"pi_{i}_b"] = (0.1 * rng.standard_normal(sizes[i + 1])).astype(np.float32)
        refs.append({"w": f"pi_{i}_w", "b": f"pi_{i}_b"})
    n_out = sum(len(t["values"]) for t in tables)
    arrays["action_w"] = rng.standard_normal((n_out, sizes[-1])).astype(np.float32)
    arrays["action_b"] = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    data = write_npz(path / "weights.npz", arrays)
    obs_norm = None
    if norm:
        obs_norm = {
            "mean": rng.normal(100, 50, len(features)).tolist(),
            "var": rng.uniform(1, 900, len(features)).tolist(),
            "clip_obs": 5.0,
            "epsilon": 1e-8,
        }
    manifest = {
        "format": "autoopt-policy",
        "version": 1,
        "algo": "PPO",
        "activation": activation,
        "obs_features": features,
        "obs_norm": obs_norm,
        "action_tables": tables,
        "mask_rules": None,
        "env_id": "autoopt/Test-v0",
        "env_kwargs": {},
        "profile": {"name": "cpu-tiny", "sha256": "0" * 64},
        "seed": seed,
        "timesteps": 0,
        "evaluation": {},
        "layers": refs,
        "action_head": {"w": "action_w", "b": "action_b"},
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_bytes": len(data),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def reference_actions(policy_dir: Path, obs: np.ndarray) -> np.ndarray:
    """The plainest reading of the format: SB3's normalisation, float32 layers, argmax per head."""
    m = json.loads((policy_dir / "manifest.json").read_text())
    w = np.load(policy_dir / "weights.npz", allow_pickle=False)
    x = obs.astype(np.float64)
    if m["obs_norm"]:
        n = m["obs_norm"]
        x = np.clip(
            (x - np.array(n["mean"])) / np.sqrt(np.array(n["var"]) + n["epsilon"]), -n["clip_obs"], n["clip_obs"]
        )
    x = x.astype(np.float32)
    for ref in m["layers"]:
        x = x @ w[ref["w"]].T + w[ref["b"]]
        x = np.tanh(x) if m["activation"] == "tanh" else np.maximum(x, 0)
    logits = x @ w["action_w"].T + w["action_b"]
    out, start = [], 0
    for t in m["action_tables"]:
        out.append(logits[:, start : start + len(t["values"])].argmax(axis=1))
        start += len(t["values"])
    return np.stack(out, axis=1)


def random_obs(policy: RuntimePolicy, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norm = policy.manifest["obs_norm"]
    if norm is None:
        return rng.normal(0, 3, (n, policy.obs_dim))
    return np.array(norm["mean"]) + rng.normal(0, 3, (n, policy.obs_dim)) * np.sqrt(np.array(norm["var"]))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return make_policy(tmp_path / "policy")


def rewrite_npz(policy_dir: Path, arrays: dict[str, np.ndarray], allow_pickle: bool = False) -> None:
    """Replace the weights and recompute the manifest's checksum, so only the content is at fault."""
    path = policy_dir / "weights.npz"
    if allow_pickle:
        np.savez(path, **arrays)
    else:
        write_npz(path, arrays)
    data = path.read_bytes()
    m = json.loads((policy_dir / "manifest.json").read_text())
    m["weights_sha256"] = hashlib.sha256(data).hexdigest()
    m["weights_bytes"] = len(data)
    (policy_dir / "manifest.json").write_text(json.dumps(m))


def edit_manifest(policy_dir: Path, **changes) -> None:
    m = json.loads((policy_dir / "manifest.json").read_text())
    m.update(changes)
    (policy_dir / "manifest.json").write_text(json.dumps(m))


def load_arrays(policy_dir: Path) -> dict[str, np.ndarray]:
    with np.load(policy_dir / "weights.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------ acting


@pytest.mark.parametrize(
    ("hidden", "activation", "norm"),
    [
        ((64, 64), "tanh", True),
        ((64, 64), "relu", False),
        ((32,), "tanh", True),
        ((16, 24, 8), "relu", True),
        ((), "tanh", True),
    ],
)
def test_act_matches_reference_and_batch(tmp_path: Path, hidden, activation, norm) -> None:
    d = make_policy(tmp_path / "p", hidden=hidden, activation=activation, norm=norm, seed=len(hidden))
    policy = RuntimePolicy.load(d)
    obs = random_obs(policy, 3000)
    batch = policy.act_batch(obs)
    assert batch.dtype == np.int64 and batch.shape == (3000, 5)
    np.testing.assert_array_equal(batch, reference_actions(d, obs))
    single = np.array([policy.act(o) for o in obs])
    np.testing.assert_array_equal(single, batch)
    # every head takes more than one value on these observations: the test sees real decisions
    assert all(len(np.unique(batch[:, i])) > 1 for i in range(5))


def identity_policy(tmp_path: Path) -> RuntimePolicy:
    """A policy whose logits are its observation (no hidden layer, identity head, no normalisation)."""
    d = make_policy(tmp_path / "identity", hidden=(), norm=False, features=[f"l{i}" for i in range(16)])
    arrays = load_arrays(d)
    arrays["action_w"] = np.eye(16, dtype=np.float32)
    arrays["action_b"] = np.zeros(16, dtype=np.float32)
    rewrite_npz(d, arrays)
    return RuntimePolicy.load(d)


def test_near_ties_are_decided_as_sb3_decides_them(tmp_path: Path) -> None:
    """SB3 takes the argmax of float32 softmax probabilities: logits a few ulps apart can tie, and the
    lower index wins. The runtime reproduces that where a plain argmax of the logits would not."""
    torch = pytest.importorskip("torch")
    policy = identity_policy(tmp_path)
    rng = np.random.default_rng(5)
    n = 1500
    logits = (rng.standard_normal((n, 16)) * rng.choice([0.01, 0.1, 1.0, 3.0], (n, 1))).astype(np.float32)
    start = 0
    for size in policy.action_dims:  # in every head, put a lower index 1-3 ulps below the maximum
        head = logits[:, start : start + size]
        top = head.argmax(axis=1)
        rows = np.flatnonzero(top > 0)
        lower = rng.integers(0, top[rows])
        top_val = head[rows, top[rows]]
        head[rows, lower] = top_val - rng.integers(1, 4, rows.size) * np.spacing(np.abs(top_val))
        start += size
    with torch.no_grad():
        parts = torch.split(torch.as_tensor(logits), list(policy.action_dims), dim=1)
        sb3 = np.stack([torch.distributions.Categorical(logits=p).probs.argmax(dim=1).numpy() for p in parts], 1)
    ours = np.array([policy.act(row) for row in logits])
    np.testing.assert_array_equal(policy.act_batch(logits), ours)
    start, plain = 0, []
    for size in policy.action_dims:
        plain.append(logits[:, start : start + size].argmax(axis=1))
        start += size
    plain = np.stack(plain, 1)
    wide = policy.action_dims.index(5)
    assert (plain[:, wide] == sb3[:, wide]).mean() < 0.9  # the ties are real: plain argmax often disagrees
    assert (ours == sb3).mean() > 0.98
    # clear preferences are left alone
    clear = np.zeros(16, dtype=np.float32)
    clear[[2, 6, 8, 10, 15]] = 1e-3
    np.testing.assert_array_equal(policy.act(clear), [2, 3, 1, 1, 4])


def test_act_returns_fresh_int64_and_accepts_lists_and_float32(policy_dir: Path) -> None:
    policy = RuntimePolicy.load(policy_dir)
    obs = random_obs(policy, 2)
    a = policy.act(obs[0])
    b = policy.act(obs[1])
    assert a.dtype == np.int64 and a.shape == (5,)
    np.testing.assert_array_equal(policy.act(obs[0]), a)  # a was not overwritten by later calls
    np.testing.assert_array_equal(policy.act(obs[1].tolist()), b)
    assert policy.act(obs[0].astype(np.float32)).shape == (5,)
    assert policy.obs_dim == 12 and policy.action_dims == (3, 4, 2, 2, 5)


def test_pickle_and_copy_rebuild_with_own_buffers(policy_dir: Path) -> None:
    import copy
    import pickle

    policy = RuntimePolicy.load(policy_dir)
    obs = random_obs(policy, 200)
    expected = policy.act_batch(obs)
    for other in (pickle.loads(pickle.dumps(policy)), copy.copy(policy), copy.deepcopy(policy)):
        assert other.act is not policy.act
        np.testing.assert_array_equal(np.array([other.act(o) for o in obs]), expected)
        assert other.manifest == policy.manifest


def test_act_refuses_bad_observations(policy_dir: Path) -> None:
    policy = RuntimePolicy.load(policy_dir)
    with pytest.raises(ValueError, match=r"shape \[12\], got \[11\]"):
        policy.act(np.zeros(11))
    with pytest.raises(ValueError, match=r"shape \[12\], got \[1, 12\]"):
        policy.act(np.zeros((1, 12)))
    obs = random_obs(policy, 1)[0]
    obs[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        policy.act(obs)
    with pytest.raises(ValueError, match="NaN"):
        policy.act_batch(obs[None, :])
    obs[4] = np.inf  # normalisation clips it, as VecNormalize does
    assert policy.act(obs).shape == (5,)


def test_masks_are_obeyed(policy_dir: Path) -> None:
    policy = RuntimePolicy.load(policy_dir)
    obs = random_obs(policy, 500)
    rng = np.random.default_rng(3)
    masks = rng.random((500, 16)) < 0.5
    starts = np.cumsum([0, 3, 4, 2, 2])
    for s, n in zip(starts, (3, 4, 2, 2, 5), strict=True):  # at least one allowed entry per head
        masks[np.arange(500), s + rng.integers(0, n, 500)] = True
    batch = policy.act_batch(obs, masks)
    for i, (o, m) in enumerate(zip(obs, masks, strict=True)):
        a = policy.act(o, m)
        np.testing.assert_array_equal(a, batch[i])
        assert m[starts + a].all()
    # where the unmasked choice is allowed, masking does not change it
    free = policy.act_batch(obs)
    keep = masks[np.arange(500)[:, None], starts + free].all(axis=1)
    np.testing.assert_array_equal(batch[keep], free[keep])
    assert keep.sum() > 0 and (~keep).sum() > 0


def test_repeated_masks_hit_the_cache_and_stay_right(policy_dir: Path) -> None:
    """The engine's masks repeat: a cached mask must give the same actions as a fresh one."""
    policy = RuntimePolicy.load(policy_dir)
    obs = random_obs(policy, 600)
    few = np.ones((3, 16), dtype=bool)
    few[1, [0, 1, 7]] = False
    few[2, 11:15] = False
    masks = few[np.arange(600) % 3]
    expected = policy.act_batch(obs, masks)
    got = np.array([policy.act(o, m) for o, m in zip(obs, masks, strict=True)])
    np.testing.assert_array_equal(got, expected)
    as_lists = np.array([policy.act(o, m.astype(int).tolist()) for o, m in zip(obs[:30], masks[:30], strict=True)])
    np.testing.assert_array_equal(as_lists, expected[:30])
    bad = few[0].copy()
    bad[9:11] = False  # 'reclaim' has no allowed entry
    with pytest.raises(ValueError, match="no entry of head.*'reclaim'"):
        policy.act(obs[0], bad)


def test_mask_with_an_empty_head_is_refused(policy_dir: Path) -> None:
    policy = RuntimePolicy.load(policy_dir)
    obs = random_obs(policy, 1)[0]
    mask = np.ones(16, dtype=bool)
    mask[3:7] = False
    with pytest.raises(ValueError, match="no entry of head.*max_batched_tokens"):
        policy.act(obs, mask)
    with pytest.raises(ValueError, match="no entry of head 'max_batched_tokens'"):
        policy.act_batch(obs[None], mask[None])
    with pytest.raises(ValueError, match=r"mask must have shape \[16\]"):
        policy.act(obs, np.ones(15, dtype=bool))


def test_decode_uses_action_tables(policy_dir: Path) -> None:
    policy = RuntimePolicy.load(policy_dir)
    assert policy.decode([2, 0, 1, 0, 3]) == {
        "max_num_seqs": 32,
        "max_batched_tokens": 1024,
        "cuda_graphs": True,
        "reclaim": False,
        "attention": "cudnn",
    }
    with pytest.raises(ValueError, match="out of range for 'max_num_seqs'"):
        policy.decode([3, 0, 0, 0, 0])


# ------------------------------------------------------------------ refusing bad files


def test_missing_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="manifest not found"):
        RuntimePolicy.load(tmp_path / "nowhere")


def test_corrupt_npz(policy_dir: Path) -> None:
    path = policy_dir / "weights.npz"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(PolicyFileError, match=r"weights\.npz: corrupt npz archive: member '.*': Bad CRC-32"):
        RuntimePolicy.load(policy_dir)


def test_garbage_instead_of_npz(policy_dir: Path) -> None:
    (policy_dir / "weights.npz").write_bytes(b"\x00not a zip at all" * 4)
    with pytest.raises(PolicyFileError, match="corrupt: not an npz"):
        RuntimePolicy.load(policy_dir)


def test_truncated_npz(policy_dir: Path) -> None:
    path = policy_dir / "weights.npz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(PolicyFileError, match="truncated: 5000 bytes, the manifest says"):
        RuntimePolicy.load(policy_dir)
    m = json.loads((policy_dir / "manifest.json").read_text())
    del m["weights_bytes"]  # without the recorded size, the missing end-of-archive record tells
    (policy_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PolicyFileError, match="truncated: the zip's end-of-archive record is missing"):
        RuntimePolicy.load(policy_dir)


def test_truncated_manifest(policy_dir: Path) -> None:
    path = policy_dir / "manifest.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(PolicyFileError, match=r"manifest is not valid JSON: line \d+ column \d+"):
        RuntimePolicy.load(policy_dir)


def test_other_version(policy_dir: Path) -> None:
    edit_manifest(policy_dir, version=2)
    with pytest.raises(PolicyFileError, match="format version 2 is not supported: this runtime reads version 1"):
        RuntimePolicy.load(policy_dir)


def test_other_format(policy_dir: Path) -> None:
    edit_manifest(policy_dir, format="autoopt-profile")
    with pytest.raises(PolicyFileError, match="not an autoopt policy manifest"):
        RuntimePolicy.load(policy_dir)


def test_pickle_inside_npz(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    arrays["pi_0_b"] = np.array([{"payload": "os.system"}] * 64, dtype=object)
    rewrite_npz(policy_dir, arrays, allow_pickle=True)
    with pytest.raises(PolicyFileError, match="array 'pi_0_b' contains a pickled object array; refused"):
        RuntimePolicy.load(policy_dir)


def test_nan_weights(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    arrays["pi_1_w"][3, 5] = np.nan
    rewrite_npz(policy_dir, arrays)
    with pytest.raises(
        PolicyFileError, match=r"array 'pi_1_w' has 1 non-finite weights \(NaN or inf\), first at \[3, 5\]"
    ):
        RuntimePolicy.load(policy_dir)


def test_checksum_mismatch(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    arrays["action_b"][0] += 1.0
    write_npz(policy_dir / "weights.npz", arrays)  # a valid npz, but not the one the manifest describes
    with pytest.raises(PolicyFileError, match="checksum mismatch: sha256 is [0-9a-f]{64}, the manifest says"):
        RuntimePolicy.load(policy_dir)


def test_layers_that_do_not_chain(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    arrays["pi_1_w"] = arrays["pi_1_w"][:, :60]
    rewrite_npz(policy_dir, arrays)
    with pytest.raises(
        PolicyFileError, match=r"shape mismatch: layer 1 weight 'pi_1_w' is \[64, 60\].*layer 0's output is 64"
    ):
        RuntimePolicy.load(policy_dir)


def test_observation_size_differs_from_features(policy_dir: Path) -> None:
    m = json.loads((policy_dir / "manifest.json").read_text())
    edit_manifest(policy_dir, obs_features=m["obs_features"][:-1], obs_norm=None)
    with pytest.raises(
        PolicyFileError, match="shape mismatch: layer 0 .* its input is 12 but the observation's feature count is 11"
    ):
        RuntimePolicy.load(policy_dir)


def test_head_size_differs_from_action_tables(policy_dir: Path) -> None:
    tables = [dict(t) for t in TABLES]
    tables[4] = {"name": "attention", "values": ["flash", "math"]}
    edit_manifest(policy_dir, action_tables=tables)
    with pytest.raises(
        PolicyFileError, match=r"action head has 16 outputs but the action tables \[3, 4, 2, 2, 2\] have 13"
    ):
        RuntimePolicy.load(policy_dir)


def test_bias_shape_mismatch(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    arrays["pi_0_b"] = arrays["pi_0_b"][:10]
    rewrite_npz(policy_dir, arrays)
    with pytest.raises(PolicyFileError, match=r"layer 0 weight 'pi_0_w' is \[64, 12\] and bias 'pi_0_b' is \[10\]"):
        RuntimePolicy.load(policy_dir)


def test_wrong_dtype_and_unnamed_arrays(policy_dir: Path) -> None:
    arrays = load_arrays(policy_dir)
    rewrite_npz(policy_dir, {**arrays, "pi_0_w": arrays["pi_0_w"].astype(np.float64)})
    with pytest.raises(PolicyFileError, match="'pi_0_w' has dtype float64, expected float32"):
        RuntimePolicy.load(policy_dir)
    rewrite_npz(policy_dir, {**arrays, "extra": np.zeros(3, np.float32)})
    with pytest.raises(PolicyFileError, match=r"arrays the manifest does not name: \['extra'\]"):
        RuntimePolicy.load(policy_dir)
    del arrays["action_b"]
    rewrite_npz(policy_dir, arrays)
    with pytest.raises(PolicyFileError, match=r"weights lack arrays \['action_b'\]"):
        RuntimePolicy.load(policy_dir)


def test_bad_normalisation(policy_dir: Path) -> None:
    m = json.loads((policy_dir / "manifest.json").read_text())
    edit_manifest(policy_dir, obs_norm={**m["obs_norm"], "var": m["obs_norm"]["var"][:5]})
    with pytest.raises(PolicyFileError, match="obs_norm.var has 5 entries, the observation has 12 features"):
        RuntimePolicy.load(policy_dir)
    edit_manifest(policy_dir, obs_norm={**m["obs_norm"], "clip_obs": -1})
    with pytest.raises(PolicyFileError, match="obs_norm.clip_obs must be a positive finite number"):
        RuntimePolicy.load(policy_dir)


def test_feature_layout_against_the_engine(policy_dir: Path) -> None:
    assert RuntimePolicy.load(policy_dir, expected_features=FEATURES).obs_dim == 12
    engine = [*FEATURES[:3], "queue_depth", *FEATURES[4:]]
    with pytest.raises(
        PolicyFileError,
        match=r"layout differs.*missing from the policy: \['queue_depth'\]; not in the engine's layout: \['f3'\]",
    ):
        RuntimePolicy.load(policy_dir, expected_features=engine)
    swapped = [FEATURES[1], FEATURES[0], *FEATURES[2:]]
    with pytest.raises(
        PolicyFileError, match="another order: first difference at index 0: policy has 'f0', engine has 'f1'"
    ):
        RuntimePolicy.load(policy_dir, expected_features=swapped)
    with pytest.raises(PolicyFileError, match="policy has 12 features, engine has 11"):
        RuntimePolicy.load(policy_dir, expected_features=FEATURES[:11])


def test_each_fault_has_its_own_message(tmp_path: Path) -> None:
    """The faults the issue names are told apart, not lumped into one 'bad file'."""

    def fault(name: str, damage) -> str:
        d = make_policy(tmp_path / name)
        damage(d)
        with pytest.raises(PolicyFileError) as e:
            RuntimePolicy.load(d)
        return str(e.value).split(": ", 1)[1]

    def corrupt(d: Path) -> None:
        data = bytearray((d / "weights.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "weights.npz").write_bytes(bytes(data))

    def truncate(d: Path) -> None:
        (d / "weights.npz").write_bytes((d / "weights.npz").read_bytes()[:-100])

    def pickled(d: Path) -> None:
        rewrite_npz(d, {**load_arrays(d), "action_b": np.array([None] * 16, dtype=object)}, allow_pickle=True)

    def nan(d: Path) -> None:
        arrays = load_arrays(d)
        arrays["action_w"][0, 0] = np.nan
        rewrite_npz(d, arrays)

    def shapes(d: Path) -> None:
        arrays = load_arrays(d)
        arrays["action_w"] = arrays["action_w"][:, :32]
        rewrite_npz(d, arrays)

    messages = {
        "corrupt": fault("corrupt", corrupt),
        "truncated": fault("truncated", truncate),
        "version": fault("version", lambda d: edit_manifest(d, version=2)),
        "shapes": fault("shapes", shapes),
        "pickle": fault("pickle", pickled),
        "nan": fault("nan", nan),
    }
    keys = {
        "corrupt": "corrupt",
        "truncated": "truncated",
        "version": "version 2",
        "shapes": "shape mismatch",
        "pickle": "pickled object array",
        "nan": "non-finite",
    }
    for name, text in messages.items():
        assert keys[name] in text, (name, text)
        others = [k for n, k in keys.items() if n != name]
        assert not any(k in text for k in others), (name, text)


# ------------------------------------------------------------------ import weight


def test_import_pulls_in_no_torch_sb3_or_gymnasium(policy_dir: Path) -> None:
    code = (
        "import sys, autoopt.policies as p\n"
        f"p.RuntimePolicy.load({str(policy_dir)!r}).act([0.0] * 12)\n"
        "bad = [m for m in ('torch', 'stable_baselines3', 'sb3_contrib', 'gymnasium') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_export_is_reachable_lazily() -> None:
    import autoopt.policies as p

    assert callable(p.export_policy)
    with pytest.raises(AttributeError):
        p.no_such_thing  # noqa: B018


def test_npz_written_by_export_is_deterministic(tmp_path: Path) -> None:
    a = make_policy(tmp_path / "a", seed=7)
    b = make_policy(tmp_path / "b", seed=7)
    assert (a / "weights.npz").read_bytes() == (b / "weights.npz").read_bytes()
    with zipfile.ZipFile(a / "weights.npz") as zf:
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())


def test_guard_refuses_a_policy_whose_action_layout_differs_from_the_engines(tmp_path: Path) -> None:
    """A policy file from an older action layout (absolute batch-limit tables) would pick
    valid indices that now mean moves: the guard refuses it when built, naming the heads."""
    from autoopt.engine.features import FEATURE_NAMES
    from autoopt.engine.knob_space import KNOB_TABLES, action_tables
    from autoopt.policies.guard import GuardedPolicy

    current = make_policy(tmp_path / "now", features=list(FEATURE_NAMES), tables=action_tables())
    GuardedPolicy(RuntimePolicy.load(current), "cuda")  # the engine's own layout is accepted
    old_tables = [{"name": n, "values": list(v)} for n, v in KNOB_TABLES]
    old = make_policy(tmp_path / "old", features=list(FEATURE_NAMES), tables=old_tables)
    with pytest.raises(PolicyFileError, match="action layout differs.*head 0 \\('max_num_seqs'\\)"):
        GuardedPolicy(RuntimePolicy.load(old), "cuda")
    other_features = make_policy(tmp_path / "feat", features=list(FEATURE_NAMES)[:-1], tables=action_tables())
    with pytest.raises(PolicyFileError, match="observation layout differs"):
        GuardedPolicy(RuntimePolicy.load(other_features), "cuda")


@pytest.mark.parametrize(
    "env_kwargs, match",
    [
        ("fast", "env_kwargs must be an object"),
        ({"iterations_per_step": 0}, "iterations_per_step must be an integer >= 1"),
        ({"step_s": -1.0}, "step_s must be a positive number"),
    ],
)
def test_a_malformed_decision_cadence_is_refused_not_read_as_every_iteration(
    policy_dir: Path, env_kwargs, match
) -> None:
    edit_manifest(policy_dir, env_kwargs=env_kwargs)
    with pytest.raises(PolicyFileError, match=match):
        RuntimePolicy.load(policy_dir)
