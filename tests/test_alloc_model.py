"""The allocator model: fitted params from the shipped profile, a synthetic pressure stream, fitting."""

from __future__ import annotations

import numpy as np
import pytest

from autoopt.calibration.alloc_model import (
    AllocatorModel,
    AllocatorState,
    ConfigParams,
    replay_stream,
)
from autoopt.calibration.profile import load_profile

MB = 1e6
WEIGHTS = 340 * MB
MAX_NEED = 740 * MB  # the largest batch's transient
CAP = WEIGHTS + 1.3 * MAX_NEED


@pytest.fixture(scope="module")
def model() -> AllocatorModel:
    return load_profile("h100-gpt2-small").allocator_model()


def pressure_stream(seed: int = 7, steps: int = 250) -> list[float]:
    """Heavy-tailed prompt lengths, random batch sizes, at most 32768 tokens a batch (as the H100 runs)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(340), 0.9, steps), 16, 2048).astype(int)
    batches = rng.integers(1, 65, steps)
    tokens = np.minimum(batches, np.maximum(1, 32768 // lengths)) * lengths
    return (MAX_NEED * tokens / 32768).tolist()


def expected(model, cfg, stream, reclaim_every=0, seeds=range(4)):
    reps = [replay_stream(model, cfg, stream, WEIGHTS, CAP, reclaim_every=reclaim_every, seed=s) for s in seeds]
    return (float(np.mean([r.expected_oom for r in reps])), float(np.mean([r.expected_retries for r in reps])))


def test_pressure_ordering_matches_the_h100(model):
    stream = pressure_stream()
    oom = {}
    retries = {}
    for cfg in ("default", "expandable", "split128", "gc08_split128"):
        oom[cfg], retries[cfg] = expected(model, cfg, stream)
    reclaim_oom, _ = expected(model, "default", stream, reclaim_every=25)
    assert oom["default"] > 5
    assert oom["expandable"] < 1.0  # loses almost none...
    assert retries["expandable"] > retries["default"]  # ...but retries more
    for cfg in ("split128", "gc08_split128"):
        assert oom["expandable"] < oom[cfg] < oom["default"]
    assert reclaim_oom < oom["default"]


def test_no_pressure_means_no_ooms_or_retries(model):
    stream = pressure_stream()
    for cfg in ("default", "expandable", "split128", "gc08_split128"):
        rep = replay_stream(model, cfg, stream, WEIGHTS, 80e9, seed=0)
        assert rep.oom == 0 and rep.retries == 0 and rep.expected_oom < 1e-6


def test_state_is_deterministic_under_a_seed(model):
    stream = pressure_stream(seed=3)

    def run(seed):
        state = AllocatorState(model, "default")
        rng = np.random.default_rng(seed)
        return [state.step(int(WEIGHTS + t), int(CAP), rng) for t in stream]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_reserved_fragmentation_and_reclaim(model):
    state = AllocatorState(model, "default")
    rng = np.random.default_rng(0)
    out = state.step(int(WEIGHTS + 400 * MB), int(80e9), rng, transient_bytes=int(400 * MB))
    assert out.allocated_bytes == int(WEIGHTS)
    assert out.reserved_bytes > out.allocated_bytes + out.fragmentation_bytes
    assert out.fragmentation_bytes > 0  # the default allocator keeps inactive split blocks
    cost = state.reclaim()
    assert cost > 0
    after = state.step(int(WEIGHTS + 1 * MB), int(80e9), rng, transient_bytes=int(1 * MB))
    assert after.reserved_bytes < out.reserved_bytes
    # Reserved never exceeds the cap.
    capped = state.step(int(WEIGHTS + 700 * MB), int(CAP), rng, transient_bytes=int(700 * MB))
    assert capped.reserved_bytes <= CAP


def test_need_beyond_the_cap_always_ooms(model):
    for cfg in ("expandable", "default", "unknown-config"):
        state = AllocatorState(model, cfg)
        out = state.step(2_000, 1_000, np.random.default_rng(0))
        assert out.oom and out.p_oom == 1.0


def test_unknown_config_and_empty_params_fall_back():
    empty = AllocatorModel.from_params({})
    assert empty.config("default") == ConfigParams()
    state = AllocatorState(empty, "default")
    rng = np.random.default_rng(0)
    outs = [state.step(int(WEIGHTS + t), int(CAP), rng, transient_bytes=int(t)) for t in pressure_stream()]
    assert not any(o.oom for o in outs) and sum(o.retries for o in outs) == 0


def test_params_round_trip_and_validation(model):
    again = AllocatorModel.from_params(model.params())
    assert again.params() == model.params()
    bad = model.params()
    del bad["default"]["oom_coef"]
    with pytest.raises(ValueError, match=r"allocator\['default'\].*oom_coef"):
        AllocatorModel.from_params(bad)
    bad = model.params()
    bad["split128"]["gain"] = "lots"
    with pytest.raises(ValueError, match="gain"):
        AllocatorModel.from_params(bad)


def _synthetic_rows(cfg, oom_at, retry_at, stream, seed):
    """Rows as alloc.jsonl writes them for a toy allocator that fails when x passes `oom_at`."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "cfg": cfg,
            "cap_frac": 1.3,
            "reclaim_every": 0,
            "cap_bytes": CAP,
            "weights_bytes": WEIGHTS,
            "max_batch_need_bytes": MAX_NEED,
        }
    ]
    retries = 0
    stuck = 0.1 * MAX_NEED
    for i, t in enumerate(stream):
        x = t / (CAP - WEIGHTS - stuck)
        ok = not (x > oom_at * rng.uniform(0.95, 1.05))
        retries += int(x > retry_at) + int(not ok)
        b = 8
        rows.append(
            {
                "cfg": cfg,
                "cap_frac": 1.3,
                "reclaim_every": 0,
                "step": i,
                "B": b,
                "L": int(t / MAX_NEED * 32768 / b),
                "ok": ok,
                "allocated": WEIGHTS,
                "reserved": WEIGHTS + stuck + t,
                "inactive_split": stuck,
                "retries": retries,
            }
        )
    return rows


def test_fit_learns_which_config_loses_batches():
    stream = [t for t in pressure_stream(seed=5, steps=400) if t > 0]
    rows = _synthetic_rows("fragile", 0.7, 0.6, stream, 1) + _synthetic_rows("sturdy", 5.0, 0.8, stream, 2)
    fitted = AllocatorModel.fit(rows)
    assert set(fitted.configs) == {"fragile", "sturdy"}
    fragile = replay_stream(fitted, "fragile", stream, WEIGHTS, CAP)
    sturdy = replay_stream(fitted, "sturdy", stream, WEIGHTS, CAP)
    measured = sum(not r["ok"] for r in rows if r["cfg"] == "fragile" and "step" in r)
    assert measured > 5
    assert fragile.expected_oom == pytest.approx(measured, rel=0.35)
    assert sturdy.expected_oom < 1.0
    assert fitted.config("fragile").stuck_frac == pytest.approx(0.1 * MAX_NEED / max(stream), rel=0.05)
