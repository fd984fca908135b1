"""PNG plots of an evaluation: goodput, latency and the knobs chosen over time.

One figure per scenario, one column of panels per policy, so a reader sees at a glance
when the learned policy moved a knob and what it bought.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..engine.knob_space import KNOB_TABLES  # noqa: E402

SHOWN_KNOBS = ("max_num_seqs", "max_batched_tokens", "attention", "cuda_graphs", "precision", "allocator")


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = dict(KNOB_TABLES)
    paths = []
    for sc in report["scenarios"]:
        rows = [r for r in report["results"] if r["scenario"] == sc["label"]]
        if not rows:
            continue
        fig, axes = plt.subplots(3, len(rows), figsize=(4.2 * len(rows), 8.5), squeeze=False, sharex=True)
        gmax = max((max(r["series"]["goodput_rps"], default=0) for r in rows), default=1) * 1.1 or 1
        for j, r in enumerate(rows):
            s = r["series"]
            ax = axes[0][j]
            ax.plot(s["t"], s["goodput_rps"], color="tab:green", lw=1)
            ax.set_ylim(0, gmax)
            ax.set_title(
                f"{r['policy']}\ngoodput {r['goodput_rps']:.2f} req/s, SLO {r['slo_attainment']:.0%}", fontsize=9
            )
            ax.set_ylabel("goodput (req/s)" if j == 0 else "")
            ax = axes[1][j]
            ax.semilogy(s["t"], [max(x, 1e-3) for x in s["ttft_avg_ms"]], label="TTFT avg", color="tab:red", lw=1)
            ax.semilogy(s["t"], [max(x, 1e-3) for x in s["iteration_ms"]], label="iteration", color="tab:blue", lw=1)
            ax.axhline(report["slo"]["ttft_ms"], color="tab:red", ls=":", lw=0.8)
            ax.axhline(report["slo"]["tpot_ms"], color="tab:blue", ls=":", lw=0.8)
            ax.set_ylabel("ms" if j == 0 else "")
            if j == 0:
                ax.legend(fontsize=7, loc="upper left")
            ax = axes[2][j]
            for k, name in enumerate(SHOWN_KNOBS):
                idx = s["knobs"].get(name, [])
                n = len(tables[name]) - 1 or 1
                ax.step(s["t"], [k + 0.8 * i / n for i in idx], where="post", lw=1, label=name)
            ax.set_yticks(range(len(SHOWN_KNOBS)), SHOWN_KNOBS if j == 0 else [""] * len(SHOWN_KNOBS), fontsize=7)
            ax.set_xlabel("trace time (s)")
        fig.suptitle(
            f"{sc['label']}  (SLO: TTFT {report['slo']['ttft_ms']:.0f} ms, TPOT {report['slo']['tpot_ms']:.0f} ms)"
        )
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", sc["label"]) + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
