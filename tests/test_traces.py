"""Tests for autoopt.engine.traces: loaders, transforms, synthetic generators and specs."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from autoopt.engine.request import Request, RequestState
from autoopt.engine.traces import (
    SHIPPED_TRACES,
    TRACE_DIR,
    Trace,
    TraceError,
    bursty,
    list_traces,
    load_azure_csv,
    load_burstgpt_csv,
    load_mooncake_jsonl,
    load_trace,
    poisson,
    ramp,
)
from autoopt.engine.traces.trace import MAX_TOKENS

AZURE = TRACE_DIR / "azure_conv_2023_excerpt.csv"
MOONCAKE = TRACE_DIR / "mooncake_conv_excerpt.jsonl"


def small(arrivals, prompts, outputs, name="t") -> Trace:
    return Trace(name, np.array(arrivals, float), np.array(prompts), np.array(outputs), "test")


# --------------------------------------------------------------------------- vendored files


def test_vendored_azure_matches_raw_rows():
    with AZURE.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    assert rows[1] == ["2023-11-16 18:15:46.6805900", "374", "44"]
    assert len(rows) - 1 == 5985
    # Upstream lines are CRLF-terminated; the excerpt keeps them byte for byte.
    assert AZURE.read_bytes().startswith(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,374,44\r\n"
    )

    t = load_trace("azure-conv")
    assert t.name == "azure-conv"
    assert len(t) == 5985
    assert t.arrival_s[0] == 0.0
    assert (t.prompt_len[0], t.output_len[0]) == (374, 44)
    # Second row is 18:15:50.9951690: 4.3145790 s after the first, all 7 digits kept.
    assert t.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert t.prompt_len.tolist() == [int(r[1]) for r in rows[1:]]
    assert t.output_len.tolist() == [int(r[2]) for r in rows[1:]]
    assert 1190 < t.duration_s < 1200
    assert np.all(np.diff(t.arrival_s) >= 0)
    assert t.arrival_s.dtype == np.float64 and t.prompt_len.dtype == np.int64
    assert (t.clipped_prompts, t.clipped_outputs) == (0, 0)


def test_vendored_mooncake_matches_raw_rows():
    rows = [json.loads(line) for line in MOONCAKE.read_text().splitlines()]
    assert len(rows) == 3658
    assert rows[0] == {"timestamp": 0, "input_length": 6758, "output_length": 500}
    assert all("hash_ids" not in r for r in rows)
    assert max(r["timestamp"] for r in rows) < 1_200_000

    raw = load_mooncake_jsonl(MOONCAKE, spread_buckets=False)
    assert len(raw) == 3658
    assert raw.arrival_s.tolist() == [r["timestamp"] / 1000 for r in rows]
    assert raw.prompt_len.tolist() == [r["input_length"] for r in rows]
    assert raw.output_len.tolist() == [r["output_length"] for r in rows]

    t = load_trace("mooncake-conv")
    assert len(t) == 3658 and t.name == "mooncake-conv"
    assert (t.prompt_len[0], t.output_len[0]) == (6758, 500)
    assert np.array_equal(t.prompt_len, raw.prompt_len)


def test_mooncake_spread_buckets_evenly_and_deterministically(tmp_path):
    p = tmp_path / "b.jsonl"
    stamps = [0, 0, 0, 3000, 3000, 6000, 6000, 6000, 6000]
    p.write_text(
        "".join(
            json.dumps({"timestamp": s, "input_length": 5, "output_length": 2, "hash_ids": [1]}) + "\n" for s in stamps
        )
    )
    t = load_mooncake_jsonl(p)
    # Three in [0,3): 0,1,2. Two in [3,6): 3,4.5. Last bucket uses the median gap (3 s): 6,6.75,7.5,8.25.
    assert t.arrival_s.tolist() == pytest.approx([0, 1, 2, 3, 4.5, 6, 6.75, 7.5, 8.25])
    assert np.array_equal(load_mooncake_jsonl(p).arrival_s, t.arrival_s)
    raw = load_mooncake_jsonl(p, spread_buckets=False)
    assert raw.arrival_s.tolist() == [0, 0, 0, 3, 3, 6, 6, 6, 6]
    # Spreading never moves a request out of its bucket, so the vendored trace keeps its bucket counts.
    real = load_trace("mooncake-conv")
    real_raw = load_mooncake_jsonl(MOONCAKE, spread_buckets=False)
    assert np.all(real.arrival_s >= real_raw.arrival_s)
    assert np.all(np.diff(real.arrival_s) >= 0)
    assert len(np.unique(real.arrival_s)) > 3 * len(np.unique(real_raw.arrival_s))


def test_paths_and_path_objects_load(tmp_path):
    p = tmp_path / "copy.csv"
    p.write_bytes(AZURE.read_bytes())
    assert load_trace(str(p)) == load_azure_csv(p)
    assert len(load_trace(p)) == 5985
    assert load_trace(MOONCAKE).prompt_len[0] == 6758


def test_zero_lengths_are_lifted_to_one_and_counted(tmp_path):
    p = tmp_path / "zeros.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,0,44\n"
        "2023-11-16 18:15:47.0000000,10,0\n"
        "2023-11-16 18:15:48.0000000,10,0\n"
    )
    t = load_azure_csv(p)
    assert t.prompt_len.tolist() == [1, 10, 10]
    assert t.output_len.tolist() == [44, 1, 1]
    assert (t.clipped_prompts, t.clipped_outputs) == (1, 2)
    q = tmp_path / "zeros.jsonl"
    q.write_text('{"timestamp": 5, "input_length": 0, "output_length": 0}\n')
    m = load_mooncake_jsonl(q)
    assert (m.prompt_len[0], m.output_len[0], m.clipped_prompts, m.clipped_outputs) == (1, 1, 1, 1)


def test_azure_columns_in_any_order_and_equal_timestamps(tmp_path):
    p = tmp_path / "order.csv"
    p.write_text(
        "GeneratedTokens,TIMESTAMP,Extra,ContextTokens\n"
        "7,2023-11-16 18:15:46.5,x,100\n"
        "8,2023-11-16 18:15:46.5,y,200\n"
        "9,2023-11-16 18:15:48.0,z,300\n"
    )
    t = load_azure_csv(p)
    assert t.arrival_s.tolist() == [0.0, 0.0, 1.5]
    assert t.prompt_len.tolist() == [100, 200, 300]
    assert t.output_len.tolist() == [7, 8, 9]


def test_azure_2024_timestamps_with_utc_offsets_are_read_in_utc(tmp_path):
    p = tmp_path / "azure2024.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 00:00:01+00:00,100,50\n"  # no fractional part
        "2024-05-10 01:00:02.5+01:00,300,20\n"  # 00:00:02.5 UTC, written an hour ahead
        "2024-05-10T00:00:03Z,40,4\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns when it is left to guess a timezone
        t = load_trace(p)
    assert t.arrival_s == pytest.approx([0.0, 0.99007, 2.49007, 2.99007])
    assert t.prompt_len.tolist() == [2162, 100, 300, 40]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00+00:00,1,1\n2024-05-10 00:00:01,1,1\n"
    )
    with pytest.raises(TraceError, match=r"mixed\.csv: line 3: TIMESTAMP '2024-05-10 00:00:01' lacks the UTC offset"):
        load_azure_csv(mixed)
    # an offset numpy alone would read, with only a warning that it guessed: refused, quoted as written
    for stamp in ("2024-05-10 00:00:01+05", "2024-05-10 00:00:01+01:00+00:00", "2024-05-10 00:00:01+25:00"):
        odd = tmp_path / "odd.csv"
        odd.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00+00:00,1,1\n{stamp},1,1\n")
        with pytest.raises(TraceError, match=r"odd\.csv: line 3: .*" + re.escape(repr(stamp))):
            load_azure_csv(odd)
    hours = tmp_path / "hours.csv"  # `+05` on every row: named with the forms an offset takes
    hours.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00+05,1,1\n")
    with pytest.raises(TraceError, match=r"line 2: unparseable TIMESTAMP '2024-05-10 00:00:00\+05' \(a UTC offset is"):
        load_azure_csv(hours)
    words = tmp_path / "words.csv"  # no offset in sight: no hint about one
    words.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n")
    with pytest.raises(TraceError, match=r"line 2: unparseable TIMESTAMP 'yesterday'$"):
        load_azure_csv(words)


def test_blank_lines_read_as_the_rows_around_them_and_count_in_line_numbers(tmp_path):
    rows = ["2023-11-16 18:15:46.5,100,7", "2023-11-16 18:15:47.0,200,8", "2023-11-16 18:15:48.0,300,9"]
    whole = tmp_path / "whole.csv"  # every row whole: split in one pass
    whole.write_text(HDR + "\n".join(rows) + "\n")
    gaps = tmp_path / "gaps.csv"  # blank lines: read row by row
    gaps.write_text(HDR + rows[0] + "\n\n" + rows[1] + "\n  \n" + rows[2] + "\n")
    a, b = load_trace(whole), load_trace(gaps)
    assert a.arrival_s.tolist() == b.arrival_s.tolist() == [0.0, 0.5, 1.5]
    assert a.prompt_len.tolist() == b.prompt_len.tolist() == [100, 200, 300]
    bad = tmp_path / "bad_gaps.csv"
    bad.write_text(HDR + rows[0] + "\n\n" + "2023-11-16 18:15:47.0,x,8\n")
    with pytest.raises(TraceError, match=r"bad_gaps\.csv: line 4: non-numeric ContextTokens 'x'"):
        load_trace(bad)


def test_a_byte_order_mark_and_stray_separators_neither_hide_the_header_nor_shift_line_numbers(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(("\ufeff" + HDR + ROW).encode("utf-8"))  # as spreadsheet exports write it
    assert load_trace(p).prompt_len.tolist() == [374]
    q = tmp_path / "ff.csv"  # a form feed inside a field is not a line break
    q.write_text(HDR + ROW.replace(",44", ",44\x0c") + "2023-11-16 18:15:47.0,x,1\n")
    with pytest.raises(TraceError, match=r"ff\.csv: line 3: non-numeric ContextTokens"):
        load_trace(q)


def test_burstgpt_csv_is_told_by_its_header(tmp_path):
    p = tmp_path / "BurstGPT_1.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "5,GPT-4,1087,0,1087,API log\n"  # a failed request
        "7.5,ChatGPT,30,250,280,Conversation log\n"
    )
    t = load_trace(str(p))
    assert t == load_burstgpt_csv(p)
    assert t.arrival_s.tolist() == [0.0, 0.0, 2.5]
    assert t.prompt_len.tolist() == [472, 1087, 30]
    assert t.output_len.tolist() == [18, 1, 250]
    assert t.clipped_outputs == 1
    back = tmp_path / "back.csv"
    back.write_text("Timestamp,Request tokens,Response tokens\n9,1,1\n8,1,1\n")
    with pytest.raises(TraceError, match=r"back\.csv: line 3: Timestamp out of order"):
        load_trace(back)
    neg = tmp_path / "neg.csv"
    neg.write_text("Timestamp,Request tokens,Response tokens\n-1,1,1\n")
    with pytest.raises(TraceError, match=r"neg\.csv: line 2: negative Timestamp"):
        load_trace(neg)


def test_a_csv_of_neither_format_names_both_headers(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("time,prompt,output\n0,1,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(p)
    msg = str(e.value)
    assert "other.csv: line 1" in msg and "TIMESTAMP" in msg and "Request tokens" in msg, msg


# --------------------------------------------------------------------------- malformed files

HDR = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:15:46.6805900,374,44\n"

BAD_CSV = [
    ("missing_col.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,374\n", 1, "missing"),
    ("short_row.csv", HDR + ROW + "2023-11-16 18:15:47.0,12\n", 3, "missing"),
    ("nonnum_len.csv", HDR + ROW + "2023-11-16 18:15:47.0,abc,3\n", 3, "non-numeric"),
    ("nonnum_out.csv", HDR + ROW + ROW + "2023-11-16 18:15:47.0,3,\n", 4, "non-numeric"),
    ("bad_time.csv", HDR + ROW + "yesterday,5,3\n", 3, "TIMESTAMP"),
    ("year_3000.csv", HDR + ROW + "3000-01-01 00:00:00,5,3\n", 3, "outside the years"),
    ("seconds.csv", HDR + "1,5,3\n2,5,3\n", 2, "outside the years"),  # a number is read as a year
    ("neg_len.csv", HDR + ROW + "2023-11-16 18:15:47.0,-5,3\n", 3, "negative"),
    ("nan_len.csv", HDR + ROW + "2023-11-16 18:15:47.0,5,nan\n", 3, "NaN"),
    ("frac_len.csv", HDR + ROW + "2023-11-16 18:15:47.0,5.5,3\n", 3, "non-integer"),
    ("huge_len.csv", HDR + ROW + "2023-11-16 18:15:47.0,5,1e30\n", 3, "too large"),  # int64 would wrap
    ("order.csv", HDR + ROW + "2023-11-16 18:15:47.0,5,3\n2023-11-16 18:15:46.0,5,3\n", 4, "out of order"),
    ("header_only.csv", HDR, 2, "empty"),
    ("blank.csv", "", 1, "empty"),
]


@pytest.mark.parametrize(("fname", "text", "line", "word"), BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_malformed_azure_csv_is_refused(tmp_path, fname, text, line, word):
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(TraceError) as e:
        load_trace(str(p))
    msg = str(e.value)
    assert fname in msg and f"line {line}" in msg and word in msg, msg


def jl(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


GOOD = '{"timestamp": 0, "input_length": 10, "output_length": 5}'
BAD_JSONL = [
    ("no_field.jsonl", jl(GOOD, '{"timestamp": 10, "input_length": 10}'), 2, "missing"),
    ("no_ts.jsonl", jl('{"input_length": 10, "output_length": 5}'), 1, "missing"),
    ("str_len.jsonl", jl(GOOD, GOOD, '{"timestamp": 10, "input_length": "ten", "output_length": 5}'), 3, "non-numeric"),
    ("neg_len.jsonl", jl(GOOD, '{"timestamp": 10, "input_length": 10, "output_length": -1}'), 2, "negative"),
    ("nan_len.jsonl", jl(GOOD, '{"timestamp": 10, "input_length": NaN, "output_length": 1}'), 2, "NaN"),
    (
        "huge_len.jsonl",
        jl(GOOD, '{"timestamp": 10, "input_length": 99999999999999999999999, "output_length": 1}'),
        2,
        "too large",
    ),
    ("nan_ts.jsonl", jl(GOOD, '{"timestamp": NaN, "input_length": 1, "output_length": 1}'), 2, "NaN"),
    ("order.jsonl", jl('{"timestamp": 50, "input_length": 1, "output_length": 1}', GOOD), 2, "out of order"),
    ("broken.jsonl", jl(GOOD, '{"timestamp": 1, "input_length'), 2, "malformed"),
    ("array.jsonl", jl("[1, 2, 3]"), 1, "malformed"),
    ("empty.jsonl", "", 1, "empty"),
    ("blank_lines.jsonl", "\n\n", 1, "empty"),
]


@pytest.mark.parametrize(("fname", "text", "line", "word"), BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_malformed_mooncake_jsonl_is_refused(tmp_path, fname, text, line, word):
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(TraceError) as e:
        load_trace(p)
    msg = str(e.value)
    assert fname in msg and f"line {line}" in msg and word in msg, msg


def test_line_numbers_count_skipped_blank_lines(tmp_path):
    p = tmp_path / "gaps.jsonl"
    p.write_text(jl(GOOD, "", "", '{"timestamp": 1, "input_length": -3, "output_length": 1}'))
    with pytest.raises(TraceError, match=r"gaps\.jsonl: line 4: negative input_length -3"):
        load_mooncake_jsonl(p)


def test_missing_file_and_trace_error_is_value_error(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    assert issubclass(TraceError, ValueError)


# --------------------------------------------------------------------------- transforms


def test_trace_invariants_shift_and_freeze():
    t = small([5.0, 5.0, 7.5], [3, 4, 5], [1, 2, 3])
    assert t.arrival_s.tolist() == [0.0, 0.0, 2.5]
    assert len(t) == 3 and t.duration_s == 2.5 and t.mean_rate == pytest.approx(3 / 2.5)
    with pytest.raises(ValueError):
        t.arrival_s[0] = 1.0
    with pytest.raises(ValueError, match="non-decreasing"):
        small([1.0, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=">= 1"):
        small([0.0], [0], [1])
    with pytest.raises(ValueError, match="lengths differ"):
        small([0.0, 1.0], [1], [1])
    assert small([], [], []).mean_rate == 0.0
    assert math.isinf(small([0.0, 0.0], [1, 1], [1, 1]).mean_rate)


def test_scaled_divides_arrivals_and_keeps_lengths():
    t = load_trace("azure-conv")
    fast = t.scaled(4.0)
    assert np.allclose(fast.arrival_s, t.arrival_s / 4)
    assert fast.mean_rate == pytest.approx(4 * t.mean_rate)
    assert np.array_equal(fast.prompt_len, t.prompt_len)
    slow = t.scaled(0.5)
    assert slow.duration_s == pytest.approx(2 * t.duration_s)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="speedup"):
            t.scaled(bad)


def test_window_selects_half_open_interval_and_rebases():
    t = small([0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], [1, 1, 1, 1, 1, 1])
    w = t.window(2.0, 2.0)  # 2 <= t < 4
    assert w.prompt_len.tolist() == [12, 13]
    assert w.arrival_s.tolist() == [0.0, 1.0]
    assert len(t.window(10.0, 5.0)) == 0
    assert len(t.window(0.0, 100.0)) == 6
    with pytest.raises(ValueError):
        t.window(0.0, 0.0)
    with pytest.raises(ValueError):
        t.window(-1.0, 5.0)

    az = load_trace("azure-conv")
    minute = az.window(60.0, 60.0)
    inside = (az.arrival_s >= 60) & (az.arrival_s < 120)
    assert len(minute) == int(inside.sum())
    assert np.array_equal(minute.prompt_len, az.prompt_len[inside])
    assert minute.duration_s < 60


def test_clip_caps_context_and_accumulates_counters():
    t = small([0, 1, 2, 3], [100, 50, 10, 99], [10, 60, 5, 1])
    c = t.clip(100)
    assert c.prompt_len.tolist() == [99, 50, 10, 99]
    assert c.output_len.tolist() == [1, 50, 5, 1]
    assert np.all(c.prompt_len + c.output_len <= 100)
    assert (c.clipped_prompts, c.clipped_outputs) == (1, 2)
    c2 = c.clip(60)
    assert c2.prompt_len.tolist() == [59, 50, 10, 59]
    assert c2.output_len.tolist() == [1, 10, 5, 1]
    assert (c2.clipped_prompts, c2.clipped_outputs) == (1 + 2, 2 + 1)
    with pytest.raises(ValueError):
        t.clip(1)

    moon = load_trace("mooncake-conv").clip(32768)
    assert moon.clipped_prompts > 0
    assert int((moon.prompt_len + moon.output_len).max()) <= 32768


def test_to_requests_builds_engine_requests():
    t = small([0.0, 0.5], [30, 40], [3, 4])
    reqs = t.to_requests(start_rid=7)
    assert all(isinstance(r, Request) for r in reqs)
    assert [(r.rid, r.arrival_s, r.prompt_len, r.output_len) for r in reqs] == [(7, 0.0, 30, 3), (8, 0.5, 40, 4)]
    assert all(r.state == RequestState.WAITING and r.generated == 0 for r in reqs)
    assert all(type(r.prompt_len) is int and type(r.arrival_s) is float for r in reqs)
    assert len(load_trace("azure-conv").to_requests()) == 5985


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
    for make in (
        lambda s: poisson(8, 120, seed=s),
        lambda s: bursty(20, 2, 30, 120, seed=s),
        lambda s: ramp(1, 20, 120, seed=s),
    ):
        a, b, c = make(3), make(3), make(4)
        assert a == b
        assert not np.array_equal(a.prompt_len[:20], c.prompt_len[:20])
        assert not np.array_equal(a.arrival_s[:20], c.arrival_s[:20])
    assert load_trace("poisson:rate=8,duration=120", seed=5) == load_trace("poisson:rate=8,duration=120,seed=5")


def test_poisson_rate_and_length_medians():
    t = poisson(10, 2000, seed=1)
    assert t.mean_rate == pytest.approx(10, rel=0.15)
    gaps = np.diff(t.arrival_s)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential gaps
    assert np.median(t.prompt_len) == pytest.approx(1000, rel=0.1)
    assert np.median(t.output_len) == pytest.approx(130, rel=0.1)
    assert t.prompt_len.min() >= 1 and t.output_len.min() >= 1
    custom = poisson(5, 400, seed=2, prompt_median=200, output_median=20)
    assert np.median(custom.prompt_len) == pytest.approx(200, rel=0.15)
    assert np.median(custom.output_len) == pytest.approx(20, rel=0.15)


def test_bursty_alternates_on_and_off_rates():
    period = 20.0
    t = bursty(30, 3, period, 2000, seed=0)
    phase = t.arrival_s % period
    # The trace is shifted by its first arrival (< 0.1 s at 30 req/s), so judge well inside each half.
    on = np.count_nonzero((phase > 1) & (phase < 9)) / (8 * 100)
    off = np.count_nonzero((phase > 11) & (phase < 19)) / (8 * 100)
    assert on == pytest.approx(30, rel=0.15)
    assert off == pytest.approx(3, rel=0.25)
    assert t.mean_rate == pytest.approx(16.5, rel=0.15)


def test_ramp_rate_rises_linearly():
    t = ramp(2, 22, 1000, seed=0)
    first = np.count_nonzero(t.arrival_s < 100) / 100  # expected mean rate over [0,100): 3
    last = np.count_nonzero(t.arrival_s >= 900) / 100  # over [900,1000): 21
    assert first == pytest.approx(3, rel=0.25)
    assert last == pytest.approx(21, rel=0.15)
    assert t.mean_rate == pytest.approx(12, rel=0.15)


def test_synthetic_specs_parse_all_keys():
    b = load_trace("bursty:rate_on=20,rate_off=2,period=30,duration=120")
    assert b == bursty(20, 2, 30, 120, seed=0)
    r = load_trace("ramp:start=1,end=20,duration=120,prompt_median=300,output_median=40,seed=9")
    assert r == ramp(1, 20, 120, seed=9, prompt_median=300, output_median=40)
    assert load_trace(" poisson: rate=8 , duration=60 ") == poisson(8, 60)


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ("azure-conv-full", "unknown trace"),
        ("gamma:rate=1,duration=10", "unknown trace kind"),
        ("poisson:rate=1,duration=10,burst=3", "bad key"),
        ("poisson:rate=1", "missing duration"),
        ("poisson:rate=fast,duration=10", "non-numeric"),
        ("poisson:rate=-1,duration=10", "rate must be > 0"),
        ("poisson:rate=1,rate=2,duration=10", "duplicate"),
        ("poisson:rate=0.0001,duration=1", "no requests"),
        ("trace.parquet", "unknown trace"),
    ],
)
def test_bad_specs_are_refused_with_what_is_accepted(spec, word):
    with pytest.raises(TraceError) as e:
        load_trace(spec)
    msg = str(e.value)
    assert word in msg, msg
    if "unknown" in word:
        assert "azure-conv" in msg and "mooncake-conv" in msg and "poisson:" in msg and "bursty:" in msg


def test_shipped_catalogue():
    assert list_traces() == ["azure-conv", "mooncake-conv"]
    for name, desc in SHIPPED_TRACES.items():
        fname = desc.split(":", 1)[0]
        assert (TRACE_DIR / fname).is_file(), name
    assert (TRACE_DIR / "SOURCES.md").is_file()
    assert "CC-BY 4.0" in (TRACE_DIR / "SOURCES.md").read_text()


def test_vendored_paths_are_inside_package():
    assert Path(load_trace("azure-conv").source).parent == TRACE_DIR


def test_a_directory_given_as_a_trace_is_a_trace_error(tmp_path):
    folder = tmp_path / "looks_like.csv"
    folder.mkdir()
    with pytest.raises(TraceError, match="looks_like.csv: is a directory"):
        load_trace(folder)


def test_a_synthetic_median_past_any_token_count_is_held_to_the_largest():
    trace = load_trace("poisson:rate=5,duration=10,prompt_median=1e30")
    assert len(trace) > 0 and int(trace.prompt_len.min()) >= 1 and int(trace.prompt_len.max()) <= MAX_TOKENS


@pytest.mark.parametrize(
    "spec, match",
    [
        ("poisson:rate=1e12,duration=1000", "requests, over the"),  # would allocate petabytes
        ("poisson:rate=5,duration=10,seed=-1", "seed must be an integer >= 0"),
        ("poisson:rate=5,duration=10,seed=1.5", "non-integer value '1.5' for 'seed'"),
    ],
)
def test_synthetic_specs_no_host_can_build_are_trace_errors(spec, match):
    with pytest.raises(TraceError, match=match):
        load_trace(spec)
