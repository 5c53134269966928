"""The steps of a run, in order, each a function of the run context that returns its outputs (recorded in the
work dir's state). Layout of the work dir:

    teacher/mcore/            the teacher as a Megatron checkpoint (when the recipe names an HF directory)
    teacher/eval.json         the teacher's held-out evaluation
    data/{train,calibration,heldout}.bin/.idx   tokenized once with the teacher's tokenizer
    <stage>/importance.safetensors, plan.json, plots/, pruned/, eval_pruned.json, train.yaml, train/, eval.json
    export/hf/                the final student as an HF checkpoint
    report/report.md + PNGs

`single` steps run on one process (rank 0); the others run on every rank of the job (model-parallel layout from
the recipe). Every step's outputs appear atomically or the step resumes itself (distillation), so rerunning a
killed step is safe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_slim.run.recipe import Recipe, Stage, stage_run_config
from megatron_slim.run.state import RunState
from megatron_slim.run.step_groups import FINAL, PREPARE


@dataclass
class Context:
    recipe: Recipe
    workdir: Path
    state: RunState
    progress: bool = True

    def out(self, step: str) -> dict[str, Any]:
        return self.state.outputs(step)

    def teacher_ckpt(self) -> str:
        return self.out(f"{PREPARE}/teacher")["mcore"]

    def stage_input(self, stage: Stage) -> str:
        """The checkpoint a stage compresses: the teacher, or the previous stage's distilled student."""
        i = [s.name for s in self.recipe.stages].index(stage.name)
        return self.teacher_ckpt() if i == 0 else self.out(f"{self.recipe.stages[i - 1].name}/distill")["checkpoint"]


@dataclass(frozen=True)
class Step:
    id: str
    single: bool  # one process (rank 0) instead of every rank
    fn: Callable[[Context], dict[str, Any]]

    @property
    def group(self) -> str:
        return self.id.split("/")[0]


# ---- prepare -----------------------------------------------------------------------------------------------------
def convert_teacher(ctx: Context) -> dict[str, Any]:
    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.files import checkpoint_kind

    teacher = ctx.recipe.teacher
    if checkpoint_kind(teacher) == "mcore":
        return {"mcore": str(teacher), "tokenizer": str(teacher / "tokenizer")}
    out = ctx.workdir / "teacher" / "mcore"
    hf_to_mcore(teacher, out, overwrite=True, progress=ctx.progress)
    return {"mcore": str(out), "tokenizer": str(teacher)}


def tokenize_data(ctx: Context) -> dict[str, Any]:
    """jsonl sources -> indexed datasets with the teacher's tokenizer, so every step reads identical tokens."""
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.data.calibration import eos_token_id, indexed_prefix
    from megatron_slim.engines.preprocess import PreprocessJob, run_preprocess

    tokenizer = ctx.out(f"{PREPARE}/teacher")["tokenizer"]
    teacher = load_model_config(ctx.teacher_ckpt())
    # the document separator every other step assumes (the config's EOS first, as calibration windows read it)
    eod = eos_token_id(teacher.hf_config, tokenizer)
    data, out = ctx.recipe.data, {}
    for name in ("train", "calibration", "heldout"):
        src = getattr(data, name)
        if not isinstance(src, str) or indexed_prefix(src) is not None:
            out[name] = src if isinstance(src, list) else ([[1.0, src]] if name == "train" else src)
            continue
        prefix = ctx.workdir / "data" / name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp = prefix.with_name(name + ".tmp")
        run_preprocess(PreprocessJob(input=src, output_prefix=str(tmp), tokenizer=tokenizer,
                                     vocab_size=teacher.vocab_size, eod_id=eod))
        for ext in (".idx", ".bin"):  # .idx last: a prefix counts as present once both exist
            Path(str(tmp) + ext).replace(str(prefix) + ext)
        out[name] = [[1.0, str(prefix)]] if name == "train" else str(prefix)
    return out


def _evaluate(ctx: Context, model: str, out: Path) -> dict[str, Any]:
    from megatron_slim.engines.evaluate import EvaluateJob, evaluate_worker

    e = ctx.recipe.evaluation
    evaluate_worker(EvaluateJob(model=model, data=ctx.out(f"{PREPARE}/data")["heldout"], tokens=int(e.tokens),
                                seq_len=ctx.recipe.data.seq_length, micro_batch=e.micro_batch,
                                tp=ctx.recipe.parallel.tp, ep=ctx.recipe.parallel.ep, pp=ctx.recipe.parallel.pp,
                                mtp_k=e.mtp_k, mtp_prompts=e.mtp_prompts,
                                prompt_len=e.prompt_len or ctx.recipe.data.seq_length // 2, gen_tokens=e.gen_tokens,
                                dtype="float32", json=False, out=out))
    return {"eval": str(out)}


def evaluate_teacher(ctx: Context) -> dict[str, Any]:
    return _evaluate(ctx, ctx.teacher_ckpt(), ctx.workdir / "teacher" / "eval.json")


# ---- per stage ----------------------------------------------------------------------------------------------------
def importance(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        from megatron_slim.engines.importance import ImportanceJob, importance_worker

        imp = ctx.recipe.importance
        out = ctx.workdir / stage.name / "importance.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        importance_worker(ImportanceJob(
            model=ctx.stage_input(stage), data=ctx.out(f"{PREPARE}/data")["calibration"], tokens=int(imp.tokens),
            out=out, tp=ctx.recipe.parallel.tp, ep=ctx.recipe.parallel.ep, pp=ctx.recipe.parallel.pp,
            seq_len=ctx.recipe.data.seq_length, micro_batch=imp.micro_batch, layer_loss=imp.layer_loss,
            max_tokens=None, dtype=imp.dtype, overwrite=True, progress=ctx.progress))
        return {"importance": str(out)}
    return fn


def plan(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        import dataclasses

        from megatron_slim.compress.importance_file import Importance
        from megatron_slim.compress.planner import make_plan
        from megatron_slim.compress.plots import write_plots

        p = ctx.recipe.parallel
        spec = dataclasses.replace(stage.target, tp=p.tp, ep=p.ep, pp=p.pp)
        imp = Importance.load(ctx.out(f"{stage.name}/importance")["importance"])
        spec.validate(imp.model)
        result = make_plan(imp, spec)
        out = ctx.workdir / stage.name / "plan.json"
        tmp = out.with_name("plan.json.tmp")
        result.save(tmp)
        tmp.replace(out)
        plots = write_plots(imp, spec, result, ctx.workdir / stage.name / "plots")
        return {"plan": str(out), "plots": [str(x) for x in plots]}
    return fn


def prune(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        from megatron_slim.compress.apply import Options, prune_checkpoint
        from megatron_slim.compress.plan import CompressionPlan

        out = ctx.workdir / stage.name / "pruned"
        summary = prune_checkpoint(CompressionPlan.load(ctx.out(f"{stage.name}/plan")["plan"]),
                                   ctx.stage_input(stage), out, "mcore",
                                   opts=Options(align_neurons=stage.align_neurons, rescale_norms=stage.rescale_norms),
                                   overwrite=True, progress=ctx.progress)
        print(f"pruned {stage.name}: {summary.describe()}", flush=True)
        return {"checkpoint": str(out)}
    return fn


def evaluate_pruned(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        return _evaluate(ctx, ctx.out(f"{stage.name}/prune")["checkpoint"],
                         ctx.workdir / stage.name / "eval_pruned.json")
    return fn


def distill(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    """Online-teacher distillation of the pruned student; a rerun resumes from the newest checkpoint."""
    def fn(ctx: Context) -> dict[str, Any]:
        import torch.distributed as dist
        import yaml

        from megatron_slim.train import checkpointing
        from megatron_slim.train.config import run_config_from_dict
        from megatron_slim.train.trainer import Trainer

        save_dir = ctx.workdir / stage.name / "train"
        cfg = stage_run_config(ctx.recipe, stage, ctx.out(f"{stage.name}/prune")["checkpoint"], ctx.teacher_ckpt(),
                               ctx.out(f"{PREPARE}/data")["train"], str(save_dir))
        if dist.get_rank() == 0:  # for people who want to rerun or inspect the stage's training on its own
            (ctx.workdir / stage.name / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        trainer = Trainer(run_config_from_dict(cfg))
        trainer.setup()
        code = trainer.train()
        if code:
            raise StepInterrupted(code)
        step = checkpointing.latest_step(save_dir)
        return {"checkpoint": str(checkpointing.iter_dir(save_dir, step)), "steps": step,
                "metrics": str(save_dir / "metrics.jsonl")}
    return fn


def evaluate_student(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        return _evaluate(ctx, ctx.out(f"{stage.name}/distill")["checkpoint"], ctx.workdir / stage.name / "eval.json")
    return fn


# ---- final --------------------------------------------------------------------------------------------------------
def export(ctx: Context) -> dict[str, Any]:
    from megatron_slim.checkpoint.convert import mcore_to_hf

    last = ctx.recipe.stages[-1].name
    out = ctx.workdir / "export" / "hf"
    summary = mcore_to_hf(ctx.out(f"{last}/distill")["checkpoint"], out,
                          hf_template=ctx.out(f"{PREPARE}/teacher")["tokenizer"], overwrite=True,
                          progress=ctx.progress)
    print(f"exported {out}: {summary.describe()}", flush=True)
    return {"hf": str(out)}


def report(ctx: Context) -> dict[str, Any]:
    from megatron_slim.run.report import write_report

    path = write_report(ctx.recipe, ctx.workdir, ctx.state)
    return {"report": str(path)}


class StepInterrupted(Exception):
    """A step stopped early on purpose (preemption: checkpointed, exit status `code` asks for a requeue)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"interrupted with exit status {code}")
        self.code = code


def all_steps(recipe: Recipe) -> list[Step]:
    steps = [Step(f"{PREPARE}/teacher", True, convert_teacher), Step(f"{PREPARE}/data", True, tokenize_data),
             Step(f"{PREPARE}/eval_teacher", False, evaluate_teacher)]
    for s in recipe.stages:
        steps += [Step(f"{s.name}/importance", False, importance(s)), Step(f"{s.name}/plan", True, plan(s)),
                  Step(f"{s.name}/prune", True, prune(s)), Step(f"{s.name}/eval_pruned", False, evaluate_pruned(s)),
                  Step(f"{s.name}/distill", False, distill(s)), Step(f"{s.name}/eval", False, evaluate_student(s))]
    return steps + [Step(f"{FINAL}/export", True, export), Step(f"{FINAL}/report", True, report)]
