"""The single `megatron-slim <command>` entry point.

Each command lives in `megatron_slim/commands/<name>.py` and exposes `HELP` (one line), `add_arguments(parser)`
and `run(args) -> int`. Command modules import heavy libraries (torch, megatron) inside `run`, so `--help`
stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under megatron_slim.commands (the module name may differ from the command name).
COMMANDS: dict[str, str] = {
    "info": "info",
    "convert": "convert",
    "verify": "verify",
    "preprocess": "preprocess",
    "train": "train",
    "demo": "demo",
    "ablate": "ablate",
    "upcycle": "upcycle",
    "prune": "prune",
    "plan": "plan",
    "importance": "importance",
    "evaluate": "evaluate",
    "run": "run",
    "export": "export",
    "bench-inference": "bench_inference",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-slim",
        description="Compress large MoE language models: importance, pruning, expert merging, distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"megatron_slim.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_slim.errors import UserError
    from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, ignore_stop_signals
    from megatron_slim.runtime.quiet import silence_upstream_noise

    args = build_parser().parse_args(argv)
    silence_upstream_noise()
    try:
        code = int(args._run(args) or 0)
    except (UserError, FileExistsError, FileNotFoundError) as e:
        print(f"megatron-slim {args.command}: error: {e}", file=sys.stderr)
        return 2
    if code == REQUEUE_EXIT_CODE:  # leaving to be requeued: no signal may turn that status into a kill now
        ignore_stop_signals()
    return code


if __name__ == "__main__":
    sys.exit(main())
