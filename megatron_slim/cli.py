"""The single `megatron-slim <command>` entry point.

Each command lives in `megatron_slim/commands/<name>.py` and exposes `HELP` (one line), `add_arguments(parser)`,
`run(args) -> int` and `OUTPUTS`, what it writes (`runtime.outputs.Output`; `()` for a command that writes
nothing): the CLI refuses an output that overlaps an input or replaces what it may not before the command starts,
and checks after it that its directory outputs went through `runtime.outputs`. Command modules import heavy
libraries (torch, megatron) inside `run`, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
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
        p.set_defaults(_run=module.run, _outputs=command_outputs(name))
    return parser


def command_outputs(name: str) -> tuple:
    """The `OUTPUTS` a command declares (a command without the declaration is a bug, refused here)."""
    from megatron_slim.runtime.outputs import Output

    module = importlib.import_module(f"megatron_slim.commands.{COMMANDS[name]}")
    outputs = getattr(module, "OUTPUTS", None)
    if not isinstance(outputs, tuple) or not all(isinstance(o, Output) for o in outputs):
        raise TypeError(f"megatron_slim.commands.{COMMANDS[name]} must declare OUTPUTS, a tuple of "
                        "runtime.outputs.Output (empty when it writes nothing)")
    return outputs


def main(argv: list[str] | None = None) -> int:
    from megatron_slim.errors import UserError
    from megatron_slim.runtime.outputs import postflight, preflight
    from megatron_slim.runtime.quiet import silence_upstream_noise

    args = build_parser().parse_args(argv)
    silence_upstream_noise()
    try:
        preflight(args._outputs, args)
        code = int(args._run(args) or 0)
        if code == 0 and os.environ.get("RANK", "0") == "0":
            postflight(args._outputs, args)
        return code
    except (UserError, FileExistsError, FileNotFoundError) as e:
        print(f"megatron-slim {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
