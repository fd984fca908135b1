"""Training end to end on a small config: TensorBoard tags, checkpoints, resume, export,
and the evaluation against the baselines on a trace file given by path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from autoopt.engine.knobs import Knobs
from autoopt.envs import ENV_ID
from autoopt.policies.export import export_main
from autoopt.policies.guard import GuardedPolicy
from autoopt.policies.runtime import RuntimePolicy
from autoopt.training.callbacks import replaces_kept
from autoopt.training.evaluate import evaluate_main
from autoopt.training.train import load_config, train

SMALL = {
    ENV_ID: {
        "algo": "MaskablePPO",
        "policy": "MlpPolicy",
        "n_timesteps": 512,
        "n_envs": 2,
        "seed": 3,
        # kick-started from AIMD as the shipped config is (a short search, few teacher steps)
        "warm_start": "aimd",
        "warm_start_window_s": 5,
        "kickstart_steps": 256,
        "normalize": "dict(norm_obs=True, norm_reward=True)",
        "n_steps": 128,
        "batch_size": 128,
        "n_epochs": 2,
        "policy_kwargs": "dict(net_arch=[16, 16], activation_fn=nn.Tanh)",
        "env_kwargs": {
            "profile": "h100-gpt2-small",
            "slo_ttft_ms": 500,
            "slo_tpot_ms": 20,
            "episode_steps": 64,
            "iterations_per_step": 2,
            "window_s": 30,
            "randomize": {"traces": ["azure-conv"], "load_scale": [4.0, 8.0], "memory_cap_gib": [2.0, 4.0]},
        },
        "eval": {"freq": 256, "scenarios": [{"trace": "azure-conv", "load_scale": 6.0, "start_s": 0, "duration_s": 8}]},
    }
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train")
    cfg = base / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    return train(cfg, logdir=base / "runs", out="small", progress_bar=False, checkpoint_freq=256)


def _tags(run_dir: Path) -> set[str]:
    """Every tag in the run's real TensorBoard event files, as TensorBoard's loader reads them."""
    tags: set[str] = set()
    for events in (run_dir / "tb").rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_tensorboard_event_files_hold_the_environment_and_eval_tags(run_dir):
    tags = _tags(run_dir)
    for tag in (
        "env/goodput_rps",
        "env/slo_attainment",
        "env/ttft_avg_ms",
        "env/reward_goodput",
        "env/reward_oom",
        "env/reward_rejected",
        "env/reward_switch",
        "eval/goodput_ratio_vs_best_static",
        "eval/goodput_best_static",
        "train/entropy_loss",
        "knobs/max_num_seqs",
        "knobs/attention",
    ):
        assert tag in tags, f"{tag} missing from TensorBoard: {sorted(tags)}"
    assert "_hparams_/experiment" in tags


def test_run_saves_model_checkpoints_and_a_loadable_runtime_policy(run_dir):
    assert (run_dir / "model.zip").exists() and (run_dir / "vecnormalize.pkl").exists()
    assert list((run_dir / "checkpoints").glob("rl_model_*_steps.zip"))
    policy = RuntimePolicy.load(run_dir / "policy")
    assert policy.manifest["env_id"] == ENV_ID and policy.manifest["timesteps"] >= 512
    assert policy.manifest["profile"]["name"] == "h100-gpt2-small" and len(policy.manifest["profile"]["sha256"]) == 64
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())[ENV_ID]
    assert saved["seed"] == 3 and load_config(run_dir / "config.yaml")["n_steps"] == 128
    kick = json.loads((run_dir / "kickstart.json").read_text())
    assert kick["steps"] == 256 and 0.0 <= kick["agreement"] <= 1.0


def test_export_of_a_checkpoint_takes_the_runs_layout_and_its_own_statistics(run_dir, tmp_path):
    """`autoopt export` of a run's checkpoint gives a policy the engine's guard accepts (the
    run's layout, env and seed) that normalises as that checkpoint did, not as the final model."""
    ckpt = min((run_dir / "checkpoints").glob("rl_model_*_steps.zip"), key=lambda p: int(p.stem.split("_")[2]))
    steps = int(ckpt.stem.split("_")[2])
    assert export_main([str(ckpt), "--out", str(tmp_path / "ck"), "--verify", "200"]) == 0
    policy = RuntimePolicy.load(tmp_path / "ck")
    GuardedPolicy(policy, "cuda")  # refuses a policy whose layout is not the engine's
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())[ENV_ID]
    m = policy.manifest
    assert m["env_id"] == ENV_ID and m["env_kwargs"] == saved["env_kwargs"] and m["seed"] == 3
    assert m["timesteps"] == steps and m["source"]["vecnormalize"] == f"rl_model_vecnormalize_{steps}_steps.pkl"
    final = RuntimePolicy.load(run_dir / "policy")
    assert policy.decide_every == final.decide_every and policy.decide_every_s == final.decide_every_s


def test_the_exported_policy_is_the_model_that_validated_best(run_dir, tmp_path):
    """Each held-out validation (during training and once more at its end) is a candidate; the
    export is the selected one (the config's tolerance is 0: the best ratio, the latest on a tie)."""
    ratios = [
        float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
        for events in (run_dir / "tb").rglob("events.out.tfevents.*")
        for event in EventFileLoader(str(events)).Load()
        for v in event.summary.value
        if v.tag == "eval/goodput_ratio_vs_best_static"
    ]
    assert len(ratios) >= 3  # at 256 and 512 steps, and at the end
    chosen = json.loads((run_dir / "eval.json").read_text())
    assert chosen["ratio"] == pytest.approx(max(ratios), rel=1e-6) == chosen["best_ratio"]
    policy = RuntimePolicy.load(run_dir / "policy")
    assert policy.manifest["timesteps"] == chosen["timesteps"] and policy.manifest["evaluation"] == chosen
    again = tmp_path / "best"
    assert export_main([str(run_dir / "best" / "model.zip"), "--out", str(again), "--verify", "0"]) == 0
    assert RuntimePolicy.load(again).manifest["weights_sha256"] == policy.manifest["weights_sha256"]


def test_validation_keeps_the_latest_model_within_the_tolerance_of_the_best():
    best, kept = -math.inf, []
    for step, ratio in enumerate([1.00, 1.06, 1.057, 1.04, math.nan, 1.0601, 1.02]):
        if replaces_kept(ratio, best, tolerance=0.005):
            best = max(best, ratio)
            kept.append(step)
    assert kept == [0, 1, 2, 5] and best == 1.0601
    assert replaces_kept(1.0, 1.0, tolerance=0.0) and not replaces_kept(0.999, 1.0, tolerance=0.0)


def test_resume_continues_from_the_newest_checkpoint(run_dir, tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = train(
        cfg,
        timesteps=768,
        logdir=run_dir.parent,
        out=run_dir.name,
        resume=True,
        progress_bar=False,
        eval_freq=10**9,
        checkpoint_freq=256,
    )
    meta = json.loads((out / "train.json").read_text())
    assert meta["timesteps"] >= 768 + 256  # 512 (or 768) from the checkpoint, then 768 more


def test_bad_config_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"CartPole-v1": {}}))
    with pytest.raises(SystemExit, match="autoopt/InferenceTuning-v0"):
        load_config(bad)


def test_evaluate_accepts_a_trace_file_and_writes_report_and_plots(run_dir, tmp_path, capsys):
    src = Path(__file__).resolve().parents[1] / "engine" / "traces" / "azure_conv_2023_excerpt.csv"
    trace = tmp_path / "mine.csv"
    trace.write_bytes(b"".join(src.read_bytes().splitlines(keepends=True)[:400]))
    report_path, plots = tmp_path / "eval.json", tmp_path / "plots"
    rc = evaluate_main(
        [
            "--policy",
            str(run_dir / "policy"),
            "--trace",
            str(trace),
            "--load-scale",
            "6",
            "--memory-cap",
            "3",
            "--duration",
            "10",
            "--report",
            str(report_path),
            "--plots",
            str(plots),
            "--best-static-on",
            "eval",
        ]
    )
    assert rc == 0
    report = json.loads(report_path.read_text())
    policies = {r["policy"] for r in report["results"]}
    assert policies == {"ppo", "default", "best-static", "aimd", "oracle"}
    for r in report["results"]:
        for key in (
            "goodput_rps",
            "slo_attainment",
            "ttft_p99_ms",
            "tpot_p99_ms",
            "tokens_per_s",
            "ooms",
            "rejected",
            "lost",
        ):
            assert key in r
        assert r["lost"] == 0
    assert list(plots.glob("*.png"))
    assert "best-static" in capsys.readouterr().out


def test_evaluate_takes_one_load_and_cap_per_trace_with_scenario(tmp_path):
    """Traces saturate the card at different load scales: --scenario names each one."""
    report_path = tmp_path / "eval.json"
    argv = "--policy none --baselines default --scenario azure-conv 3 4 --scenario mooncake-conv 5 0 --duration 4"
    rc = evaluate_main([*argv.split(), "--report", str(report_path)])
    assert rc == 0
    got = [(s["trace"], s["load_scale"], s["memory_cap_gib"]) for s in json.loads(report_path.read_text())["scenarios"]]
    assert got == [("azure-conv", 3.0, 4.0), ("mooncake-conv", 5.0, None)]
    with pytest.raises(SystemExit):
        evaluate_main(["--policy", "none", "--baselines", "default", "--scenario", "azure-conv", "heavy", "4"])


def test_evaluate_runs_a_scaled_card_and_its_training_grid_follows_it(tmp_path):
    """--time-scale K runs every policy on the profile's card K times slower: the same
    fixed knobs take longer per token; the best-static grid of the training distribution
    moves with the card (loads / K); a live card cannot be scaled."""
    from autoopt.training.evaluate import training_scenarios

    def tpot(scale: str) -> float:
        path = tmp_path / f"eval-{scale}.json"
        argv = f"--policy none --baselines default --scenario azure-conv 3 4 --duration 6 --time-scale {scale}"
        rc = evaluate_main([*argv.split(), "--report", str(path)])
        report = json.loads(path.read_text())
        assert rc == 0 and report["scenarios"][0].get("time_scale", 1.0) == float(scale)
        return report["results"][0]["tpot_p99_ms"]

    assert tpot("2") > 1.5 * tpot("1")
    env_kwargs = {"randomize": {"load_scale": [10.0, 30.0]}}
    base, slow = training_scenarios(env_kwargs), training_scenarios(env_kwargs, time_scale=2.0)
    assert [s.load_scale / 2 for s in base] == [s.load_scale for s in slow]
    assert all(s.time_scale == 2.0 for s in slow) and all(s.time_scale == 1.0 for s in base)
    with pytest.raises(SystemExit):
        evaluate_main(["--policy", "none", "--baselines", "default", "--backend", "live", "--time-scale", "2"])


def test_the_gpu_scripts_replay_the_shipped_evaluations_best_static_config():
    """The device scripts' `static` replay is what the README compares the policy with on a real
    card: it must be the best-static config the shipped evaluation's search found, with KV slots
    enough for its batch (fewer slots would cap max_num_seqs and change the config)."""
    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "knobs_best_static.json"
    found = json.loads((root / "docs" / "evaluation.json").read_text())["best_static"]
    assert Knobs.from_json_file(path) == Knobs(**found)
    for script in ("gpu_check.sh", "gpu_policies.sh"):
        text = (root / "benchmarks" / script).read_text()
        static = re.findall(r"replay[^\n]*|static\)[^\n]*", text)
        assert any("--knobs benchmarks/knobs_best_static.json" in line for line in static), script
        assert "max_num_seqs" not in text, f"{script} writes knobs of its own"
        slots = [int(n) for n in re.findall(r"--max-slots (\d+)", text)]
        assert slots and min(slots) >= found["max_num_seqs"], (script, slots)
