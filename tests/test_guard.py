"""The guard: a policy that raises, returns garbage or asks for the impossible never loses a request."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoopt.agents.learned import LearnedPolicy
from autoopt.cli import main
from autoopt.engine.engine import Engine
from autoopt.engine.knob_space import ACTION_DIMS, LIMIT_MOVES, knobs_to_action
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request
from autoopt.engine.telemetry import SLO
from autoopt.engine.torch_executor import TorchExecutor
from autoopt.envs.scenario import Scenario, build_engine
from autoopt.policies import resolve_policy
from autoopt.policies.guard import GuardedPolicy
from autoopt.policies.runtime import RuntimePolicy
from autoopt.training.evaluate import run_policy

SAFE = Knobs(attention="math", precision="fp32", max_num_seqs=8)


class Raising:
    def act(self, obs, mask=None):
        raise RuntimeError("boom")


class Garbage:
    def __init__(self, value):
        self.value = value

    def act(self, obs, mask=None):
        return self.value


class Fixed:
    def __init__(self, knobs: Knobs):
        self.action = knobs_to_action(knobs)

    def act(self, obs, mask=None):
        return self.action


def _replay(policy, n: int = 12) -> tuple[dict, GuardedPolicy]:
    guard = GuardedPolicy(policy, "cpu", fallback=SAFE)
    reqs = [Request(rid=i, arrival_s=0.01 * i, prompt_len=16 + i, output_len=4) for i in range(n)]
    engine = Engine(TorchExecutor("tiny", device="cpu", max_slots=8), reqs, SAFE, controller=guard)
    report = engine.run()
    return report, guard


@pytest.mark.parametrize(
    "policy, reason",
    [
        (Raising(), "policy raised RuntimeError"),
        (Garbage(np.full(len(ACTION_DIMS), np.nan)), "action malformed or not finite"),
        (Garbage([1, 2, 3]), "action malformed or not finite"),
        (Garbage(np.array(ACTION_DIMS)), "action index out of range"),
        (Garbage("not an action"), "policy raised ValueError"),
        (Fixed(Knobs(cuda_graphs=True)), "action forbidden by the masks"),  # no CUDA graphs on a CPU
    ],
)
def test_failing_policy_falls_back_and_loses_nothing(policy, reason):
    report, guard = _replay(policy)
    assert report["completed"] == report["arrived"] == 12 and report["rejected"] == 0
    assert guard.fallbacks == report["fallbacks"] == report["iterations"] > 0
    assert set(guard.reasons) == {reason}
    assert report["knobs"] == SAFE.to_dict()


def test_non_finite_observation_falls_back():
    guard = GuardedPolicy(Fixed(SAFE), "cpu", fallback=SAFE)
    reqs = [Request(rid=i, arrival_s=0.0, prompt_len=16, output_len=3) for i in range(4)]
    engine = Engine(TorchExecutor("tiny", device="cpu", max_slots=8), reqs, SAFE, controller=guard)
    engine.telemetry.slo_avg = float("nan")
    report = engine.run()
    assert guard.reasons["observation not finite"] >= 1 and report["completed"] == 4


def test_costly_switches_are_rate_limited():
    class Flipping:
        def __init__(self):
            self.n = 0

        def act(self, obs, mask=None):
            self.n += 1
            return knobs_to_action(SAFE.replace(precision="bf16" if self.n % 2 else "fp32"))

    guard = GuardedPolicy(Flipping(), "cpu", fallback=SAFE, max_costly_switches_per_s=0.0)
    report, _ = _replay_with(guard)
    assert guard.held_switches > 0 and report["switch_counts"].get("precision", 0) == 0
    assert report["completed"] == report["arrived"]


def _replay_with(guard: GuardedPolicy) -> tuple[dict, GuardedPolicy]:
    reqs = [Request(rid=i, arrival_s=0.01 * i, prompt_len=16, output_len=4) for i in range(8)]
    engine = Engine(TorchExecutor("tiny", device="cpu", max_slots=8), reqs, SAFE, controller=guard)
    return engine.run(), guard


def test_replay_cli_with_the_shipped_policy(tmp_path):
    out = tmp_path / "r.json"
    rc = main(
        [
            "replay",
            "--trace",
            "poisson:rate=20,duration=4",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--duration",
            "4",
            "--policy",
            str(resolve_policy("h100-gpt2-small")),
            "--report",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["balanced"]
    assert report["arrived"] == report["completed"] + report["queued"] + report["running"] + report["rejected"]
    assert report["knobs"]["cuda_graphs"] is False  # the CPU masks held
    assert "fallbacks" in report and report["kernel_margin"] == 0.1 and report["kernel_holds"] >= 0
    # the policy read the card: the CPU runs math and flash, not the CUDA-only kernels
    card = report["card_ms"]
    assert card["math"] > 0 and card["flash"] > 0 and card["cudnn"] is None


def test_shipped_policy_loads_and_matches_the_engine_layout():
    from autoopt.engine.features import FEATURE_NAMES

    policy = RuntimePolicy.load(resolve_policy("h100-gpt2-small"), expected_features=list(FEATURE_NAMES))
    assert policy.action_dims == ACTION_DIMS


class Counting:
    """Doubles and halves the sequence limit in turn and counts how often it is asked."""

    def __init__(self):
        self.calls = 0

    def act(self, obs, mask=None):
        self.calls += 1
        action = knobs_to_action(SAFE.replace(reclaim=self.calls == 1))
        action[0] = LIMIT_MOVES.index(2.0 if self.calls % 2 else 0.5)
        return action


def test_guard_decides_every_n_iterations_and_holds_between():
    """A policy trained at one decision per n iterations is asked at that cadence; the
    knobs hold in between, and a one-shot reclaim is not repeated while they hold."""
    policy = Counting()
    # masks of a CUDA device, where reclaim is a real action (the CPU engine ignores it)
    guard = GuardedPolicy(policy, "cuda", fallback=SAFE, decide_every=4)
    reqs = [Request(rid=i, arrival_s=0.0, prompt_len=8, output_len=10) for i in range(3)]
    answers = []

    def controller(engine):
        answers.append(guard(engine))
        return answers[-1]

    engine = Engine(TorchExecutor("tiny", device="cpu", max_slots=8), reqs, SAFE, controller=controller)
    assert engine.run()["completed"] == 3
    n = len(answers)
    assert n > 8 and policy.calls == -(-n // 4)  # ceil: asked on calls 0, 4, 8, ...
    limits = [k.max_num_seqs for k in answers]
    assert all(len(set(limits[i : i + 4])) == 1 for i in range(0, n, 4))
    assert limits[0] == 16 and limits[4] == 8  # moves from the limit in force (8): x2, then x0.5
    assert [k.reclaim for k in answers].count(True) == 1


def test_guard_rejects_a_bad_cadence():
    with pytest.raises(ValueError, match="decide_every"):
        GuardedPolicy(Counting(), "cpu", decide_every=0)


def test_guard_decides_every_t_seconds_of_engine_time():
    """A policy trained on steps of t seconds is asked at the first iteration t seconds
    after its last decision, however long the iterations are."""
    policy = Counting()
    guard = GuardedPolicy(policy, "cuda", fallback=SAFE, decide_every_s=0.01)
    reqs = [Request(rid=i, arrival_s=0.0, prompt_len=8, output_len=40) for i in range(3)]
    times, decided = [], []

    def controller(engine):
        before = policy.calls
        knobs = guard(engine)
        times.append(engine.now_s)
        decided.append(policy.calls > before)
        return knobs

    engine = Engine(TorchExecutor("tiny", device="cpu", max_slots=8), reqs, SAFE, controller=controller)
    assert engine.run()["completed"] == 3
    at = [t for t, d in zip(times, decided, strict=True) if d]
    assert decided[0] and len(at) >= 2
    assert all(b - a >= 0.01 for a, b in zip(at, at[1:], strict=False))
    # and no call that came 0.01 s after the last decision went unanswered
    last = at[0]
    for t, d in zip(times, decided, strict=True):
        if d:
            last = t
        else:
            assert t - last < 0.01
    with pytest.raises(ValueError, match="decide_every_s"):
        GuardedPolicy(Counting(), "cpu", decide_every_s=0.0)


def test_guard_asks_a_runtime_policy_at_the_cadence_its_manifest_records():
    """Unless told otherwise, the guard takes the cadence the policy was trained at (the
    shipped policy: steps of 50 ms of engine time); a plain actor is asked every iteration."""
    policy = RuntimePolicy.load(resolve_policy("h100-gpt2-small"))
    assert policy.decide_every_s == pytest.approx(0.05)
    guard = GuardedPolicy(policy, "cuda")
    assert (guard.decide_every, guard.decide_every_s) == (policy.decide_every, policy.decide_every_s)
    told = GuardedPolicy(policy, "cuda", decide_every=4, decide_every_s=0.2)
    assert (told.decide_every, told.decide_every_s) == (4, 0.2)
    plain = GuardedPolicy(Counting(), "cpu")
    assert (plain.decide_every, plain.decide_every_s) == (1, None)


@pytest.mark.parametrize("hold_s, precision_at_end", [(10.0, "fp32"), (0.0, "bf16")])
def test_a_switch_the_engine_refused_is_not_asked_again_within_the_hold(hold_s, precision_at_end):
    """A precision cast out of memory (the drill: one injected OOM) is refused by the engine;
    the policy keeps asking for bf16. Within the hold the guard answers with what runs (fp32)
    even between decisions, where it used to hand the engine the refused knobs every
    iteration; with no hold the next decision tries again, and the cast now goes through."""
    guard = GuardedPolicy(
        Fixed(SAFE.replace(precision="bf16")),
        "cpu",
        fallback=SAFE,
        decide_every=4,
        max_costly_switches_per_s=1e9,
        refused_hold_s=hold_s,
    )
    ex = TorchExecutor("tiny", device="cpu", max_slots=8)
    reqs = [Request(rid=i, arrival_s=0.01 * i, prompt_len=16, output_len=4) for i in range(8)]
    engine = Engine(ex, reqs, SAFE, controller=guard)
    ex.inject_oom_next(where="precision")
    report = engine.run()
    assert guard.refused_switches == 1
    assert report["knobs"]["precision"] == precision_at_end and ex.knobs.precision == precision_at_end
    assert report["completed"] == report["arrived"] == 8


FLASH = Knobs(attention="flash", precision="bf16", cuda_graphs=True, max_num_seqs=32)


def _sim_engine(profile: str, guard: GuardedPolicy, knobs: Knobs = FLASH) -> Engine:
    s = Scenario("azure-conv", load_scale=8.0, memory_cap_gib=8.0, profile=profile, duration_s=5.0)
    return build_engine(s, SLO(0.5, 0.02), knobs, controller=guard)


@pytest.mark.parametrize(
    "profile, margin, runs",
    [
        ("h100-gpt2-small", 0.1, "flash"),  # the probe timed cuDNN 35% slower than flash on this card
        ("h100-gpt2-small", math.inf, "cudnn"),  # no check: the policy's word
        ("h100-gpt2-small-engine", 0.1, "cudnn"),  # on this card cuDNN is the faster: let through
    ],
)
def test_a_switch_to_a_kernel_the_card_probe_timed_slower_is_held_back(profile, margin, runs):
    guard = GuardedPolicy(Fixed(FLASH.replace(attention="cudnn")), "cuda", fallback=FLASH, kernel_margin=margin)
    engine = _sim_engine(profile, guard)
    for _ in range(30):
        engine.step()
    assert engine.knobs.attention == runs
    assert guard.kernel_holds == (30 if runs == "flash" else 0)
    assert engine.knobs.cuda_graphs and engine.knobs.precision == "bf16"


def test_the_bar_is_the_kernel_in_force():
    """From math, cuDNN is faster on this card and goes through, though flash (the fallback)
    is faster still; then a switch back to math, far slower than cuDNN, is held."""
    math_in_force = FLASH.replace(attention="math", cuda_graphs=False)

    class CudnnThenMath:
        def __init__(self):
            self.n = 0

        def act(self, obs, mask=None):
            self.n += 1
            kernel = "cudnn" if self.n <= 3 else "math"
            return knobs_to_action(math_in_force.replace(attention=kernel))

    guard = GuardedPolicy(CudnnThenMath(), "cuda", fallback=FLASH, kernel_margin=0.1, max_costly_switches_per_s=1e9)
    engine = _sim_engine("h100-gpt2-small", guard, math_in_force)
    card = engine.card
    assert card["flash"] * 1.1 < card["cudnn"] < card["math"]
    engine.step()
    assert engine.knobs.attention == "cudnn" and guard.kernel_holds == 0
    for _ in range(5):
        engine.step()
    assert engine.knobs.attention == "cudnn" and guard.kernel_holds == 3


def test_a_held_kernel_holds_alone():
    """Efficient in fp16 and 64 sequences, from flash in bf16, with no margin: efficient's
    reference step is a little slower, so flash stays; the precision and the batch limits
    follow the policy."""
    asked = FLASH.replace(attention="efficient", precision="fp16")
    guard = GuardedPolicy(Fixed(asked), "cuda", fallback=FLASH, kernel_margin=0.0)
    engine = _sim_engine("h100-gpt2-small", guard)
    assert engine.card["efficient"] > engine.card["flash"]
    engine.step()
    assert engine.knobs == asked.replace(attention="flash") and guard.kernel_holds == 1


def test_the_shipped_policy_on_a_card_3x_slower_keeps_the_kernel_the_probe_found_faster():
    """On the shared H100 profile run 3x slower, the shipped policy reads the card as the slow
    card it trained on and asks for that card's kernel (cuDNN), which the probe timed 35%
    slower than flash here: the check keeps flash, and the batches it sets serve far more."""
    s = Scenario("azure-conv", load_scale=22 / 3, memory_cap_gib=8.0, duration_s=30.0, time_scale=3.0)
    slo = SLO(0.5, 0.02)
    actor = RuntimePolicy.load(resolve_policy("h100-gpt2-small"))
    runs = {}
    for margin in (0.1, math.inf):
        policy = LearnedPolicy(actor, "cuda", kernel_margin=margin)
        report, series = run_policy(policy, s, slo, seed=0)
        runs[margin] = (report, policy.guard, series)
    (checked, guard, _), (free, unchecked, _) = runs[0.1], runs[math.inf]
    assert guard.kernel_holds > 0 and unchecked.kernel_holds == 0
    assert checked["knobs"]["attention"] == "flash" and free["knobs"]["attention"] == "cudnn"
    assert checked["goodput_rps"] > 2 * free["goodput_rps"]
    for report in (checked, free):
        assert report["lost"] == 0
        assert report["arrived"] == report["completed"] + report["queued"] + report["running"] + report["rejected"]


@pytest.mark.parametrize("margin", [-0.1, float("nan")])
def test_a_bad_kernel_margin_is_refused(margin):
    with pytest.raises(ValueError, match="kernel_margin"):
        GuardedPolicy(Fixed(SAFE), "cpu", kernel_margin=margin)


@pytest.mark.parametrize("command", ["replay", "evaluate"])
def test_the_cli_refuses_a_negative_kernel_margin(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--kernel-margin", "-0.5"])
    assert exit_.value.code == 2 and "--kernel-margin" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, margin, held",
    [([], 0.1, True), (["--kernel-margin", "0.5"], 0.5, False), (["--no-kernel-check"], None, False)],
)
def test_the_evaluate_flags_reach_the_guard(tmp_path, flags, margin, held):
    """The shipped policy on a card 3x slower asks for cuDNN, which the probe timed 35%
    slower than flash there: held at a margin of 0.1, let through at 0.5 or with no check;
    the report says which margin ran."""
    out = tmp_path / "e.json"
    argv = ["evaluate", "--policy", "h100-gpt2-small", "--baselines", "", "--time-scale", "3", "--duration", "10"]
    rc = main(argv + ["--scenario", "azure-conv", "7.333", "8", "--report", str(out), *flags])
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert rc == 0 and report["kernel_margin"] == margin
    assert (row["kernel_holds"] > 0) == held


def test_the_kernel_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--no-kernel-check", "--kernel-margin", "0.2"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
