"""Knob validation and the discrete knob space the agents act in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoopt.engine.knob_space import (
    ACTION_DIMS,
    LIMIT_BOUNDS,
    action_mask,
    decode_action,
    head_slices,
    knob_position,
    knobs_to_action,
    move_limit,
)
from autoopt.engine.knobs import KnobError, Knobs, not_applicable


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": 2.5}, "integer"),
        ({"max_batched_tokens": -1}, "max_batched_tokens"),
        ({"attention": "fast"}, "attention"),
        ({"precision": "int8"}, "precision"),
        ({"allocator": "huge"}, "allocator"),
        ({"cuda_graphs": "yes"}, "true or false"),
        ({"attention": "flash", "precision": "fp32"}, "bf16 or fp16"),
    ],
)
def test_bad_knob_values_are_refused_with_the_knob_named(bad, message):
    with pytest.raises(KnobError, match=message):
        Knobs(**bad)


def test_unknown_knob_in_json_is_refused(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"max_num_seqs": 8, "turbo": True}))
    with pytest.raises(KnobError, match=r"k.json.*unknown knob.*turbo"):
        Knobs.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(KnobError, match="k.json"):
        Knobs.from_json_file(path)


def test_round_trip_through_json(tmp_path):
    k = Knobs(max_num_seqs=64, attention="efficient", precision="fp32", allocator="expandable")
    path = tmp_path / "k.json"
    path.write_text(json.dumps(k.to_dict()))
    assert Knobs.from_json_file(path) == k


def test_cpu_reports_cuda_only_knobs_as_not_applicable():
    na = not_applicable(Knobs(cuda_graphs=True, attention="cudnn", allocator="expandable"), "cpu")
    assert set(na) == {"cuda_graphs", "attention", "allocator"}
    assert not_applicable(Knobs(cuda_graphs=True), "cuda") == {}


def test_masks_forbid_what_the_device_cannot_run():
    cpu = action_mask("cpu")
    sl = head_slices()
    assert cpu[sl[3]].tolist() == [True, False]  # no CUDA graphs on a CPU
    assert cpu[sl[2]].tolist() == [True, False, True, False]  # flash, math only
    assert action_mask("cuda").all()
    # Against fp32 knobs in force, the half-only kernels are masked.
    m = action_mask("cuda", Knobs(attention="efficient", precision="fp32"))
    assert m[sl[2]].tolist() == [False, True, True, False]
    assert cpu.shape == (sum(ACTION_DIMS),)


def test_invalid_actions_are_repaired_and_flagged_never_raised():
    knobs, flags = decode_action([0, 0, 0, 1, 3, 1, 1], "cuda")  # flash + fp32: invalid pair
    assert knobs.attention == "efficient" and knobs.precision == "fp32" and flags
    knobs, flags = decode_action([99, -3, 0, 1, 0, 0, 0], "cpu")  # moves clipped to x2 and x0.5 from the defaults
    assert (
        knobs.max_num_seqs == 2 * Knobs().max_num_seqs and knobs.max_batched_tokens == Knobs().max_batched_tokens // 2
    )
    assert knobs.cuda_graphs is False and len(flags) == 3
    knobs, flags = decode_action([np.nan] * 7, "cuda")
    assert knobs == Knobs() and flags
    knobs, flags = decode_action([1, 2], "cuda")
    assert knobs == Knobs() and "malformed" in flags[0]


def test_action_round_trip():
    k = Knobs(max_num_seqs=64, max_batched_tokens=8192, attention="cudnn", cuda_graphs=True, precision="fp16")
    knobs, flags = decode_action(knobs_to_action(k, current=k), "cuda", current=k)
    assert knobs == k and not flags
    # From other limits, the action is the move that takes them there.
    start = k.replace(max_num_seqs=32, max_batched_tokens=10240)
    knobs, _ = decode_action(knobs_to_action(k, current=start), "cuda", current=start)
    assert knobs.max_num_seqs == 64 and knobs.max_batched_tokens == 8192


def test_limit_moves_reach_between_table_values_and_stay_in_bounds():
    assert move_limit("max_num_seqs", 100, 1.05) == 105
    assert move_limit("max_num_seqs", 10, 1.05) == 11  # at least one unit
    assert move_limit("max_num_seqs", 10, 0.95) == 9
    assert move_limit("max_num_seqs", 200, 2.0) == LIMIT_BOUNDS["max_num_seqs"][1]
    assert move_limit("max_batched_tokens", 1500, 0.5) == LIMIT_BOUNDS["max_batched_tokens"][0]
    assert move_limit("max_num_seqs", 1000, 1.0) == 1000  # hold keeps a user's own setting
    assert move_limit("max_num_seqs", 1000, 0.95) == LIMIT_BOUNDS["max_num_seqs"][1]
    # 24 moves of x1.05 from 32 land between the table's 64 and 128
    v = 32
    for _ in range(24):
        v = move_limit("max_num_seqs", v, 1.05)
    assert 64 < v < 128


def test_knob_position_interpolates_the_limits_on_a_log_scale():
    assert knob_position("max_num_seqs", 64) == 4.0
    assert knob_position("max_num_seqs", 90) == pytest.approx(4 + np.log2(90 / 64))
    assert knob_position("max_num_seqs", 1) == 0.0 and knob_position("max_num_seqs", 999) == 6.0
    assert knob_position("precision", "fp32") == 3.0


def test_a_knobs_file_saved_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "knobs.json"
    path.write_bytes(b'\xef\xbb\xbf{"max_num_seqs": 8}')  # as Windows editors save
    assert Knobs.from_json_file(path).max_num_seqs == 8
