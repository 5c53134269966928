"""The command line as a whole: every flag of every command is explained by --help, and a command whose job declares
its flags (`runtime.config_loader.setting`) reads them back into exactly that job, its defaults included."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from megatron_slim import cli
from megatron_slim.commands.options import job_from_args
from megatron_slim.demo.demo_job import DemoJob
from megatron_slim.engines.bench_inference_job import BenchInferenceJob
from megatron_slim.engines.evaluate_job import EvaluateJob
from megatron_slim.engines.importance_job import ImportanceJob
from megatron_slim.engines.preprocess_job import PreprocessJob
from megatron_slim.engines.upcycle_job import UpcycleJob
from megatron_slim.run.recipe_job import RunJob
from megatron_slim.verify.verify_job import VerifyJob


def _leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser (a command with sub-commands: each of those, as `command sub`)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[name] = parser
        for sub, child in (subs[0].choices.items() if subs else ()):
            walk(f"{name} {sub}".strip(), child)

    walk("", cli.build_parser())
    return found


def test_every_flag_of_every_command_is_explained() -> None:
    unexplained = [f"{name} {action.option_strings or action.dest}" for name, parser in _leaf_parsers().items()
                   for action in parser._actions if not action.help]
    assert not unexplained


@pytest.mark.parametrize("argv, job", [
    (["verify", "--hf", "h", "--mcore", "m"], VerifyJob(hf="h", mcore="m")),
    (["bench-inference", "--model", "a"], BenchInferenceJob(models=("a",))),
    (["upcycle", "--dense", "d", "--experts", "2", "--topk", "1", "--out", "o"],
     UpcycleJob(dense="d", experts=2, topk=1, out=Path("o"))),
    (["preprocess", "--input", "a", "--output-prefix", "o", "--tokenizer", "t"],
     PreprocessJob(inputs=("a",), output_prefix="o", tokenizer="t")),
    (["demo"], DemoJob()),
    (["run", "r.yaml", "--workdir", "w"], RunJob(recipe=Path("r.yaml"), workdir=Path("w"))),
    (["importance", "--model", "m", "--data", "d", "--tokens", "8", "--out", "o"],
     ImportanceJob(model="m", data="d", tokens=8, out=Path("o"))),
    (["evaluate", "--model", "m"], EvaluateJob(model="m")),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_unset_flags_are_the_jobs_defaults(argv: list[str], job: object) -> None:
    """The flags a command declares from its job's fields give, where unset, the job's own defaults: a default is
    written once, on the job (repeated flags gather into the job's tuple; an unset one keeps the job's tuple)."""
    args = cli.build_parser().parse_args(argv)
    assert job_from_args(type(job), args) == job


def test_repeated_and_switched_flags_reach_their_fields() -> None:
    parse = cli.build_parser().parse_args
    bench = job_from_args(BenchInferenceJob, parse(["bench-inference", "--model", "a", "--model", "b", "--engine",
                                                    "vllm"]))
    assert bench.models == ("a", "b") and bench.engines == ("vllm",)  # not appended to the default transformers
    run = job_from_args(RunJob, parse(["run", "r.yaml", "--workdir", "w", "--no-progress", "--step", "s1/distill"]))
    assert (run.progress, run.step) == (False, "s1/distill")
    verify = job_from_args(VerifyJob, parse(["verify", "--hf", "h", "--mcore", "m", "--tp", "2", "--min-top1", "0.5"]))
    assert (verify.parallel.tp, verify.limits.min_top1_agreement, verify.limits.max_abs_diff) == (2, 0.5, None)
