"""Export a student to Hugging Face safetensors (for lm-eval, vLLM, transformers): the final student of a run
(`--run WORKDIR`) or any Megatron checkpoint, including a training checkpoint directory (iter_XXXXXXX).

Tokenizer files come from the checkpoint's tokenizer/ directory, else from --hf-template (e.g. the teacher's HF
directory; a run uses its teacher's). The output appears atomically (written to <out>.partial, then renamed).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_slim.runtime.outputs import Output

HELP = "Megatron checkpoint or a run's final student -> HF safetensors (tokenizer included)"


OUTPUTS = (Output("out", "dir", inputs=("run", "mcore", "hf_template")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a `megatron-slim run` work dir: export its last stage's distilled student")
    src.add_argument("--mcore", help="a Megatron checkpoint directory (model_config.json)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--hf-template", help="copy tokenizer/generation files from this HF directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export weights holding NaN or Inf (refused by default, naming the tensor)")


def _run_student(workdir: Path) -> tuple[str, str | None]:
    import yaml

    from megatron_slim.errors import UserError
    from megatron_slim.run.recipe_job import RECIPE_COPY
    from megatron_slim.run.recipe_parse import parse_recipe
    from megatron_slim.run.state import RunState, RunView
    from megatron_slim.run.step_groups import TEACHER, Out, stage_steps

    state = RunView(RunState.read(workdir))
    copy = workdir / RECIPE_COPY
    if not copy.is_file():  # a work dir of a version that kept its copy as recipe.yaml
        copy = workdir / "recipe.yaml"
    recipe = parse_recipe(yaml.safe_load(copy.read_text()), workdir)  # for the stage order
    last = recipe.stages[-1].name
    if not state.done(stage_steps(last).distill):
        raise UserError(f"the run in {workdir} has not finished distilling its last stage ({last!r})")
    return state.outputs(stage_steps(last).distill)[Out.CHECKPOINT], state.outputs(TEACHER).get(Out.TOKENIZER)


def run(args: argparse.Namespace) -> int:
    from megatron_slim.checkpoint.convert import mcore_to_hf

    ckpt, template = (_run_student(Path(args.run)) if args.run else (args.mcore, None))
    template = args.hf_template or template
    summary = mcore_to_hf(ckpt, args.out, hf_template=template, overwrite=args.overwrite,
                          progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {args.out} from {ckpt}: {summary.describe()}")
    return 0
