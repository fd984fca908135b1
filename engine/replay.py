"""`autoopt replay`: a request trace through the engine, with a summary report.

The same call runs the live engine (torch, on CUDA or the CPU) or the simulator (a
calibrated profile), under static knobs or an embedded runtime policy.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .argtypes import nonneg_float, positive_float, positive_int
from .engine import Engine, EngineConfig
from .knobs import Knobs
from .strict_json import dumps_strict
from .telemetry import SLO
from .traces import load_trace

SUMMARY_FIELDS = (
    ("goodput_rps", "goodput (req/s)", "{:.3f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("tpot_p50_ms", "TPOT p50 (ms)", "{:.2f}"),
    ("tpot_p99_ms", "TPOT p99 (ms)", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("ooms", "OOMs", "{}"),
    ("rejected", "rejected", "{}"),
    ("fallbacks", "policy fallbacks", "{}"),
)


def add_replay_args(p: argparse.ArgumentParser) -> None:
    from ..policies.guard import add_kernel_check_args  # the policy side, only for its flags

    p.add_argument(
        "--trace",
        default="azure-conv",
        help="a trace file (.csv Azure, .jsonl Mooncake), a shipped name, or a synthetic spec",
    )
    p.add_argument(
        "--backend", choices=("live", "sim"), default="live", help="live torch engine or the calibrated simulator"
    )
    p.add_argument("--model", default="tiny", help="model preset for the live engine: tiny | gpt2-small")
    p.add_argument("--profile", default=None, help="profile for --backend sim (default: cpu-tiny on a CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--speedup", type=positive_float, default=1.0, help="divide inter-arrival times by this factor")
    p.add_argument(
        "--start", type=nonneg_float, default=0.0, help="start of the trace window, seconds (after speed-up)"
    )
    p.add_argument(
        "--duration", type=positive_float, default=60.0, help="length of the trace window, seconds (after speed-up)"
    )
    p.add_argument(
        "--drain",
        type=nonneg_float,
        default=None,
        help="seconds allowed after the window to finish in-flight work (default: the window's length)",
    )
    p.add_argument("--knobs", type=Path, default=None, help="JSON file of knob values")
    p.add_argument(
        "--policy",
        default=None,
        help="an exported runtime policy (a dir, or a shipped name) to set the knobs, guarded, at the "
        "cadence its manifest records",
    )
    p.add_argument(
        "--max-switches-per-s", type=nonneg_float, default=1.0, help="with --policy: rate limit on costly switches"
    )
    add_kernel_check_args(p, "with --policy")
    p.add_argument("--slo-ttft-ms", type=positive_float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=positive_float, default=100.0)
    p.add_argument("--clock", choices=("virtual", "realtime"), default="virtual")
    p.add_argument(
        "--queue-timeout-s", type=positive_float, default=None, help="reject requests that waited longer than this"
    )
    p.add_argument("--max-slots", type=positive_int, default=64, help="KV-cache slots (most concurrent sequences)")
    p.add_argument(
        "--memory-cap-gib", type=nonneg_float, default=None, help="cap on device memory the engine may use (0: none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None, help="write the summary as JSON here")
    p.add_argument("--quiet", action="store_true")


def build_executor(args: argparse.Namespace) -> Any:
    cap = int(args.memory_cap_gib * (1 << 30)) if args.memory_cap_gib else None
    if args.backend == "sim":
        from ..calibration.sim_executor import SimExecutor

        profile = args.profile or ("h100-gpt2-small" if args.device == "cuda" else "cpu-tiny")
        return SimExecutor(profile, max_slots=args.max_slots, memory_cap_bytes=cap, seed=args.seed)
    from .torch_executor import TorchExecutor

    return TorchExecutor(args.model, device=args.device, max_slots=args.max_slots, memory_cap_bytes=cap, seed=args.seed)


def replay(args: argparse.Namespace) -> dict[str, Any]:
    knobs = Knobs.from_json_file(args.knobs) if args.knobs else Knobs()
    executor = build_executor(args)
    trace = load_trace(str(args.trace)).scaled(args.speedup).window(args.start, args.duration)
    trace = trace.clip(executor.capacity.max_context)
    controller = None
    if args.policy is not None:
        from ..policies import resolve_policy
        from ..policies.guard import GuardedPolicy
        from ..policies.runtime import RuntimePolicy

        policy = RuntimePolicy.load(resolve_policy(args.policy))
        controller = GuardedPolicy(
            policy,
            device_type=executor.device_type,
            fallback=knobs,
            max_costly_switches_per_s=args.max_switches_per_s,
            kernel_margin=args.kernel_margin,
        )
    engine = Engine(
        executor,
        trace.to_requests(),
        knobs,
        EngineConfig(
            slo=SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3),
            clock=args.clock,
            queue_timeout_s=args.queue_timeout_s,
        ),
        controller=controller,
    )
    drain = args.duration if args.drain is None else args.drain
    report = engine.run(until_s=args.duration + drain)
    report.update(
        {
            "trace": str(args.trace),
            "trace_source": trace.source,
            "window_s": [args.start, args.start + args.duration],
            "speedup": args.speedup,
            "clipped_prompts": trace.clipped_prompts,
            "clipped_outputs": trace.clipped_outputs,
            "backend": args.backend,
            "model": args.model if args.backend == "live" else None,
            "seed": args.seed,
            # ms of the reference decode step per kernel ("inf": out of memory), strict JSON.
            # Probed with fixed knobs too: the probe warms the device up, and a static and a
            # policy replay compared with this command must start alike
            "card_ms": {k: v if v is None or math.isfinite(v) else str(v) for k, v in (engine.card or {}).items()},
        }
    )
    if controller is not None:
        report["fallbacks"] = controller.fallbacks
        report["fallback_reasons"] = dict(controller.reasons)
        report["kernel_margin"] = controller.kernel_margin  # inf (null in JSON): no check
        report["kernel_holds"] = controller.kernel_holds
    return report


def format_summary(report: dict[str, Any]) -> str:
    lines = [
        f"replay of {report.get('trace')} ({report['device']}, {report['clock']} clock, {report['iterations']} iterations)"
    ]
    for key, label, fmt in SUMMARY_FIELDS:
        v = report.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            lines.append(f"  {label:<18} n/a")
        else:
            lines.append(f"  {label:<18} {fmt.format(v)}")
    lines.append(
        "  requests           arrived {arrived} = completed {completed} + queued {queued} + running {running} + rejected {rejected}".format(
            **report
        )
    )
    if report.get("not_arrived") or report.get("lost"):
        lines.append(
            "  of the {requests} requests in the window: not arrived by the end {not_arrived}, lost {lost}".format(
                **report
            )
        )
    lines.append("  knobs              " + ", ".join(f"{k}={v}" for k, v in report["knobs"].items()))
    for k, why in report.get("not_applicable", {}).items():
        lines.append(f"  not applicable     {k}: {why}")
    return "\n".join(lines)


def replay_main(args: argparse.Namespace) -> int:
    if args.report is not None and args.report.is_dir():  # found now, not after the run
        raise IsADirectoryError(f"--report {args.report} is a directory; give a file path")
    report = replay(args)
    if not args.quiet:
        print(format_summary(report))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(dumps_strict(report, indent=2))
        if not args.quiet:
            print(f"report written to {args.report}", file=sys.stderr)
    return 0 if report["balanced"] and report["lost"] == 0 else 1
