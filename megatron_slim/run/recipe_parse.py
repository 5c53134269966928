"""Parsed YAML -> a typed `Recipe` (or a `Study` of variants): structure only, no model or data is read. Each
part of the recipe has its own small reader that appends every problem it finds, so one error lists them all;
the schema is run/recipe_schema.py, the checks against models, data and run configs run/recipe_check.py."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

from megatron_slim.compress.target import SIZE_FIELDS, TargetError, TargetSpec
from megatron_slim.errors import UserError
from megatron_slim.run.recipe_schema import (
    INITS,
    PRESETS,
    RECIPE_SIZES,
    RESERVED,
    RUN_OWNED,
    RUN_OWNED_DATA,
    STAGE_KEYS,
    TOP_KEYS,
    ClusterSection,
    DataSources,
    EvaluationSection,
    ImportanceSection,
    InferenceSection,
    Recipe,
    RecipeError,
    Stage,
    StageTraining,
    Study,
)
from megatron_slim.runtime.config_loader import load_dataclass, load_yaml
from megatron_slim.runtime.layout import SIZES, ParallelLayout


def merge(base: dict, over: dict) -> dict:
    """Deep merge of recipe or run-config mappings (mappings merge, values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _invalid(problems: list[str]) -> RecipeError:
    return RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))


def _name_problem(name: Any) -> str | None:
    """Why `name` cannot name a stage or a variant (it names work-dir entries and step ids); None when it can."""
    if not (isinstance(name, str) and name and name.replace("_", "").replace("-", "").isalnum()):
        return f"the name must be a non-empty word (letters, digits, - and _), got {name!r}"
    if name in RESERVED:
        return f"the name is reserved for the run's own steps ({', '.join(RESERVED)}), got {name!r}"
    return None


class _Paths:
    """Resolves the recipe's paths against the recipe file's directory."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def __call__(self, p: Any) -> Path:
        return (self.base_dir / str(p)).resolve() if p else Path()


def _training(training: Any, where: str, problems: list[str]) -> dict:
    """Run-config sections as given, refusing those the run sets itself."""
    if training is None:
        return {}
    if not isinstance(training, dict):
        problems.append(f"{where}: expected a mapping of run-config sections")
        return {}
    owned = sorted(RUN_OWNED & set(training))
    if owned:
        problems.append(f"{where}: {owned} are set by the run (teacher, stage checkpoints, recipe's parallel)")
    owned_data = sorted(RUN_OWNED_DATA & set(training.get("data") or {}))
    if owned_data:
        problems.append(f"{where}.data: {owned_data} come from the recipe's data section")
    if "save_dir" in (training.get("checkpoint") or {}):
        problems.append(f"{where}.checkpoint.save_dir is set by the run (<workdir>/<stage>/train)")
    return training


def _target(data: Any, where: str, problems: list[str]) -> TargetSpec | None:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping of target fields")
        return None
    try:
        return TargetSpec.from_dict(data, where=where)
    except TargetError as e:
        problems.append(str(e))
        return None


def _data(raw: dict, path: _Paths, problems: list[str]) -> DataSources:
    data = load_dataclass(DataSources, raw.get("data"), "data", problems)
    train = data.train
    if isinstance(train, str):
        train = str(path(train)) if train else ""
    elif isinstance(train, list) and all(isinstance(w, list) and len(w) == 2 for w in train):
        try:
            train = [[float(w), str(path(p))] for w, p in train]
        except (TypeError, ValueError):
            train = None
        if train is None or not all(math.isfinite(w) and w > 0 for w, _ in train):
            problems.append(f"data.train: blend weights must be positive finite numbers, got "
                            f"{[w for w, _ in data.train]!r}")
            train = data.train
    else:
        problems.append("data.train must be a .jsonl path or a list of [weight, indexed-dataset prefix]")
    if not train:
        problems.append("data.train is required")
    data = dataclasses.replace(data, train=train, calibration=str(path(data.calibration)) if data.calibration else "",
                               heldout=str(path(data.heldout)) if data.heldout else "")
    problems += [f"data.{key} is required" for key in ("calibration", "heldout") if not getattr(data, key)]
    return data


def _parallel(raw: dict, problems: list[str]) -> tuple[ParallelLayout, int]:
    """The recipe's layout and its local rank count (`nproc`, default: one model copy)."""
    parallel = load_dataclass(ParallelLayout, raw.get("parallel"), "parallel", problems)
    for key in sorted(set(SIZES) - set(RECIPE_SIZES) - {"etp"}):
        if getattr(parallel, key) != getattr(ParallelLayout(), key):
            problems.append(f"parallel.{key}: a recipe's steps run tp/pp/ep layouts only (set {key} in a run config "
                            "for `megatron-slim train`)")
    if parallel.etp is not None and parallel.etp < 1:
        problems.append(f"parallel.etp must be >= 1, got {parallel.etp}")
    nproc = raw.get("nproc", parallel.tp * parallel.pp * parallel.ep)
    if not isinstance(nproc, int) or nproc < 1:
        problems.append(f"nproc must be a positive integer, got {nproc!r}")
    return parallel, nproc


def _evaluation(raw: dict, problems: list[str]) -> EvaluationSection:
    evaluation = load_dataclass(EvaluationSection, raw.get("evaluation"), "evaluation", problems)
    if not isinstance(evaluation.tasks, list) or not all(isinstance(t, str) and t for t in evaluation.tasks):
        problems.append(f"evaluation.tasks must be a list of lm-eval task names, got {evaluation.tasks!r}")
    return evaluation


def _preset_stages(raw: dict, target: TargetSpec, problems: list[str]) -> list[dict]:
    """The stage mappings a preset derives from the final target and `train_tokens`."""
    preset = raw.get("preset")
    total = raw.get("train_tokens")
    try:
        total = float(total)
        if not math.isfinite(total) or total <= 0:
            raise ValueError(total)
    except (TypeError, ValueError):
        problems.append(f"preset {preset!r} needs train_tokens (total distillation tokens), got {total!r}")
        return []
    full = dataclasses.asdict(target)
    if preset == "one_shot":
        return [{"name": "one_shot", "target": full, "training": {"train": {"train_tokens": total}}}]
    split = raw.get("stage_token_split", [0.5, 0.5])
    if (not isinstance(split, list) or len(split) != 2 or not all(isinstance(x, (int, float)) for x in split)
            or not math.isclose(sum(split), 1.0) or min(split) <= 0):
        problems.append(f"stage_token_split must be two positive shares summing to 1, got {split!r}")
        return []
    # depth first: stage 1 only removes layers (keeping the planning options); stage 2 does everything else
    depth = {k: v for k, v in full.items() if k not in SIZE_FIELDS} | {"num_layers": target.num_layers}
    return [{"name": "depth", "target": depth, "training": {"train": {"train_tokens": total * split[0]}}},
            {"name": "width", "target": full, "training": {"train": {"train_tokens": total * split[1]}}}]


def _stage_mappings(raw: dict, final: TargetSpec | None, problems: list[str]) -> list[Any]:
    """The stages as mappings: derived from a preset, or as written under `stages`."""
    if "preset" in raw:
        if "stages" in raw:
            problems.append("give either preset (stages derived from target) or stages, not both")
        elif raw["preset"] not in PRESETS:
            problems.append(f"preset must be one of {list(PRESETS)}, got {raw['preset']!r}")
        elif final is None:
            problems.append(f"preset {raw['preset']!r} needs target (the final student)")
        elif raw["preset"] == "depth_first" and final.num_layers is None:
            problems.append("preset depth_first needs target.num_layers (its first stage prunes depth)")
        return _preset_stages(raw, final, problems) if not problems else []
    problems += [f"{key} only applies with a preset" for key in ("train_tokens", "stage_token_split") if key in raw]
    stages = raw.get("stages") or []
    if not isinstance(stages, list) or not stages:
        problems.append("stages: give a non-empty list of stages, or a preset")
        return []
    return stages


def _stage(s: Any, where: str, training: dict, problems: list[str]) -> Stage | None:
    """One stage; its training is the recipe's `training` merged with its own."""
    if not isinstance(s, dict):
        problems.append(f"{where}: expected a mapping")
        return None
    unknown = sorted(set(s) - STAGE_KEYS)
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (known: {sorted(STAGE_KEYS)})")
    name = s.get("name")
    bad_name = _name_problem(name)
    if bad_name:
        problems.append(f"{where}: {bad_name}")
        return None
    spec = _target(s.get("target", {}), f"{where}.target", problems)
    over = _training(s.get("training"), f"{where}.training", problems)
    flags = {k: s[k] for k in ("align_neurons", "rescale_norms") if k in s}
    bad = [k for k, v in flags.items() if not isinstance(v, bool)]
    if bad:
        problems.append(f"{where}: {bad} must be true or false")
    if spec is None or bad:
        return None
    return Stage(name=name, target=spec, training=StageTraining(merge(training, over)), **flags)


def _stages(raw: dict, training: dict, final: TargetSpec | None, problems: list[str]) -> list[Stage]:
    stages = [stage for i, s in enumerate(_stage_mappings(raw, final, problems))
              if (stage := _stage(s, f"stages[{i}]", training, problems)) is not None]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        problems.append(f"stage names must be unique, got {names}")
    return stages


def _options(raw: dict, problems: list[str]) -> tuple[str, int, bool]:
    """init, add_mtp_layers, export."""
    init, add_mtp, export = raw.get("init", "pruned"), raw.get("add_mtp_layers", 0), raw.get("export", True)
    if init not in INITS:
        problems.append(f"init must be one of {list(INITS)}, got {init!r}")
    if not isinstance(add_mtp, int) or isinstance(add_mtp, bool) or add_mtp < 0:
        problems.append(f"add_mtp_layers must be an integer >= 0, got {add_mtp!r}")
    if not isinstance(export, bool):
        problems.append(f"export must be true or false, got {export!r}")
    return init, add_mtp, export


def _inference(raw: dict, export: Any, path: _Paths, problems: list[str]) -> InferenceSection | None:
    """The efficiency table's settings, refused here as `bench-inference` would refuse them."""
    if raw.get("inference") is None:
        return None
    inference = load_dataclass(InferenceSection, raw["inference"], "inference", problems)
    bench = inference.job(models=())
    problems += bench.settings_problems(InferenceSection.key)
    if isinstance(inference.engines, list) and "vllm" in inference.engines:
        problems += bench.vllm_problems((path(raw["teacher"]),) if raw.get("teacher") else (), InferenceSection.key)
    if export is not True:
        problems.append("inference measures the exported student: it needs export: true")
    return inference


def _jobs(importance: ImportanceSection, evaluation: EvaluationSection, seq_len: int, parallel: ParallelLayout,
          problems: list[str]) -> None:
    """Refuse what the importance and evaluation workers would refuse, naming the recipe key: the sections build
    the jobs the steps run (paths aside), and each job validates itself."""
    placeholder = "<recipe>"
    for job, key in ((importance.job(placeholder, placeholder, Path(placeholder), seq_len, parallel),
                      ImportanceSection.key),
                     (evaluation.job(placeholder, placeholder, None, seq_len, parallel), EvaluationSection.key)):
        try:
            job.validate(key)
        except UserError as e:
            problems.append(str(e))


def _cluster(raw: dict, problems: list[str]) -> ClusterSection:
    cluster = load_dataclass(ClusterSection, raw.get("cluster"), "cluster", problems)
    if cluster.nodes < 1 or cluster.gpus_per_node < 0:
        problems.append(f"cluster: nodes must be >= 1 and gpus_per_node >= 0, got {cluster}")
    if cluster.gpu_memory:
        from megatron_slim.train.memory_plan import parse_memory

        try:
            parse_memory(cluster.gpu_memory)
        except ValueError as e:
            problems.append(f"cluster.gpu_memory: {e}")
    return cluster


def _timeout(raw: dict, problems: list[str]) -> float:
    timeout = raw.get("timeout_minutes", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        problems.append(f"timeout_minutes must be a positive number of minutes, got {timeout!r}")
        return 30.0
    return float(timeout)


def parse_recipe(raw: Any, base_dir: Path) -> Recipe:
    """A Recipe from parsed YAML; relative paths are relative to `base_dir`. Checks structure, not the models."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping (see megatron_slim/run/recipe_schema.py)")
    problems: list[str] = []
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {sorted(TOP_KEYS)})")
    path = _Paths(base_dir)
    if not raw.get("teacher"):
        problems.append("teacher is required (HF or Megatron checkpoint directory)")
    data = _data(raw, path, problems)
    parallel, nproc = _parallel(raw, problems)
    importance = load_dataclass(ImportanceSection, raw.get("importance"), "importance", problems)
    evaluation = _evaluation(raw, problems)
    if not problems:  # the sections' values have their types: the jobs can be built
        _jobs(importance, evaluation, data.seq_length, parallel, problems)
    training = _training(raw.get("training"), "training", problems)
    final = _target(raw.get("target", {}), "target", problems) if "target" in raw else None
    stages = _stages(raw, training, final, problems)
    init, add_mtp, export = _options(raw, problems)
    inference = _inference(raw, export, path, problems)
    cluster = _cluster(raw, problems)
    timeout = _timeout(raw, problems)
    if problems:
        raise _invalid(problems)
    return Recipe(name=str(raw.get("name", "run")), teacher=path(raw["teacher"]), data=data, parallel=parallel,
                  nproc=nproc, importance=importance, evaluation=evaluation, stages=stages, source=raw,
                  final_target=final, init=init, add_mtp_layers=add_mtp, export=export, inference=inference,
                  cluster=cluster, timeout_minutes=timeout)


def _variant(name: Any, over: Any, base: dict, base_dir: Path, problems: list[str]) -> Recipe | None:
    """One variant: the recipe deep-merged with its overrides; its problems are named after it."""
    bad_name = _name_problem(name)
    if bad_name:
        problems.append(f"variant {name!r}: {bad_name}")
        return None
    if not isinstance(over, dict):
        problems.append(f"variant {name!r}: overrides must be a mapping of recipe keys, got {over!r}")
        return None
    nested = sorted({"variants", "reference"} & set(over))
    if nested:
        problems.append(f"variant {name!r}: {nested} cannot be set by a variant")
        return None
    try:
        return dataclasses.replace(parse_recipe(merge(base, over), base_dir), variant=name)
    except RecipeError as e:
        problems += [f"variant {name!r}: {line.strip()[2:]}" for line in str(e).splitlines()[1:]]
        return None


def parse_study(raw: Any, base_dir: Path) -> Study:
    """The recipe as written, or each of its variants: the recipe deep-merged with the variant's overrides (any
    recipe key; mappings merge, other values replace). Every problem of every variant is reported at once."""
    if not isinstance(raw, dict) or "variants" not in raw:
        if isinstance(raw, dict) and "reference" in raw:
            raise _invalid(["reference only applies with variants"])
        return Study({None: parse_recipe(raw, base_dir)})
    variants, base = raw["variants"], {k: v for k, v in raw.items() if k not in ("variants", "reference")}
    if not isinstance(variants, dict) or not variants:
        raise _invalid(["variants: give a mapping of variant name -> overrides ({} for the recipe as written)"])
    problems: list[str] = []
    recipes: dict[str | None, Recipe] = {
        name: recipe for name, over in variants.items()
        if (recipe := _variant(name, over, base, base_dir, problems)) is not None}
    reference = raw.get("reference", next(iter(variants)))
    if reference not in variants:
        problems.append(f"reference {reference!r} is not one of the variants {list(variants)}")
    if problems:
        raise _invalid(problems)
    return Study(recipes, reference)


def read_study(path: str | Path) -> Study:
    """Parse a recipe file (structure only: no model or data is read)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    return parse_study(load_yaml(path), path.parent)
