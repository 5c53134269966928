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
    "merge-datasets": "merge_datasets",
    "blend": "blend",
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


# commands that read checkpoint directories: they refuse files linking outside their input unless told otherwise
# (`convert` declares the flag on each direction's parser)
READS_CHECKPOINTS = frozenset({"verify", "train", "upcycle", "prune", "importance", "evaluate", "run",
                               "export", "bench-inference", "ablate", "demo"})


# Commands that stop at safe points on SIGTERM/SIGUSR1 (exit 75, launch.sh requeues): they catch the signal from
# the moment their arguments parse, so one that arrives while torch and megatron-core import (seconds) or the model
# loads (minutes) is kept for their first safe point instead of killing them (143, not requeued).
PREEMPTIBLE = frozenset({"run", "train"})


def build_parser() -> argparse.ArgumentParser:
    from megatron_slim.commands.options import add_follow_symlinks_argument

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
        if name in READS_CHECKPOINTS:
            add_follow_symlinks_argument(p)
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


def _json_failure(args: argparse.Namespace, message: str, status: int) -> None:
    """In a `--json` mode, a command that failed before printing its document prints {"error": ...} instead, so
    stdout holds exactly one JSON document whatever happened (`runtime.json_out`)."""
    from megatron_slim.runtime import json_out

    if getattr(args, "json", False) and not json_out.emitted():
        json_out.emit({"error": message, "command": args.command, "exit_status": status})


def main(argv: list[str] | None = None) -> int:
    from megatron_slim.runtime import lifetime
    from megatron_slim.runtime.quiet import silence_upstream_noise

    args = build_parser().parse_args(argv)
    if args.command in PREEMPTIBLE:
        from megatron_slim.runtime.preemption import StopFlag

        StopFlag()  # the outermost flag: the runner's and the trainer's start raised when it is (see StopFlag)
    silence_upstream_noise()
    lifetime.adopt_parent()  # a child command dies with the command that started it
    lifetime.install()  # and every process this one forks dies with it (checkpoint writers)
    if getattr(args, "follow_symlinks", False):  # in the environment, so spawned ranks and children follow too
        from megatron_slim.checkpoint.links import FOLLOW_ENV

        os.environ[FOLLOW_ENV] = "1"
    if getattr(args, "json", False):
        from megatron_slim.runtime import json_out

        with json_out.watching():
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from megatron_slim.errors import UserError
    from megatron_slim.runtime.outputs import postflight, preflight
    from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, ignore_stop_signals

    try:
        preflight(args._outputs, args)
        status = int(args._run(args) or 0)
        if status == 0 and os.environ.get("RANK", "0") == "0":
            postflight(args._outputs, args)
    except (UserError, FileExistsError, FileNotFoundError, PermissionError) as e:
        message = str(e)
        if isinstance(e, PermissionError) and e.filename:  # an output directory this user cannot write
            message = f"{e.filename}: {e.strerror} (a directory this user cannot write to, or a file it cannot read)"
        print(f"megatron-slim {args.command}: error: {message}", file=sys.stderr)
        _json_failure(args, message, 2)
        return 2
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if code:
            _json_failure(args, f"exited with status {code} (see stderr)", code)
        raise
    except Exception as e:
        _json_failure(args, f"{type(e).__name__}: {e}", 1)
        raise
    if status == REQUEUE_EXIT_CODE:  # leaving to be requeued: no signal may turn that status into a kill now
        ignore_stop_signals()
    if status:
        _json_failure(args, f"exited with status {status} (see stderr)", status)
    return status


if __name__ == "__main__":
    sys.exit(main())
