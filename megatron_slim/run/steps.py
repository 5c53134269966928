"""The steps of a run, in order, each a function of the run context that returns its outputs (recorded in the
work dir's state). Layout of the work dir:

    teacher/mcore/            the teacher as a Megatron checkpoint (when the recipe names an HF directory)
    teacher/eval.json         the teacher's held-out evaluation
    data/{train,calibration,heldout}.bin/.idx   tokenized once with the teacher's tokenizer
    <stage>/importance.safetensors, plan.json, plots/, pruned/ (or init/), eval_pruned.json, train.yaml, train/,
            eval.json
    export/hf/                the final student as an HF checkpoint
    export/bench_inference.json   the deployment-efficiency figures (recipe `inference`)
    report/report.md + PNGs

With variants, each variant has this layout under `variants/<name>/`, except for the steps that variants share:
a step's outputs depend only on its parameters and the steps it reads (`Step.params`, `Step.deps`), so each step
has a key, the digest of both (`step_keys`), and a step whose key two variants agree on runs once, under
`shared/<key>/` (`shared/state.json` records it).

`single` steps run on one process (rank 0); the others run on every rank of the job (model-parallel layout from
the recipe). A step's `where` says which job of a SLURM chain it belongs in (run/chain.py): `cpu` for the heavy
single-process steps (teacher conversion, tokenization, pruning, export) that would leave a multi-node GPU job's
other GPUs idle for hours, `gpu` for the distributed steps (and the inference bench), `any` for the light
single-process steps (planning, the report) that join the job before them. Every step's outputs appear atomically
or the step resumes itself (distillation), so rerunning a killed step is safe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_slim.run.recipe_check import stage_run_config, stream_settings
from megatron_slim.run.recipe_schema import RECIPE_SIZES, Recipe, Stage
from megatron_slim.run.state import RunView
from megatron_slim.run.step_groups import (
    BENCH_INFERENCE,
    DATA,
    EVAL_TEACHER,
    EXPORT,
    REPORT,
    TEACHER,
    Out,
    input_step,
    random_student,
    stage_steps,
    student_step,
)
from megatron_slim.runtime.outputs import atomic_path, atomic_write


@dataclass
class Context:
    """What a step sees: its recipe, where it writes (`workdir`: the variant's work dir, or the shared step's own
    directory), and the outputs of the steps before it (`view`: the variant's own and shared records)."""

    recipe: Recipe
    workdir: Path
    view: RunView
    progress: bool = True

    def out(self, step: str) -> dict[str, Any]:
        return self.view.outputs(step)

    def teacher_ckpt(self) -> str:
        return self.out(TEACHER)[Out.MCORE]

    def stage_input(self, stage: Stage) -> str:
        """The checkpoint a stage compresses: the teacher, or the previous stage's distilled student."""
        source = input_step(self.recipe, stage)
        return self.teacher_ckpt() if source == TEACHER else self.out(source)[Out.CHECKPOINT]

    def data_start(self, stage: Stage) -> int:
        """Where the stage starts in the run's data stream: where the previous stage's distillation stopped."""
        i = self.recipe.stages.index(stage)
        return self.out(f"{self.recipe.stages[i - 1].name}/distill")["data_samples"][1] if i else 0

    def student(self, stage: Stage) -> str:
        """The stage's student before training: pruned, or randomly initialised (init: random)."""
        return self.out(student_step(self.recipe, stage))[Out.CHECKPOINT]


CPU, GPU, ANY = "cpu", "gpu", "any"  # Step.where


@dataclass(frozen=True)
class Step:
    id: str
    single: bool  # one process (rank 0) instead of every rank
    fn: Callable[[Context], dict[str, Any]]
    deps: tuple[str, ...] = ()  # the steps whose outputs it reads
    params: Any = None  # everything else its outputs depend on (JSON-serialisable)
    where: str = GPU  # CPU, GPU or ANY: the kind of job of a chain that runs it (run/chain.py)

    @property
    def group(self) -> str:
        return self.id.split("/")[0]

    @property
    def kind(self) -> str:
        return self.id.split("/")[1]


def step_keys(steps: list[Step]) -> dict[str, str]:
    """Step id -> digest of what its outputs depend on: its kind, parameters and the keys of the steps it reads
    (not its stage's name, a label). Equal keys mean interchangeable outputs."""
    keys: dict[str, str] = {}
    for step in steps:
        blob = json.dumps({"kind": step.kind, "params": step.params, "deps": [keys[d] for d in step.deps]},
                          sort_keys=True, default=str)
        keys[step.id] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


# ---- prepare -----------------------------------------------------------------------------------------------------
def convert_teacher(ctx: Context) -> dict[str, Any]:
    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.files import Checkpoint

    teacher = Checkpoint.open(ctx.recipe.teacher)
    if teacher.kind == "mcore":
        return {Out.MCORE: str(teacher.path), Out.TOKENIZER: str(teacher.tokenizer_files)}
    out = ctx.workdir / "teacher" / "mcore"
    hf_to_mcore(teacher.path, out, overwrite=True, progress=ctx.progress)
    return {Out.MCORE: str(out), Out.TOKENIZER: str(teacher.tokenizer_files)}


def tokenize_data(ctx: Context) -> dict[str, Any]:
    """jsonl sources -> indexed datasets with the teacher's tokenizer, so every step reads identical tokens."""
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.data.calibration import eos_token_id, indexed_prefix
    from megatron_slim.engines.preprocess_job import PreprocessJob, run_preprocess

    tokenizer = ctx.out(TEACHER)[Out.TOKENIZER]
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
        # written atomically (.bin, then .idx, then the manifest); a rerun after a kill rewrites it
        run_preprocess(PreprocessJob(inputs=(src,), output_prefix=str(prefix), tokenizer=tokenizer,
                                     vocab_size=teacher.vocab_size, eod_id=eod, overwrite=True,
                                     progress=ctx.progress))
        out[name] = [[1.0, str(prefix)]] if name == "train" else str(prefix)
    return out


def _evaluate(ctx: Context, model: str, out: Path) -> dict[str, Any]:
    from megatron_slim.engines.evaluate_job import evaluate_worker

    r = ctx.recipe
    out.parent.mkdir(parents=True, exist_ok=True)  # a shared step writes into its own, new directory
    evaluate_worker(r.evaluation.job(model, ctx.out(DATA)[Out.HELDOUT], out, r.data.seq_length, r.parallel))
    return {Out.EVAL: str(out)}


def evaluate_teacher(ctx: Context) -> dict[str, Any]:
    return _evaluate(ctx, ctx.teacher_ckpt(), ctx.workdir / "teacher" / "eval.json")


# ---- per stage ----------------------------------------------------------------------------------------------------
def importance(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        from megatron_slim.engines.importance_job import importance_worker

        r = ctx.recipe
        out = ctx.workdir / stage.name / "importance.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        importance_worker(r.importance.job(ctx.stage_input(stage), ctx.out(DATA)[Out.CALIBRATION], out,
                                           r.data.seq_length, r.parallel, progress=ctx.progress))
        return {Out.IMPORTANCE: str(out)}
    return fn


def plan(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        import dataclasses

        from megatron_slim.compress.importance_file import Importance
        from megatron_slim.compress.planner import make_plan
        from megatron_slim.compress.plots import write_plots

        p = ctx.recipe.parallel
        spec = dataclasses.replace(stage.target, tp=p.tp, ep=p.ep, pp=p.pp)
        imp = Importance.load(ctx.out(stage_steps(stage).importance)[Out.IMPORTANCE])
        spec.validate(imp.model)
        result = make_plan(imp, spec)
        out = ctx.workdir / stage.name / "plan.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as staging:
            result.save(staging)
        plots = write_plots(imp, spec, result, ctx.workdir / stage.name / "plots")
        return {Out.PLAN: str(out), Out.PLOTS: [str(x) for x in plots]}
    return fn


def prune(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        from megatron_slim.compress.plan import CompressionPlan
        from megatron_slim.compress.prune_checkpoint import Options, prune_checkpoint

        out = ctx.workdir / stage.name / "pruned"
        grow = added_mtp_depths(ctx.recipe, stage)
        cut = out.with_name("pruned.without-new-mtp") if grow else out
        summary = prune_checkpoint(CompressionPlan.load(ctx.out(stage_steps(stage).plan)[Out.PLAN]),
                                   ctx.stage_input(stage), cut, "mcore",
                                   opts=Options(align_neurons=stage.align_neurons, rescale_norms=stage.rescale_norms),
                                   overwrite=True, progress=ctx.progress)
        print(f"pruned {stage.name}: {summary.describe()}", flush=True)
        if grow:
            import shutil

            from megatron_slim.compress.mtp_depths import add_mtp_depths

            add_mtp_depths(cut, out, grow, seed=stage.training.seed)
            shutil.rmtree(cut)
            print(f"added {grow} fresh MTP depth(s) to the {stage.name} student", flush=True)
        return {Out.CHECKPOINT: str(out)}
    return fn


def random_init(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    """The student the stage's plan describes (the very architecture pruning would give, layer kinds in the same
    places), initialised as megatron-core initialises a new model at the run's layout and seed: the baseline
    pruning is measured against."""
    def fn(ctx: Context) -> dict[str, Any]:
        from megatron_slim.compress.mtp_depths import save_initialised
        from megatron_slim.compress.plan import CompressionPlan

        cfg = CompressionPlan.load(ctx.out(stage_steps(stage).plan)[Out.PLAN]).target
        cfg = cfg.replace(mtp_num_layers=cfg.mtp_num_layers + added_mtp_depths(ctx.recipe, stage))
        out = ctx.workdir / stage.name / "init"
        save_initialised(cfg, ctx.recipe.parallel, stage.training.seed, out,
                         Path(ctx.out(TEACHER)[Out.TOKENIZER]))
        return {Out.CHECKPOINT: str(out)}
    return fn


def recipe_layout(recipe: Recipe) -> dict[str, int]:
    """The recipe's layout as a step parameter (the sizes its steps use, so step keys stay what they were)."""
    return {k: getattr(recipe.parallel, k) for k in RECIPE_SIZES}


def added_mtp_depths(recipe: Recipe, stage: Stage) -> int:
    """Fresh MTP depths this stage's student gains (the recipe's add_mtp_layers, on the first stage)."""
    return recipe.add_mtp_layers if stage is recipe.stages[0] else 0


def evaluate_pruned(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        return _evaluate(ctx, ctx.student(stage), ctx.workdir / stage.name / "eval_pruned.json")
    return fn


def distill(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    """Online-teacher distillation of the pruned student; a rerun resumes from the newest checkpoint."""
    def fn(ctx: Context) -> dict[str, Any]:
        import torch.distributed as dist
        import yaml

        from megatron_slim.checkpoint.finite import refuse_nonfinite_model
        from megatron_slim.train import checkpointing
        from megatron_slim.train.config import run_config_from_dict
        from megatron_slim.train.guard import DIVERGED_EXIT_CODE
        from megatron_slim.train.trainer import Trainer

        save_dir = ctx.workdir / stage.name / "train"
        data = ctx.out(DATA)
        start = ctx.data_start(stage)
        cfg = stage_run_config(ctx.recipe, stage, ctx.student(stage), ctx.teacher_ckpt(), data[Out.TRAIN],
                               str(save_dir), heldout=data[Out.HELDOUT], sample_offset=start)
        if dist.get_rank() == 0:  # for people who want to rerun or inspect the stage's training on its own
            save_dir.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(ctx.workdir / stage.name / "train.yaml", yaml.safe_dump(cfg, sort_keys=False))
        trainer = Trainer(run_config_from_dict(cfg))
        trainer.setup()
        code = trainer.train()
        if code == DIVERGED_EXIT_CODE:
            raise StepInterrupted(code, trainer.diverged_message(), status="diverged")
        if code:
            raise StepInterrupted(code)
        step = checkpointing.latest_step(save_dir)
        # a diverged run's weights are not a distilled student: the step stays undone (and eval never scores them)
        refuse_nonfinite_model(trainer.student, str(checkpointing.iter_dir(save_dir, step)))
        end = start + step * trainer.cfg.batch.global_batch_size
        return {Out.CHECKPOINT: str(checkpointing.iter_dir(save_dir, step)), Out.STEPS: step,
                Out.METRICS: str(save_dir / "metrics.jsonl"), Out.DATA_SAMPLES: [start, end]}
    return fn


def evaluate_student(stage: Stage) -> Callable[[Context], dict[str, Any]]:
    def fn(ctx: Context) -> dict[str, Any]:
        student = ctx.out(stage_steps(stage).distill)[Out.CHECKPOINT]
        return _evaluate(ctx, student, ctx.workdir / stage.name / "eval.json")
    return fn


# ---- final --------------------------------------------------------------------------------------------------------
def export(ctx: Context) -> dict[str, Any]:
    from megatron_slim.checkpoint.convert import mcore_to_hf

    last = ctx.recipe.stages[-1].name
    out = ctx.workdir / "export" / "hf"
    summary = mcore_to_hf(ctx.out(stage_steps(last).distill)[Out.CHECKPOINT], out,
                          hf_template=ctx.out(TEACHER)[Out.TOKENIZER], overwrite=True,
                          progress=ctx.progress)
    print(f"exported {out}: {summary.describe()}", flush=True)
    return {Out.HF: str(out)}


def bench_inference(ctx: Context) -> dict[str, Any]:
    """The deployment-efficiency table: the HF teacher (when the recipe names one) and the exported student, each
    measured in a fresh process (engines/bench_inference_job.py); figures in export/bench_inference.json."""
    from megatron_slim.checkpoint.files import Checkpoint
    from megatron_slim.engines.bench_inference_job import bench_models, settings_line

    models = {}
    if Checkpoint.open(ctx.recipe.teacher).kind == "hf":
        models["teacher"] = str(ctx.recipe.teacher)
    models["student"] = ctx.out(EXPORT)[Out.HF]
    job = ctx.recipe.inference.job(tuple(models.values()))
    results = bench_models(job)
    labels = [label for _ in job.engines for label in models]  # bench_models measures engine by engine
    out = ctx.workdir / "export" / "bench_inference.json"
    atomic_write(out, json.dumps({"settings": settings_line(job), "models": [
        {"label": label} | dataclasses.asdict(r) for label, r in zip(labels, results, strict=True)]}, indent=1))
    return {Out.BENCH: str(out)}


def report(ctx: Context) -> dict[str, Any]:
    from megatron_slim.run.report import write_report

    path = write_report(ctx.recipe, ctx.workdir, ctx.view)
    return {Out.REPORT: str(path)}


class StepInterrupted(Exception):
    """A step stopped early on purpose with exit status `code`: preemption (checkpointed, the status asks for a
    requeue), or a diverged distillation (status `diverged`, the reason names the last good checkpoint)."""

    def __init__(self, code: int, reason: str = "interrupted (checkpointed; rerun to resume)",
                 status: str = "interrupted") -> None:
        super().__init__(f"{reason} (exit status {code})")
        self.code, self.reason, self.status = code, reason, status


def all_steps(recipe: Recipe) -> list[Step]:
    r = recipe
    evaluation = {"evaluation": {k: v for k, v in dataclasses.asdict(r.evaluation).items() if k != "every_tokens"},
                  "seq_length": r.data.seq_length, "parallel": recipe_layout(r), "nproc": r.nproc}
    teacher, data = TEACHER, DATA
    steps = [Step(teacher, True, convert_teacher, params={"teacher": str(r.teacher)}, where=CPU),
             Step(data, True, tokenize_data, (teacher,), {"data": dataclasses.asdict(r.data)}, where=CPU),
             Step(EVAL_TEACHER, False, evaluate_teacher, (teacher, data), evaluation)]
    for i, s in enumerate(r.stages):
        source, layout = input_step(r, s), {"parallel": recipe_layout(r), "nproc": r.nproc}
        target = {"target": dataclasses.asdict(s.target)} | layout
        student, ids = student_step(r, s), stage_steps(s)
        grow = {"add_mtp_layers": added_mtp_depths(r, s), "seed": s.training.seed} if added_mtp_depths(r, s) else {}
        steps += [Step(ids.importance, False, importance(s), (source, data),
                       {"importance": dataclasses.asdict(r.importance), "seq_length": r.data.seq_length} | layout),
                  Step(ids.plan, True, plan(s), (ids.importance,), target, where=ANY)]
        if random_student(r, s):  # the planned architecture, random weights
            steps.append(Step(student, False, random_init(s), (ids.plan,),
                              layout | grow | {"seed": s.training.seed}))
        else:
            steps.append(Step(student, True, prune(s), (ids.plan, source),
                              {"align_neurons": s.align_neurons, "rescale_norms": s.rescale_norms} | grow,
                              where=CPU))
        distill_params = {"training": s.training.sections, "seq_length": r.data.seq_length, "every_tokens":
                          r.evaluation.every_tokens, "data_stream": stream_settings(r)} | evaluation
        # it starts in the data stream where the previous stage's distillation stopped (Context.data_start)
        previous = (stage_steps(r.stages[i - 1]).distill,) if i else ()
        steps += [Step(ids.eval_pruned, False, evaluate_pruned(s), (student, data), evaluation),
                  Step(ids.distill, False, distill(s), (student, teacher, data) + previous, distill_params),
                  Step(ids.eval, False, evaluate_student(s), (ids.distill, data), evaluation)]
    if r.export:
        steps.append(Step(EXPORT, True, export, (stage_steps(r.stages[-1]).distill, teacher), where=CPU))
        if r.inference is not None:
            steps.append(Step(BENCH_INFERENCE, True, bench_inference, (EXPORT,),
                              {"inference": dataclasses.asdict(r.inference), "teacher": str(r.teacher)}))
    return steps + [Step(REPORT, True, report, params={"variant": r.variant, "recipe": r.digest}, where=ANY)]
