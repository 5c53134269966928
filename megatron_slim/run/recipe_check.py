"""The recipe's checks beyond its structure, none of which reads weights: the data files and their first
documents, the teacher's config, each stage's target against the model it starts from (configs chained), the last
stage against the recipe's `target`, lm-eval tasks, and each stage's run config (`stage_run_config`, also what the
distillation step trains with). `load_study`/`load_recipe` parse (run/recipe_parse.py) and check a recipe file."""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

from megatron_slim.compress.target import TargetError
from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig
from megatron_slim.run.recipe_parse import read_study
from megatron_slim.run.recipe_schema import Recipe, RecipeError, Stage, Study


def teacher_config(recipe: Recipe) -> ModelConfig:
    """The teacher's ModelConfig from its directory (no weights are read)."""
    from megatron_slim.checkpoint.mcore import MODEL_CONFIG, load_model_config

    t = recipe.teacher
    if (t / MODEL_CONFIG).is_file():
        return load_model_config(t)
    if (t / "config.json").is_file():
        from megatron_slim.checkpoint.convert import plan_hf_to_mcore

        return plan_hf_to_mcore(t)[0]  # headers only: also checks every tensor the conversion needs is there
    raise RecipeError(f"teacher {t} is neither an HF checkpoint (config.json) nor a Megatron checkpoint "
                      f"({MODEL_CONFIG})")


def stage_configs(recipe: Recipe, teacher: ModelConfig) -> list[ModelConfig]:
    """Each stage's student config, chained from the teacher (kept layers are placeholders: only counts matter)."""
    configs, source, problems = [], teacher, []
    for stage in recipe.stages:
        spec = dataclasses.replace(stage.target, tp=recipe.parallel.tp, ep=recipe.parallel.ep, pp=recipe.parallel.pp)
        try:
            spec.validate(source)
        except TargetError as e:
            problems.append(f"stage {stage.name!r} (from {'the teacher' if not configs else 'the previous stage'}): "
                            f"{e}")
            break
        source = spec.target_config(source, spec.placeholder_layers(source))
        if not configs and recipe.add_mtp_layers:
            source = source.replace(mtp_num_layers=source.mtp_num_layers + recipe.add_mtp_layers)
        configs.append(source)
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return configs


def check_final(recipe: Recipe, final: ModelConfig, teacher: ModelConfig) -> None:
    """The last stage must produce the recipe's `target` (when both a target and explicit stages are given)."""
    spec = recipe.final_target
    if spec is None:
        return
    expected = spec.target_config(teacher, spec.placeholder_layers(teacher))
    expected = expected.replace(mtp_num_layers=expected.mtp_num_layers + recipe.add_mtp_layers)
    diffs = [f"{k}: stages give {getattr(final, k)}, target wants {getattr(expected, k)}"
             for k in ("num_layers", "hidden_size", "num_experts", "topk", "moe_ffn_hidden_size",
                       "shared_expert_ffn_hidden_size", "num_query_groups", "linear_num_key_heads", "mtp_num_layers")
             if getattr(final, k) != getattr(expected, k)]
    if diffs:
        raise RecipeError("invalid recipe: the stages do not end at `target`:\n  - " + "\n  - ".join(diffs))


def load_study(path: str | Path) -> Study:
    """Parse and fully validate a recipe file, every variant (structure, files, model shapes, run configs); no
    compute."""
    study = read_study(path)
    for name, recipe in study.recipes.items():
        try:
            validate(recipe)
        except RecipeError as e:
            if name is None:
                raise
            raise RecipeError(f"variant {name!r}: {e}") from e
    return study


def load_recipe(path: str | Path) -> Recipe:
    """Parse and fully validate a recipe file without variants (structure, files, model shapes, run configs)."""
    return load_study(path).recipe(None)


def _check_data(recipe: Recipe) -> list[str]:
    from megatron_slim.data.calibration import indexed_prefix

    problems = []
    train = recipe.data.train
    if isinstance(train, str):
        if not train.endswith(".jsonl") or not Path(train).is_file():
            problems.append(f"data.train {train} is not an existing .jsonl file")
    else:
        problems += [f"data.train: {p}.bin/.idx do not exist" for _, p in train if indexed_prefix(p) is None]
    for key in ("calibration", "heldout"):
        p = getattr(recipe.data, key)
        if not (p.endswith(".jsonl") and Path(p).is_file()) and indexed_prefix(p) is None:
            problems.append(f"data.{key} {p} is neither an existing .jsonl nor an indexed dataset prefix")
    return problems


def _same_data(a: str, b: str) -> bool:
    """Whether two data sources (a .jsonl or an indexed prefix) are the same files, however they are spelled."""
    def files(p: str) -> Path:
        return Path(p) if p.endswith(".jsonl") else Path(p + ".bin")

    try:
        return files(a).samefile(files(b))
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def heldout_overlap_warning(recipe: Recipe) -> str | None:
    """The warning when the held-out data is (one of) the training data: held-out loss then measures memorisation,
    and every eval step and comparison of the run would look better than the model is."""
    train = recipe.data.train
    sources = [train] if isinstance(train, str) else [p for _, p in train]
    same = [p for p in sources if _same_data(p, recipe.data.heldout)]
    if same:
        return (f"warning: data.heldout {recipe.data.heldout} is also training data (data.train {same[0]}): "
                "held-out loss will measure memorisation, not generalisation")
    return None


def _check_data_sample(recipe: Recipe, teacher: ModelConfig) -> None:
    """The first documents of every jsonl source read as the run will read them: JSON lines with text (the
    teacher must carry a tokenizer) or pre-tokenized ids inside the teacher's vocabulary."""
    from megatron_slim.checkpoint.files import Checkpoint
    from megatron_slim.data.calibration import check_sample

    tokenizer = Checkpoint.open(recipe.teacher).tokenizer_files
    problems = []
    for key in ("train", "calibration", "heldout"):
        source = getattr(recipe.data, key)
        if isinstance(source, str) and source.endswith(".jsonl"):
            try:
                check_sample(source, tokenizer if tokenizer.is_dir() else None, teacher.vocab_size)
            except UserError as e:
                problems.append(f"data.{key}: {e}")
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))


def _check_teacher_layout(recipe: Recipe, teacher: ModelConfig) -> None:
    """The teacher's importance and evaluation run at the recipe's layout, which each stage's target is checked
    against but the teacher is not (a 60-expert teacher pruned to 48 experts at ep 16): the model builder's check,
    made here before the teacher is converted."""
    from megatron_slim.models.config import validate_layout

    try:
        validate_layout(teacher, recipe.parallel)
    except ValueError as e:
        raise RecipeError(f"invalid recipe:\n  - parallel: the teacher {recipe.teacher}: {e}") from None


def validate(recipe: Recipe) -> list[ModelConfig]:
    """Every check that needs no weights; returns the stage configs."""
    from megatron_slim.train.config import run_config_from_dict

    problems = _check_data(recipe)
    warning = heldout_overlap_warning(recipe)
    if warning:
        print(warning, file=sys.stderr)
    if not recipe.teacher.is_dir():
        problems.append(f"teacher {recipe.teacher} does not exist")
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))
    teacher = teacher_config(recipe)
    _check_teacher_layout(recipe, teacher)
    _check_data_sample(recipe, teacher)
    if recipe.evaluation.tasks:  # unknown tasks and task data that is not available offline
        from megatron_slim.eval.harness import TaskSpec, check_tasks

        e = recipe.evaluation
        try:
            check_tasks(TaskSpec(tasks=tuple(e.tasks), num_fewshot=e.num_fewshot, limit=e.limit))
        except UserError as err:
            raise RecipeError(f"invalid recipe: evaluation.tasks: {err}") from err
    configs = stage_configs(recipe, teacher)
    check_final(recipe, configs[-1], teacher)
    for stage, student in zip(recipe.stages, configs):
        try:
            run = run_config_from_dict(stage_run_config(recipe, stage, "<student>", "<teacher>", [[1.0, "<data>"]],
                                                        "<save>"))
            run.validate(recipe.nproc)
            # the trainer's check on the pair, before any model exists: the stage's student against the teacher
            run.loss.teacher_mtp_depths(student.mtp_num_layers, teacher.mtp_num_layers, "of this stage",
                                        f"the teacher {recipe.teacher}")
        except UserError as e:
            raise RecipeError(f"stage {stage.name!r}: {e}") from e
    if isinstance(recipe.data.train, list):  # an indexed blend: its size is known now (a .jsonl once tokenized)
        try:
            stream_usage(recipe, recipe.data.train)
        except UserError as e:
            raise RecipeError(f"invalid recipe: {e}") from e
    return configs


def stage_run_config(recipe: Recipe, stage: Stage, student: str, teacher: str, blend: list[list[Any]],
                     save_dir: str, heldout: str = "<heldout>", sample_offset: int = 0) -> dict[str, Any]:
    """The `train --config` dict of a stage's distillation (held-out evaluation along training when the recipe's
    evaluation.every_tokens asks for it), reading the run's data stream (run/data_stream.py) from
    `sample_offset` on."""
    cfg = copy.deepcopy(stage.training.sections)
    e = recipe.evaluation
    if e.every_tokens:
        cfg["evaluation"] = {"data": heldout, "tokens": e.tokens, "every_tokens": e.every_tokens,
                             "micro_batch": e.micro_batch}
    cfg["model"] = {"checkpoint": student}
    cfg["teacher"] = {"checkpoint": teacher}
    cfg.setdefault("data", {})
    cfg["data"].update(blend=blend, seq_length=recipe.data.seq_length, sample_offset=sample_offset,
                       **stream_settings(recipe))
    cfg.setdefault("parallel", {}).update(tp=recipe.parallel.tp, pp=recipe.parallel.pp, ep=recipe.parallel.ep)
    if recipe.parallel.etp is not None:
        cfg["parallel"]["etp"] = recipe.parallel.etp
    cfg.setdefault("checkpoint", {})["save_dir"] = save_dir
    return cfg


# ---- the data stream ---------------------------------------------------------------------------------------------
# A run's stages (and variants) read one shuffle of the training blend, each stage from where the previous one
# stopped, so no sample repeats until the corpus is exhausted. The stream is fixed by the blend, split, sequence
# length, the first stage's train.seed and its length (the samples of all stages together): every stage builds it
# alike (run config data.seed, data.stream_samples) and trains on its own range from data.sample_offset, the end of
# the previous stage's range as recorded in the run's state (`data_samples` in the distill step's outputs).
# Variants whose stages train as long see the same samples.
def _stage_config(recipe: Recipe, stage: Stage) -> Any:
    from megatron_slim.train.config import run_config_from_dict

    cfg = copy.deepcopy(stage.training.sections)
    cfg.setdefault("data", {})["seq_length"] = recipe.data.seq_length
    return run_config_from_dict(cfg)


def stage_samples(recipe: Recipe) -> list[int]:
    """Samples each stage trains on, in stage order."""
    return [_stage_config(recipe, s).run_samples for s in recipe.stages]


def stream_settings(recipe: Recipe) -> dict[str, Any]:
    """The run-config `data` fields every stage shares: the stream's seed and length."""
    return {"seed": _stage_config(recipe, recipe.stages[0]).train.seed, "stream_samples": sum(stage_samples(recipe))}


def stream_usage(recipe: Recipe, blend: list[list[Any]]) -> list:
    """Per dataset of `blend`: tokens available, requested by the whole stream, epochs; checked against every
    stage's data.max_epochs (and empty splits refused). Raises UserError naming the dataset."""
    from megatron_slim.train.data import check_corpus, corpus_usage

    total = sum(stage_samples(recipe))
    usages = None
    for stage in recipe.stages:
        cfg = _stage_config(recipe, stage)
        try:
            usages = corpus_usage(blend, cfg.data.split, recipe.data.seq_length,
                                  (total, cfg.batch.global_batch_size, 0))
            check_corpus(usages, cfg.data.max_epochs)
        except UserError as e:
            raise UserError(f"stage {stage.name!r}: {e}") from None
    return usages
