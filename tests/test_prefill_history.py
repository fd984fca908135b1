"""Prefill history: the fit from calibration's samples, the factor lookup, and the
simulator applying it from the iterations it ran."""

from __future__ import annotations

import json
import math

import pytest

from autoopt.calibration.prefill_history import (
    check_prefill_after,
    fit_prefill_after,
    history_for_mode,
    history_targets,
)
from autoopt.calibration.profile import ProfileError, load_profile, profile_path
from autoopt.calibration.sim_executor import SimExecutor
from autoopt.engine.executor import Batch
from autoopt.engine.knobs import Knobs
from autoopt.engine.request import Request

GAPS = [0, 1, 4, 16]
TABLE = {
    "targets": [[1, 64], [1, 512]],
    "same": [[0.95, 0.95, 0.95, 1.0], [0.8, 0.9, 0.9, 1.0]],
    "other": [[1.1, 1.0, 1.0, 1.2], [1.05, 1.0, 1.1, 1.3]],
}
SPEC = {"gaps": GAPS, "same_within": 0.125, "modes": {"math/fp32": TABLE}}


def tokens(b: int, n: int) -> float:
    return float(b * n)


def test_the_factor_follows_the_last_shape_and_the_gap() -> None:
    h = history_for_mode(SPEC, "math", "fp32", tokens)
    assert h is not None and history_for_mode(SPEC, "flash", "fp32", tokens) is None  # a mode it did not time
    big, small = (1, 512), (1, 64)
    assert h.factor(big, big, 0) == pytest.approx(0.8)
    assert h.factor(big, (1, 480), 0) == pytest.approx(0.8)  # within 1/8 of the length: the same shape
    assert h.factor(big, (1, 440), 0) == pytest.approx(1.05)  # further: another shape
    assert h.factor(big, (2, 512), 0) == pytest.approx(1.05)  # another prompt count: another shape
    assert h.factor(big, small, 1) == pytest.approx(1.0)  # the rows' own condition
    assert h.factor(big, small, 2) == pytest.approx(1.0 + 0.1 / 3)  # linear between measured gaps
    assert h.factor(big, small, 16) == h.factor(big, small, 500) == pytest.approx(1.3)  # flat past the last
    assert h.factor(big, None, 0) == pytest.approx(1.3)  # no prefill yet: another shape, long ago
    assert h.factor(small, small, 0) == pytest.approx(0.95)
    # between the targets, linearly in the log of the working set; flat outside them
    mid = (1, 181)  # ~ the geometric middle of 64 and 512 tokens
    w = math.log(181 / 64) / math.log(512 / 64)
    assert h.factor(mid, mid, 0) == pytest.approx(0.95 + (0.8 - 0.95) * w)
    assert h.factor((1, 8), (1, 8), 0) == pytest.approx(0.95)
    assert h.factor((8, 512), (8, 512), 0) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s, t: s.update(gaps=[1, 0, 4, 16]), "ascending"),
        (lambda s, t: s.update(gaps=[]), "ascending"),
        (lambda s, t: s.update(modes={}), "modes"),
        (lambda s, t: t.update(targets=[[0, 64], [1, 512]]), "B, L >= 1"),
        (lambda s, t: t.update(targets=[[1, 64], [1, 64]]), "distinct"),
        (lambda s, t: s.update(gaps=[0, 2, 4, 16]), "include 1"),
        (lambda s, t: s.update(gaps=[0, 1, 4, 10**9]), "ascending ints in"),
        (lambda s, t: t["same"].pop(), "one row per target"),
        (lambda s, t: t["other"][0].pop(), "one factor per gap"),
        (lambda s, t: t.pop("other"), "other"),
        (lambda s, t: t["same"][0].__setitem__(0, -1.0), r"in \(0, 10\)"),
        (lambda s, t: t["other"][1].__setitem__(2, float("nan")), r"in \(0, 10\)"),
        (lambda s, t: s.update(same_within=1.5), "same_within"),
    ],
)
def test_a_malformed_spec_is_refused(change, match) -> None:
    spec = json.loads(json.dumps(SPEC))
    change(spec, spec["modes"]["math/fp32"])
    with pytest.raises(ValueError, match=match):
        check_prefill_after(spec)


def test_a_profile_with_a_malformed_prefill_after_names_its_file(tmp_path) -> None:
    prof = json.loads(profile_path("cpu-tiny").read_text())
    prof["provenance"]["timing"]["prefill_after"] = {**SPEC, "gaps": [0, 1]}  # 4 factors a row
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(prof))
    with pytest.raises(ProfileError, match=r"bad\.json.*prefill_after"):
        load_profile(str(path))


def test_the_fit_divides_each_target_by_its_own_reference() -> None:
    """Two kernels time the same target at different speeds: each gets its own table of ratios."""
    samples = {}
    for prec, speed in (("fp32", 1.0), ("bf16", 3.0)):
        for same, factors in ((True, [0.8, 0.9, 0.9, 1.0]), (False, [1.1, 1.0, 1.05, 1.2])):
            for gap, f in zip(GAPS, factors, strict=True):
                samples[(prec, "math", 1, 512, same, gap)] = [10.0 * speed * f, 10.0 * speed * f * 1.02]
    samples[("fp32", "math", 2, 64, True, 0)] = [5.0]  # no reference samples: left out
    out = fit_prefill_after(samples, GAPS)
    assert out["gaps"] == GAPS and set(out["modes"]) == {"math/fp32", "math/bf16"}
    for table in out["modes"].values():  # each kernel's own, its speed divided out
        assert table["targets"] == [[1, 512]]
        assert table["same"] == [pytest.approx([0.8, 0.9, 0.9, 1.0], abs=1e-4)]
        assert table["other"] == [pytest.approx([1.1, 1.0, 1.05, 1.2], abs=1e-4)]
    assert fit_prefill_after({("fp32", "math", 1, 8, True, 0): [1.0]}, GAPS) is None
    # a target missing a condition (its pass was cut) is left out, not written as neutral
    cut = {k: v for k, v in samples.items() if k != ("bf16", "math", 1, 512, True, 16)}
    assert set(fit_prefill_after(cut, GAPS)["modes"]) == {"math/fp32"}
    check_prefill_after(out)  # what the fit writes, the simulator reads


def test_targets_spread_over_the_working_sets() -> None:
    points = [(b, n) for b in (1, 2, 4, 8) for n in (16, 64, 256)]
    picks = history_targets(points, 3, tokens)
    sizes = sorted(tokens(*p) for p in points)
    assert len(picks) == 3 and len(set(picks)) == 3
    picked = sorted(tokens(*p) for p in picks)
    assert sizes[0] < picked[0] and picked[-1] < sizes[-1]  # the ends are left out
    assert picked[0] <= sizes[len(sizes) // 2] <= picked[-1]
    assert history_targets(points, 0, tokens) == [] and history_targets([], 3, tokens) == []


def _sim(prefill_after) -> SimExecutor:
    prof = json.loads(profile_path("cpu-tiny").read_text())
    timing = prof["provenance"]["timing"]
    timing.pop("prefill_after", None)
    if prefill_after is not None:
        timing["prefill_after"] = prefill_after
    from autoopt.calibration.profile import Profile

    sim = SimExecutor(Profile.from_dict(prof), max_slots=8, seed=0)
    sim.apply_knobs(None, Knobs(attention="math", precision="fp32"))
    return sim


def test_the_simulator_scales_a_prefill_by_what_ran_before_it() -> None:
    """Back to back, a repeated shape takes its 'same' factor at gap 0; after 16 decode-only
    iterations, the 'other' factor of the last gap; a profile without the field, the row."""
    table = {"targets": [[1, 256]], "same": [[0.8, 0.85, 0.9, 0.95]], "other": [[1.1, 1.0, 1.05, 1.25]]}
    flat = {"gaps": GAPS, "modes": {"math/fp32": table}}
    plain, hist = _sim(None), _sim(flat)
    runner = Request(99, 0.0, 16, 10**6)

    def prefill(sim: SimExecutor, rid: int) -> float:
        return sim.iteration_ms(Batch([Request(rid, 0.0, 300, 1)], [], 300, 0))

    def decode(sim: SimExecutor) -> float:
        return sim.iteration_ms(Batch([], [runner], 0, runner.context_len))

    row = prefill(plain, 0)
    assert prefill(plain, 1) == row  # no history: every prefill takes its row
    assert prefill(hist, 0) == pytest.approx(row * 1.25)  # the first: another shape, long ago
    assert prefill(hist, 1) == pytest.approx(row * 0.8)  # same shape, back to back
    assert decode(hist) == decode(plain)  # decode steps are left as they were
    assert prefill(hist, 2) == pytest.approx(row * 0.85)  # same shape, one decode step between
    for _ in range(16):
        decode(hist)
    assert prefill(hist, 3) == pytest.approx(row * 0.95)
    other = hist.iteration_ms(Batch([Request(4, 0.0, 64, 1)], [], 64, 0))
    row64 = plain.iteration_ms(Batch([Request(4, 0.0, 64, 1)], [], 64, 0))
    assert other == pytest.approx(row64 * 1.1)  # another shape, back to back


def test_the_shipped_cpu_profile_measured_its_history() -> None:
    """`cpu-tiny` was calibrated with the history pass, per kernel and precision: its
    factors are 1 at the rows' own condition (another shape, one decode step between)."""
    timing = load_profile(str(profile_path("cpu-tiny"))).provenance["timing"]
    after = timing["prefill_after"]
    assert after["gaps"][1] == 1
    assert set(after["modes"]) == {"math/fp32", "flash/fp32", "math/bf16", "flash/bf16"}
    for table in after["modes"].values():
        assert len(table["targets"]) >= 3 and all(row[1] == 1.0 for row in table["other"])


def test_calibration_times_each_target_exactly_gap_decode_steps_after_its_predecessor() -> None:
    """The link the simulator relies on: in the history pass every timed prefill follows
    another prefill with exactly `gap` decode-only iterations between (the background
    sequence never restarts, which would be a prefill, in between)."""
    import torch

    from autoopt.calibration.grid import default_grid, grid_points, merge_grid
    from autoopt.calibration.grid_run import GridRun, _Background
    from autoopt.calibration.measure import Clock
    from autoopt.engine.model import PRESETS
    from autoopt.engine.torch_executor import TorchExecutor

    g = merge_grid(default_grid("cpu"), {"prefill": {"B": [1, 2], "L": [8, 16, 32]}, "runs": 2})
    g.update(history_targets=2, history_gaps=[0, 1, 3])
    ex = TorchExecutor("tiny", "cpu", max_slots=3, max_context=40, knobs=Knobs(precision="fp32", attention="math"))
    log: list[str] = []
    run = ex.execute

    def execute(batch):  # P: a grid prefill, R: the background's restart, D: decode only
        kind = "D" if not batch.prefill else "R" if batch.prefill[0].rid == _Background.RID else "P"
        log.append(kind)
        return run(batch)

    ex.execute = execute

    class Bar:
        def update(self, n: int = 1) -> None: ...
        def set_postfix_str(self, s: str) -> None: ...

    timed: list[tuple[int, int]] = []  # (gap, position in the log) of each timed sample

    class History(dict):
        def setdefault(self, key, default=None):
            timed.append((key[-1], len(log)))
            return super().setdefault(key, default)

    kernels = {"math/fp32": dict(ex.effective_kernels)}
    gr = GridRun(ex, PRESETS["tiny"], torch.device("cpu"), g, Clock(None), Bar(), [], kernels)
    gr.history = History()
    pre_pts, _ = grid_points(g, [False])
    assert gr._history_pass("fp32", "math", pre_pts) is False
    assert len(timed) == 2 * 2 * 3 * 2  # targets x (same, other) x gaps x runs
    assert "R" in log  # a context of 40 runs out: the background restarted, between samples
    for gap, end in timed:
        assert log[end - gap - 2 : end] == ["P", *["D"] * gap, "P"], (gap, log[end - gap - 3 : end])
    after = fit_prefill_after(gr.history, g["history_gaps"])
    assert after is not None and len(after["modes"]["math/fp32"]["targets"]) == 2
