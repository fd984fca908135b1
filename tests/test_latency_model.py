"""The latency model on the shipped H100 profile's rows (no dependency on /work/shared)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from autoopt.calibration.latency_model import (
    LatencyModel,
    leave_edge_out,
    leave_group_out,
    leave_one_out,
    normalise_row,
)
from autoopt.calibration.profile import load_profile

BACKENDS = ("flash", "efficient", "math", "cudnn")
PRECISIONS = ("bf16", "fp16", "fp32_tf32", "fp32")


@pytest.fixture(scope="module")
def profile():
    return load_profile("h100-gpt2-small")


@pytest.fixture(scope="module")
def model(profile):
    return LatencyModel.fit(profile.prefill, profile.decode)


def _predict(model, row, kind):
    return model.row_ms(normalise_row(row, kind), kind)


def _lines(rows, kind):
    """group -> line (L or C) -> {B: ms}"""
    second = "L" if kind == "prefill" else "C"
    out = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        out[(r["backend"], r["precision"], bool(r.get("cuda_graphs")))][r[second]][r["B"]] = r["ms"]
    return out


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_reproduces_every_fitted_point(profile, model, kind):
    rows = getattr(profile, kind)
    for r in rows:
        assert _predict(model, r, kind) == pytest.approx(r["ms"], rel=1e-6)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_monotone_in_batch_and_length_where_the_data_are(profile, model, kind):
    """Between two measured neighbours that rise, the prediction never dips (in B, and across L/C)."""
    checked = 0
    for key, lines in _lines(getattr(profile, kind), kind).items():
        backend, precision, graphs = key

        def f(b, x, backend=backend, precision=precision, graphs=graphs):
            if kind == "prefill":
                return model.prefill_ms(b, x, backend, precision)
            return model.decode_ms(b, x, backend, precision, graphs)

        for x, pts in lines.items():
            bs = sorted(pts)
            for b0, b1 in zip(bs, bs[1:], strict=False):
                if pts[b1] >= pts[b0]:
                    ys = [f(b, x) for b in np.geomspace(b0, b1, 25)]
                    assert all(y1 >= y0 * (1 - 1e-9) for y0, y1 in zip(ys, ys[1:], strict=False)), (key, x, b0, b1)
                    checked += 1
        xs = sorted(lines)
        for x0, x1 in zip(xs, xs[1:], strict=False):
            for b in set(lines[x0]) & set(lines[x1]):
                if lines[x1][b] >= lines[x0][b]:
                    ys = [f(b, x) for x in np.geomspace(x0, x1, 25)]
                    assert all(y1 >= y0 * (1 - 1e-9) for y0, y1 in zip(ys, ys[1:], strict=False)), (key, b, x0, x1)
                    checked += 1
    assert checked > 50


def test_off_grid_and_unseen_combinations_are_finite_and_positive(model):
    for backend in (*BACKENDS, "no-such-kernel"):
        for precision in (*PRECISIONS, "int3"):
            for b, x in ((1000, 16000), (1, 1), (0, 0), (3, 777), (4096, 100_000)):
                values = [
                    model.prefill_ms(b, x, backend, precision),
                    model.decode_ms(b, x, backend, precision, False),
                    model.decode_ms(b, x, backend, precision, True),
                    model.capture_ms(b, x, backend, precision),
                ]
                assert all(math.isfinite(v) and v > 0 for v in values), (backend, precision, b, x, values)


def test_extrapolation_grows_beyond_the_grid(model):
    assert model.prefill_ms(1000, 16000) > 10 * model.prefill_ms(128, 1024)
    assert model.prefill_ms(64, 8192, "math") > model.prefill_ms(64, 2048, "math")
    assert model.decode_ms(1024, 16384, cuda_graphs=True) > model.decode_ms(256, 4096, cuda_graphs=True)


def test_unseen_combinations_follow_fitted_ratios(model):
    # fp32 is never cheaper than bf16 when compute-bound, for a backend only measured in bf16.
    assert model.prefill_ms(64, 2048, "cudnn", "fp32") > 2 * model.prefill_ms(64, 2048, "cudnn", "bf16")
    # Decode was only measured in bf16: fp16 moves the same bytes; fp32 reads twice as many.
    bf16 = model.decode_ms(64, 4096, "flash", "bf16", True)
    assert model.decode_ms(64, 4096, "flash", "fp16", True) == pytest.approx(bf16, rel=0.3)
    assert model.decode_ms(64, 4096, "flash", "fp32", True) > 1.5 * bf16
    # CUDA graphs help most at small batch, as measured.
    assert model.decode_ms(1, 256, "flash", "fp16", False) > 2 * model.decode_ms(1, 256, "flash", "fp16", True)


def test_families_without_rows_still_predict():
    prefill_only = LatencyModel.fit([{"B": 1, "L": 128, "backend": "flash", "precision": "bf16", "ms": 5.0}], [])
    assert prefill_only.decode_ms(8, 1024) > 0
    empty = LatencyModel.fit([], [])
    assert empty.prefill_ms(4, 256) > 0 and empty.capture_ms(4) > 0


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="'ms'"):
        normalise_row({"B": 1, "L": 2, "backend": "flash", "precision": "bf16"}, "prefill")
    with pytest.raises(ValueError, match="positive"):
        normalise_row({"B": 1, "C": 2, "backend": "flash", "precision": "bf16", "ms": -1}, "decode")
    with pytest.raises(ValueError, match="prefill row 1"):
        LatencyModel.fit([{"B": 1, "L": 8, "backend": "flash", "precision": "bf16", "ms": 1.0}, {"B": 0, "L": 8}], [])


def _mape(pairs):
    return 100.0 * sum(abs(p - r["ms"]) / r["ms"] for r, p in pairs) / len(pairs)


def test_leave_group_out_predicts_each_group_without_its_rows(profile, model):
    """Each group's rows come back once, predicted by a fit that never saw them: the full fit
    reproduces a measured row, the group-out fit does not (it is the completion from the
    other groups), and the prediction is still finite and positive."""
    held = leave_group_out(profile.prefill, "prefill")
    assert set(held) == {(r["backend"], r["precision"]) for r in profile.prefill}
    assert sum(len(v) for v in held.values()) == len(profile.prefill)
    for key, pairs in held.items():
        assert all((r["backend"], r["precision"]) == key for r, _ in pairs)
        assert all(math.isfinite(p) and p > 0 for _, p in pairs)
        assert _mape([(r, _predict(model, r, "prefill")) for r, _ in pairs]) < 1e-6
        assert _mape(pairs) > 1.0
    decode = leave_group_out(profile.decode, "decode")
    assert set(decode) == {(r["backend"], r["precision"], r["cuda_graphs"]) for r in profile.decode}


@pytest.fixture(scope="module")
def edge_out(profile):
    return {kind: leave_edge_out(getattr(profile, kind), kind) for kind in ("prefill", "decode")}


def test_leave_edge_out_predicts_the_largest_value_of_each_axis_from_the_rows_below(profile, model, edge_out):
    """The rows at an axis's largest value come back, predicted by a fit that saw only smaller
    values on that axis: the full fit reproduces them, the edge-out fit does not. An axis
    measured at two values (the shared decode rows' contexts) is not held out."""
    assert set(edge_out["prefill"]) == {"B", "L"} and set(edge_out["decode"]) == {"B"}
    for kind, second in (("prefill", "L"), ("decode", "C")):
        rows = getattr(profile, kind)
        for axis in ("B", second):
            values = sorted({r[axis] for r in rows})
            if len(values) < 3:
                assert axis not in edge_out[kind]
                continue
            edge, below, pairs = edge_out[kind][axis]
            assert (edge, below) == (values[-1], values[-2])
            assert len(pairs) == sum(r[axis] == edge for r in rows) and all(r[axis] == edge for r, _ in pairs)
            assert all(math.isfinite(p) and p > 0 for _, p in pairs)
            assert _mape([(r, _predict(model, r, kind)) for r, _ in pairs]) < 1e-6
            assert _mape(pairs) > 0.5


def test_a_step_beyond_the_measured_prefill_grid_stays_near_the_measurement(edge_out):
    """Prefill one doubling past the batches or lengths a fit saw: the launch floor and the
    compute and attention slopes carry it (measured on the H100 rows: 3.6% and 4.5% MAPE)."""
    for axis, (_, _, pairs) in edge_out["prefill"].items():
        assert _mape(pairs) < 10.0, axis


def test_leave_one_out_on_a_subsample_is_within_the_limits(profile):
    pre = profile.prefill
    bf16 = [i for i, r in enumerate(pre) if r["precision"] == "bf16"][::5]
    prefill = leave_one_out(pre, "prefill", bf16)
    assert _mape(prefill) <= 10.0
    decode = leave_one_out(profile.decode, "decode", range(0, len(profile.decode), 3))
    graphs = [(r, p) for r, p in decode if r["cuda_graphs"]]
    eager = [(r, p) for r, p in decode if not r["cuda_graphs"]]
    assert _mape(graphs) <= 10.0
    assert _mape(eager) <= 20.0
