"""Profiles: load/save/validate/hash, the memory model, and checking a profile against rows."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from autoopt.calibration.check import CheckError, check_main, check_profile, format_check, load_rows
from autoopt.calibration.profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    PROFILES_DIR,
    Profile,
    ProfileError,
    list_profiles,
    load_profile,
)

NAME = "h100-gpt2-small"


@pytest.fixture(scope="module")
def shipped() -> Profile:
    return load_profile(NAME)


@pytest.fixture()
def data(shipped) -> dict:
    return copy.deepcopy(shipped.to_dict())


def _write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- loading, saving, hashing --------------------------------------------------------------


def test_shipped_profile_is_listed_and_loads_by_name_and_path(shipped):
    assert NAME in list_profiles()
    by_path = load_profile(PROFILES_DIR / f"{NAME}.json")
    assert by_path.to_dict() == shipped.to_dict()
    assert shipped.to_dict()["format"] == PROFILE_FORMAT and shipped.to_dict()["version"] == PROFILE_VERSION
    assert shipped.device["type"] == "cuda" and shipped.model["max_context"] == 4096
    assert len(shipped.prefill) > 100 and len(shipped.decode) > 50
    assert set(shipped.allocator) == {"default", "expandable", "split128", "gc08_split128"}


def test_save_load_round_trip_keeps_content_and_hash(shipped, tmp_path):
    path = shipped.save(tmp_path / "copy.json")
    again = Profile.load(path)
    assert again.to_dict() == shipped.to_dict()
    assert again.sha256() == shipped.sha256()
    # The hash is of the content, not the file's layout.
    relaid = _write(tmp_path, json.loads(path.read_text()), "relaid.json")
    assert Profile.load(relaid).sha256() == shipped.sha256()


def test_hash_changes_with_content(data):
    before = Profile.from_dict(data).sha256()
    data["prefill"][0]["ms"] *= 1.01
    data["prefill"][0]["ms_max"] *= 1.01
    assert Profile.from_dict(data).sha256() != before
    assert len(before) == 64


def test_unknown_name_lists_shipped_profiles():
    with pytest.raises(ProfileError, match=NAME):
        load_profile("no-such-profile")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.pop("switch"), "'switch'"),
        (lambda d: d["model"].pop("d_model"), "d_model"),
        (lambda d: d["device"].update(type="tpu"), "type"),
        (lambda d: d["prefill"][3].update(ms=-1.0), "prefill row 3: 'ms'"),
        (lambda d: d["prefill"][5].pop("L"), "prefill row 5 is missing 'L'"),
        (lambda d: d["decode"][2].update(cuda_graphs="yes"), "decode row 2: 'cuda_graphs'"),
        (lambda d: d["decode"][0].update(ms_min=1e9), "ms_min <= ms <= ms_max"),
        (lambda d: d["prefill"][0].update(backend="xformers"), "'backend'"),
        (lambda d: d["switch"].pop("empty_cache_ms"), "empty_cache_ms"),
    ],
)
def test_validation_errors_name_the_fault(data, tmp_path, mutate, message):
    mutate(data)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(")) as err:
        Profile.load(_write(tmp_path, data))
    assert str(tmp_path / "p.json") in str(err.value)


def test_unreadable_and_invalid_json_files(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "autoopt-profile",\n "version": 1,,}')
    with pytest.raises(ProfileError, match=r"bad.json: not valid JSON \(line 2"):
        Profile.load(bad)


def test_fitted_models_are_built_once(shipped):
    assert shipped.latency() is shipped.latency()
    assert shipped.memory() is shipped.memory()
    assert shipped.allocator_model() is shipped.allocator_model()
    assert shipped.allocator_model().config("expandable").stuck_frac == 0.0


# -- memory model --------------------------------------------------------------------------


def test_memory_model_matches_measured_peaks(shipped):
    mm = shipped.memory()
    assert 300e6 < mm.weight_bytes("bf16") < 400e6
    assert mm.weight_bytes("fp32") == pytest.approx(2 * mm.weight_bytes("bf16"), rel=0.1)
    assert mm.weight_bytes("fp16") == pytest.approx(mm.weight_bytes("bf16"), rel=0.1)
    assert mm.kv_bytes_per_token("bf16") == 2 * 12 * 768 * 2
    assert mm.kv_bytes_per_token("fp32") == 2 * 12 * 768 * 4
    errors = [
        abs(mm.weight_bytes(r["precision"]) + mm.prefill_activation_bytes(r["B"], r["L"], r["precision"], r["backend"]))
        / r["peak_alloc"]
        - 1
        for r in shipped.prefill
    ]
    assert max(abs(e) for e in errors) < 0.05


def test_memory_model_transients_grow_and_fall_back(shipped):
    mm = shipped.memory()
    assert mm.prefill_activation_bytes(16, 2048, "bf16") > mm.prefill_activation_bytes(16, 512, "bf16") > 0
    # math materialises the attention scores: much more than flash at long L.
    assert mm.prefill_activation_bytes(16, 2048, "bf16", "math") > 3 * mm.prefill_activation_bytes(
        16, 2048, "bf16", "flash"
    )
    assert mm.decode_activation_bytes(64, "bf16") >= mm.decode_activation_bytes(8, "bf16") >= 0
    # Unmeasured combinations answer, scaled by bytes per element.
    assert mm.prefill_activation_bytes(8, 512, "fp32", "cudnn") > 0
    used = mm.used_bytes("bf16", kv_tokens=1000, transient_bytes=123)
    assert used == mm.weight_bytes("bf16") + 1000 * mm.kv_bytes_per_token("bf16") + 123


# -- checking a profile against rows -------------------------------------------------------


def _held_out(shipped):
    """A profile without every bf16 prefill row at L=1024 and decode row at B=32, and those rows."""
    data = copy.deepcopy(shipped.to_dict())
    held = [r for r in data["prefill"] if r["L"] == 1024 and r["precision"] == "bf16"]
    held += [{k: v for k, v in r.items() if k != "cuda_graphs" or v} for r in data["decode"] if r["B"] == 32]
    data["prefill"] = [r for r in data["prefill"] if not (r["L"] == 1024 and r["precision"] == "bf16")]
    data["decode"] = [r for r in data["decode"] if r["B"] != 32]
    return Profile.from_dict(data), held


def test_check_profile_on_held_out_rows(shipped, tmp_path):
    reduced, held = _held_out(shipped)
    path = tmp_path / "held.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in held) + "\n")
    rows = load_rows(path)
    assert len(rows) == len(held) and rows[0][0] == f"{path}:1"
    result = check_profile(reduced, rows)
    assert result.n == len(held)
    assert set(result.by_kind) == {"prefill", "decode"}
    assert "decode flash bf16 eager" in result.by_group  # rows without cuda_graphs count as eager
    assert 0.0 < result.mape < 25.0
    assert result.worst[0].error >= result.worst[-1].error
    table = format_check(result)
    assert "prefill flash bf16" in table and "worst rows" in table
    # The full profile saw these rows: it reproduces them.
    assert check_profile(shipped, rows).mape < 1e-6


def test_check_says_how_each_row_was_predicted(shipped, capsys, tmp_path):
    """Inside a measured group's range: interpolated; beyond it: extrapolated; a group the
    profile never measured: completed, and named as such in the table and the JSON."""
    row = next(r for r in shipped.prefill if r["backend"] == "flash" and r["precision"] == "bf16")
    top_b = max(r["B"] for r in shipped.prefill if r["backend"] == "flash" and r["precision"] == "bf16")
    measured = {k: row[k] for k in ("B", "L", "backend", "precision", "ms")}
    beyond = measured | {"B": 4 * top_b}
    unseen = measured | {"backend": "newkernel"}
    result = check_profile(shipped, [measured, beyond, unseen])
    assert [r.basis for r in sorted(result.worst, key=lambda r: r.source)] == [
        "interpolated",
        "extrapolated",
        "completed",
    ]
    assert {k: n for k, (n, _) in result.by_basis.items()} == {"interpolated": 1, "extrapolated": 1, "completed": 1}
    assert result.by_basis["interpolated"][1] < 1e-6  # the profile's own row
    assert result.unmeasured_groups == ["prefill newkernel bf16"]
    assert "prefill newkernel bf16" in format_check(result).split("(not in the profile")[0]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (measured, beyond, unseen)) + "\n")
    assert check_main(NAME, path, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by_basis"]["completed"]["n"] == 1 and out["unmeasured_groups"] == ["prefill newkernel bf16"]
    assert {w["basis"] for w in out["worst"]} == {"interpolated", "extrapolated", "completed"}


def test_check_main_outputs_and_errors(shipped, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"B": 3, "L": 300, "backend": "cudnn", "precision": "fp16", "ms": 6.0}) + "\n")
    assert check_main(NAME, good, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 1 and out["profile"] == NAME and out["by_kind"]["prefill"]["n"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"B": 1, "L": 8, "backend": "flash", "precision": "bf16", "ms": 1.0}) + "\n{oops\n")
    with pytest.raises(CheckError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(bad)
    assert check_main(NAME, bad) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"B": 1, "backend": "flash", "precision": "bf16", "ms": 1.0}) + "\n")
    with pytest.raises(CheckError, match=r"neither.jsonl:1: row has neither 'L'"):
        load_rows(neither)
    assert check_main("no-such-profile", good) == 2


def test_a_profile_json_checks_another_profile_by_its_rows(shipped, tmp_path):
    """`calibrate check --against` a profile made on another card: its rows, as if from .jsonl."""
    reduced, held = _held_out(shipped)
    as_jsonl = tmp_path / "held.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in held) + "\n")
    other = shipped.to_dict()
    other["prefill"] = [r for r in held if "L" in r]
    other["decode"] = [r for r in held if "C" in r]
    as_profile = _write(tmp_path, other, "other-card.json")
    rows = load_rows(as_profile)
    assert [r for _, r in rows] == [r for _, r in load_rows(as_jsonl)]
    assert rows[0][0] == f"{as_profile}:prefill[0]"
    assert check_profile(reduced, rows).mape == pytest.approx(check_profile(reduced, load_rows(as_jsonl)).mape)
    other["decode"][0] = {k: v for k, v in other["decode"][0].items() if k != "C"}
    with pytest.raises(CheckError, match=r"other-card.json:decode\[0\]: row has neither 'L'"):
        load_rows(_write(tmp_path, other, "other-card.json"))


def test_format_doc_describes_every_field_the_loader_requires():
    """docs/profile-format.md is the profile's reference for users who write or read one by
    hand: every key, row field and choice the validator insists on must be in it."""
    from autoopt.calibration import profile as P
    from autoopt.calibration.alloc_model import ALLOCATOR_CONFIGS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "profile-format.md").read_text()
    required = {
        "top-level key": P.TOP_KEYS,
        "provenance key": P.PROVENANCE_KEYS,
        "model key": P.MODEL_INT_KEYS,
        "prefill field": P.PREFILL_FIELDS,
        "decode field": P.DECODE_FIELDS,
        "switch key": P.SWITCH_KEYS,
        "backend": P.BACKENDS,
        "precision": P.PRECISIONS,
        "device type": P.DEVICE_TYPES,
        "allocator config": ALLOCATOR_CONFIGS,
    }
    missing = [
        f"{what} {name!r}"
        for what, names in required.items()
        for name in names
        if f"`{name}`" not in doc and f'`"{name}"`' not in doc
    ]
    assert not missing, f"docs/profile-format.md does not describe: {', '.join(missing)}"
    assert f"`{P.PROFILE_VERSION}`" in doc and f'`"{P.PROFILE_FORMAT}"`' in doc


@pytest.mark.parametrize(
    "row, match",
    [
        ({"cuda_graphs": "false"}, "cuda_graphs must be true, false or absent"),  # bool("false") is True
        ({"B": 10**400}, r"B and C in \[1, 2\^31\)"),
        ({"B": math.inf}, "bad value"),
    ],
)
def test_check_refuses_rows_it_would_otherwise_misread(shipped, tmp_path, row, match):
    rows = tmp_path / "rows.jsonl"
    base = {"B": 4, "C": 256, "backend": "flash", "precision": "bf16", "cuda_graphs": True, "ms": 1.0}
    rows.write_text(json.dumps({**base, **row}) + "\n")
    with pytest.raises(CheckError, match=match):
        load_rows(rows)


def test_check_names_a_file_that_is_not_utf8(tmp_path):
    rows = tmp_path / "latin1.jsonl"
    rows.write_bytes(b'{"B": 1, "L": 8, "backend": "flash", "precision": "bf16", "ms": 1.0, "note": "\xe9"}\n')
    with pytest.raises(CheckError, match="latin1.jsonl: not UTF-8"):
        load_rows(rows)


@pytest.mark.parametrize(
    "name, corrupt, match",
    [
        (NAME, lambda d: d["allocator"].update(default={}), "missing field"),
        (NAME, lambda d: d["allocator"]["default"].update(gain="x"), "'gain' must be a number"),
        ("cpu-tiny", lambda d: d["provenance"].update(timing="fast"), "timing must be a JSON object"),
        ("cpu-tiny", lambda d: d["provenance"]["timing"].update(decode_after_prefill_ms_by_prompt=[[512]]), "timing"),
        ("cpu-tiny", lambda d: d["provenance"]["timing"]["noise_quantiles"].update(decode=["x"]), "timing"),
        ("cpu-tiny", lambda d: d["model"].update(max_context=1), "max_context"),
        ("cpu-tiny", lambda d: d["provenance"].update(decode_context="weird"), "decode_context"),
    ],
)
def test_fields_the_simulator_reads_are_checked_when_the_profile_loads(name, corrupt, match):
    """They used to pass the check and fail mid-replay with errors naming no file."""
    data = json.loads((PROFILES_DIR / f"{name}.json").read_text())
    Profile.from_dict(copy.deepcopy(data), where="intact.json")  # the shipped profile itself passes
    corrupt(data)
    with pytest.raises(ProfileError, match=match):
        Profile.from_dict(data, where="corrupt.json")


def test_check_reads_a_json_array_of_rows_and_names_a_broken_json_file(tmp_path):
    rows = [{"B": 2, "L": 128, "backend": "flash", "precision": "bf16", "ms": 1.5}]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=1))
    assert [row for _, row in load_rows(array)] == rows
    broken = tmp_path / "profile.json"
    broken.write_text((PROFILES_DIR / "cpu-tiny.json").read_text()[:3000])  # cut mid-way
    with pytest.raises(CheckError, match=r"profile.json: not valid JSON \(line \d+"):
        load_rows(broken)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")  # as Windows editors save
    assert [row for _, row in load_rows(bom)] == rows
