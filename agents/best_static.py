"""best-static: the single config with the best goodput on the training scenarios.

Found offline on the simulator, as Triton's Model Analyzer searches a model's config
space: first every attention x precision x CUDA-graph combination the device can run,
then coordinate descent over each knob's table until a full pass changes nothing. Scores
are memoised per config, and the result is cached on disk keyed by the profile, the
scenarios, the SLO and the seed, so evaluations reuse one search.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.knob_space import KNOB_TABLES, value_allowed
from ..engine.knobs import HALF_ONLY_KERNELS, HALF_PRECISIONS, Knobs
from ..engine.telemetry import SLO
from ..envs.scenario import QUEUE_TIMEOUT_SLOS, Scenario, run_scenario
from .base import StaticPolicy

SEARCH_VERSION = 5  # bump when the engine's rules change what a config scores
_SEARCHED = ("max_num_seqs", "max_batched_tokens", "attention", "cuda_graphs", "precision", "allocator")


@dataclass
class SearchResult:
    knobs: Knobs
    goodput_rps: float
    scores: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    def top(self, n: int) -> list[Knobs]:
        ranked = sorted(self.scores, key=lambda kv: -kv[1])
        return [Knobs.from_dict(k) for k, _ in ranked[:n]]

    def to_json(self) -> dict[str, Any]:
        return {"knobs": self.knobs.to_dict(), "goodput_rps": self.goodput_rps, "scores": self.scores}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchResult:
        return cls(Knobs.from_dict(d["knobs"]), float(d["goodput_rps"]), [(k, float(v)) for k, v in d["scores"]])


def _valid(knobs: dict[str, Any], device_type: str) -> bool:
    if any(not value_allowed(k, v, device_type) for k, v in knobs.items()):
        return False
    return not (knobs["attention"] in HALF_ONLY_KERNELS and knobs["precision"] not in HALF_PRECISIONS)


def mean_goodput(knobs: Knobs, scenarios: Sequence[Scenario], slo: SLO, seed: int) -> float:
    """Mean over scenarios of goodput (req/s within both SLOs), minus nothing: lost
    requests already count as misses."""
    return sum(run_scenario(s, slo, knobs, seed=seed)["goodput_rps"] for s in scenarios) / len(scenarios)


def search_best_static(
    scenarios: Sequence[Scenario],
    slo: SLO,
    device_type: str = "cuda",
    seed: int = 0,
    max_passes: int = 3,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    key = _cache_key(scenarios, slo, device_type, seed)
    cache = cache_dir / f"best_static-{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return SearchResult.from_json(json.loads(cache.read_text()))
    scores: dict[str, float] = {}

    def score(k: dict[str, Any]) -> float:
        sig = json.dumps(k, sort_keys=True)
        if sig not in scores:
            scores[sig] = mean_goodput(Knobs(**k), scenarios, slo, seed)
            if progress:
                progress(f"{len(scores):3d} configs  best {max(scores.values()):.3f} req/s")
        return scores[sig]

    tables = dict(KNOB_TABLES)
    best = Knobs().to_dict()
    if not _valid(best, device_type):
        best.update(attention="flash" if device_type == "cpu" else best["attention"], cuda_graphs=False)
        best.update({k: tables[k][0] for k in ("allocator", "reclaim")})
    combos = itertools.product(tables["attention"], tables["precision"], tables["cuda_graphs"])
    for att, prec, graphs in combos:
        cand = {**best, "attention": att, "precision": prec, "cuda_graphs": graphs}
        if _valid(cand, device_type):
            score(cand)
    best = json.loads(max(scores, key=scores.__getitem__))
    for _ in range(max_passes):
        before = dict(best)
        for name in _SEARCHED:
            for v in tables[name]:
                cand = {**best, name: v}
                if _valid(cand, device_type) and score(cand) > score(best):
                    best = cand
        if best == before:
            break
    result = SearchResult(
        Knobs(**best), score(best), [(json.loads(s), v) for s, v in sorted(scores.items(), key=lambda kv: -kv[1])]
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result.to_json(), indent=1))
    return result


def _cache_key(scenarios: Sequence[Scenario], slo: SLO, device_type: str, seed: int) -> str:
    from ..calibration.profile import load_profile

    profiles = sorted({s.profile or "" for s in scenarios})
    blob = json.dumps(
        {
            "v": SEARCH_VERSION,
            "scenarios": [s.to_dict() for s in scenarios],
            "profiles": {p: load_profile(p).sha256() for p in profiles if p},
            "slo": [slo.ttft_s, slo.tpot_s],
            "device": device_type,
            "seed": seed,
            "queue_timeout_slos": QUEUE_TIMEOUT_SLOS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def best_static_policy(result: SearchResult) -> StaticPolicy:
    return StaticPolicy(result.knobs, name="best-static")
