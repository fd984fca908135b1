"""The `autoopt` command line: one entry point, one module per job.

Each subcommand imports its module only when it runs, so `autoopt replay` does not pay
for stable-baselines3 and `autoopt export` does not load the engine.
"""

from __future__ import annotations

import argparse
import os
import sys

from .engine.errors import InputError

# what bad input raises: the project's own input errors, and paths that cannot be used
BAD_INPUT = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _replay(argv: list[str]) -> int:
    from .engine.replay import add_replay_args, replay_main

    p = argparse.ArgumentParser(prog="autoopt replay", description="Replay a request trace through the engine.")
    add_replay_args(p)
    return replay_main(p.parse_args(argv))


def _calibrate(argv: list[str]) -> int:
    if argv and argv[0] == "check":
        p = argparse.ArgumentParser(
            prog="autoopt calibrate check", description="Compare a profile's predictions with measurements."
        )
        p.add_argument("--profile", required=True, help="a shipped profile name or a profile JSON path")
        p.add_argument(
            "--against",
            required=True,
            help="measurements in the format of prefill.jsonl / decode.jsonl, or a profile JSON (its rows)",
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        a = p.parse_args(argv[1:])
        from .calibration.check import check_main

        return check_main(a.profile, a.against, a.json)
    from .calibration.calibrate import calibrate_main

    return calibrate_main(argv)


def _train(argv: list[str]) -> int:
    from .training.train import train_main

    return train_main(argv)


def _evaluate(argv: list[str]) -> int:
    from .training.evaluate import evaluate_main

    return evaluate_main(argv)


def _export(argv: list[str]) -> int:
    from .policies.export import export_main

    return export_main(argv)


def _demo(argv: list[str]) -> int:
    from .training.demo import demo_main

    return demo_main(argv)


COMMANDS = {
    "demo": (_demo, "the product in one go: train on the shipped profile, evaluate against baselines, export"),
    "replay": (_replay, "replay a request trace through the live engine or the simulator"),
    "calibrate": (_calibrate, "profile the engine on this device into a calibration profile; 'check' one"),
    "train": (_train, "train a PPO policy on the simulated environment"),
    "evaluate": (_evaluate, "compare policies and baselines on traces"),
    "export": (_export, "export a trained SB3 model as a pickle-free runtime policy"),
}


def _usage(argv: list[str]) -> int:
    print("usage: autoopt COMMAND [options]   (autoopt COMMAND --help for each)\n")
    for name, (_, doc) in COMMANDS.items():
        print(f"  {name:<10} {doc}")
    if argv and argv[0] not in ("-h", "--help"):
        print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] not in COMMANDS:
            return _usage(argv)
        fn, _ = COMMANDS[argv[0]]
        return fn(argv[1:])
    except BrokenPipeError:
        # the reader went away (`autoopt --help | head`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BAD_INPUT as exc:
        # Bad input (a malformed trace, profile, policy file or knobs; a path that cannot be
        # read or written): the loaders' messages name the file and line, so print that,
        # not a traceback. Anything else is a bug and keeps its traceback.
        # AUTOOPT_TRACEBACK=1 shows the traceback of bad input too.
        if os.environ.get("AUTOOPT_TRACEBACK", "").lower() in ("1", "true", "yes"):
            raise
        print(f"autoopt {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
