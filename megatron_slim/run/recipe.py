"""The recipe: one YAML file takes a teacher to a compressed, distilled, evaluated student, in stages.

    name: slimqwen                      # free text, used in the report
    teacher: /ckpt/Qwen3-Next-80B-A3B   # HF dir (config.json) or Megatron checkpoint (model_config.json)
    data:
      train: /data/pretrain.jsonl       # .jsonl (tokenized once by the run) or [[weight, indexed prefix], ...]
      calibration: /data/calib.jsonl    # importance statistics (.jsonl or an indexed prefix)
      heldout: /data/heldout.jsonl      # evaluation (.jsonl or an indexed prefix); must not overlap training
      seq_length: 4096
    parallel: {tp: 1, pp: 1, ep: 8}     # layout of importance, distillation and evaluation (etp: expert TP)
    nproc: 8                            # local ranks when not launched by torchrun/srun
    cluster: {nodes: 16, gpus_per_node: 8, gpu_memory: 80GiB}   # optional: what the stages run on; the dry run
                                        # and the run refuse a stage whose memory plan does not fit
    importance: {tokens: 5e7}           # see ImportanceSection
    evaluation: {tokens: 1e7}           # see EvaluationSection
    training: {...}                     # run-config sections (batch, optimizer, schedule, loss, precision, ...)
                                        # shared by every stage; model/teacher/data/save_dir are the run's
    target: {num_layers: 36, ...}       # the final student (compress/target.py fields)
    preset: depth_first                 # one_shot | depth_first: stages derived from `target`
    train_tokens: 400e9                 # preset: distillation tokens over all stages
    stage_token_split: [0.5, 0.5]       # depth_first: share of train_tokens per stage
    stages:                             # or explicit stages instead of a preset
      - name: depth
        target: {num_layers: 36}        # sizes are absolute; unset sizes keep the previous stage's
        training: {train: {train_tokens: 2e11}, optimizer: {lr: 2e-4}}   # merged over `training`
        align_neurons: false            # prune options (see `megatron-slim prune --help`)
    init: pruned                        # pruned | random: the first stage's student pruned from the teacher,
                                        # or the planned architecture initialised as megatron-core initialises one
    add_mtp_layers: 0                   # MTP depths the first stage's student gains beyond the teacher's, fresh
                                        # (initialised as megatron-core does), trained by the MTP loss terms
    export: true                        # false: skip the final HF export (e.g. ablations)
    inference: {batch: 1, prompt_len: 512, gen_len: 64}   # optional: after the export, the deployment-efficiency
                                        # table (bench-inference on the HF teacher and the exported student);
                                        # engines: [transformers, vllm] adds vLLM (`make vllm-env`; vllm_python:
                                        # PATH names another interpreter)
    timeout_minutes: 30                 # process-group timeout: a hung collective or dead rank fails the job
    variants:                           # optional: settings to compare, each the recipe deep-merged with its
      pruned: {}                        # overrides (any key above); steps whose inputs agree run once
      random_init: {init: random}
      kd_only: {training: {loss: {kd_weight: 1.0}}}
    reference: pruned                   # the variant the comparison report measures the others against

Everything is checked by `load_recipe` before any compute: unknown keys, missing files, each stage's target
against the model it starts from (the configs are chained without touching weights), the final student against
`target`, and each stage's run config; with variants, every variant, each problem naming its variant.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_slim.compress.target import SIZE_FIELDS, TargetError, TargetSpec
from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.config_loader import load_dataclass, load_yaml
from megatron_slim.runtime.layout import SIZES, ParallelLayout

PRESETS = ("one_shot", "depth_first")
INITS = ("pruned", "random")
# run-config sections that the run owns: a recipe setting them would be silently overridden
_RUN_OWNED = {"model", "teacher", "parallel", "evaluation"}
_RUN_OWNED_DATA = {"blend", "seq_length", "cache_dir", "seed", "sample_offset", "stream_samples"}


class RecipeError(UserError):
    """The recipe is malformed or cannot be executed; raised before any compute."""


@dataclass(frozen=True)
class DataSources:
    """The recipe's raw data, one source per use (the run tokenizes .jsonl files once); each stage's distillation
    then reads the training source as the run config's `data.blend` (train/config.py DataSection)."""
    train: str | list[list[Any]] = ""
    calibration: str = ""
    heldout: str = ""
    seq_length: int = 1024


@dataclass(frozen=True)
class ClusterSection:
    """Where distillation runs: its world size and GPU memory size the memory plan (train/memory_plan.py)."""
    nodes: int = 1
    gpus_per_node: int = 0  # 0: the recipe's nproc
    gpu_memory: str = ""  # e.g. 80GiB; empty: the plan is printed without a verdict


# The parallel sizes a recipe's steps pass to their jobs (the `parallel:` section's keys). etp (expert tensor
# parallelism) is accepted too but only shapes distillation (stage_run_config): the steps that hold no optimizer
# run their experts at etp = tp.
RECIPE_SIZES = ("tp", "pp", "ep")


@dataclass(frozen=True)
class ImportanceSection:
    tokens: float = 1e6
    micro_batch: int = 1
    layer_loss: bool = False  # loss_increase depth criterion: one extra forward per layer
    dtype: str = "float32"  # float32 | bfloat16 (statistics accumulate in float64 either way)


@dataclass(frozen=True)
class EvaluationSection:
    tokens: float = 1e5  # held-out tokens for loss / perplexity / next-token accuracy
    micro_batch: int = 1
    mtp_k: int = 4  # speculative acceptance for drafts of 1..mtp_k tokens (models with MTP heads; 0: skip)
    mtp_prompts: int = 8  # held-out prompts the acceptance is measured on
    prompt_len: int = 0  # prompt tokens (0: half the sequence length)
    gen_tokens: int = 32  # greedy tokens generated after each prompt
    every_tokens: float = 0.0  # also evaluate the student during distillation every N tokens (0: only after)
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks every evaluation also scores (offline data)
    num_fewshot: int | None = None  # lm-eval few-shot examples (None: each task's default)
    limit: float | None = None  # lm-eval documents per task (a fraction when < 1; None: all)


@dataclass(frozen=True)
class InferenceSection:
    """`bench-inference` settings for the run's deployment-efficiency table (engines/bench_inference_job.py)."""

    batch: int = 1
    prompt_len: int = 512
    gen_len: int = 64
    dtype: str = "bfloat16"
    device: str = "auto"
    warmup: int = 1
    repeats: int = 3
    engines: list[str] = field(default_factory=lambda: ["transformers"])  # transformers and/or vllm
    vllm_python: str | None = None  # the vLLM environment's interpreter (None: .vllm-venv/ of the checkout)


@dataclass(frozen=True)
class Stage:
    name: str
    target: TargetSpec
    training: dict[str, Any]  # the stage's complete run-config overrides (recipe `training` merged with its own)
    align_neurons: bool = False
    rescale_norms: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    teacher: Path
    data: DataSources
    parallel: ParallelLayout
    nproc: int
    importance: ImportanceSection
    evaluation: EvaluationSection
    stages: list[Stage]
    source: dict[str, Any] = field(repr=False)  # the parsed YAML, for the work dir's record
    init: str = "pruned"  # pruned | random (the first stage's student)
    add_mtp_layers: int = 0  # fresh MTP depths the first stage's student gains
    export: bool = True  # the final HF export
    inference: InferenceSection | None = None  # the efficiency table after the export (None: not measured)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    variant: str | None = None  # the variant's name when the recipe declares variants
    timeout_minutes: float = 30.0  # process-group timeout of `run`: a hung collective fails the job after this

    @property
    def digest(self) -> str:
        """Identifies the recipe's content (a work dir belongs to one recipe)."""
        return hashlib.sha256(json.dumps(self.source, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"no stage {name!r} in the recipe (stages: {[s.name for s in self.stages]})")


# ---- parsing --------------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    """Deep merge of run-config sections (mappings merge, values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_training(training: Any, where: str, problems: list[str]) -> dict:
    if training is None:
        return {}
    if not isinstance(training, dict):
        problems.append(f"{where}: expected a mapping of run-config sections")
        return {}
    owned = sorted(_RUN_OWNED & set(training))
    if owned:
        problems.append(f"{where}: {owned} are set by the run (teacher, stage checkpoints, recipe's parallel)")
    owned_data = sorted(_RUN_OWNED_DATA & set(training.get("data") or {}))
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


def _preset_stages(raw: dict, target: TargetSpec, training: dict, problems: list[str]) -> list[dict]:
    preset = raw.get("preset")
    total = raw.get("train_tokens")
    try:
        total = float(total)
        if not math.isfinite(total) or total <= 0:
            raise ValueError(total)
    except (TypeError, ValueError):
        problems.append(f"preset {preset!r} needs train_tokens (total distillation tokens), got {total!r}")
        return []
    full = {k: v for k, v in dataclasses.asdict(target).items()}
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


_TOP_KEYS = {"name", "teacher", "data", "parallel", "nproc", "importance", "evaluation", "training", "target",
             "preset", "train_tokens", "stage_token_split", "stages", "init", "add_mtp_layers", "export",
             "inference", "cluster", "timeout_minutes"}
# names the run gives its own step groups and work-dir entries
RESERVED = ("prepare", "final", "shared", "variants")
_STAGE_KEYS = {"name", "target", "training", "align_neurons", "rescale_norms"}


def parse_recipe(raw: Any, base_dir: Path) -> Recipe:
    """A Recipe from parsed YAML; relative paths are relative to `base_dir`. Checks structure, not the models."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping (see megatron_slim/run/recipe.py)")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {sorted(_TOP_KEYS)})")

    def path(p: Any) -> Path:
        return (base_dir / str(p)).resolve() if p else Path()

    if not raw.get("teacher"):
        problems.append("teacher is required (HF or Megatron checkpoint directory)")
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
    for key in ("calibration", "heldout"):
        if not getattr(data, key):
            problems.append(f"data.{key} is required")
    parallel = load_dataclass(ParallelLayout, raw.get("parallel"), "parallel", problems)
    for key in sorted(set(SIZES) - set(RECIPE_SIZES) - {"etp"}):
        if getattr(parallel, key) != getattr(ParallelLayout(), key):
            problems.append(f"parallel.{key}: a recipe's steps run tp/pp/ep layouts only (set {key} in a run config "
                            "for `megatron-slim train`)")
    nproc = raw.get("nproc", parallel.tp * parallel.pp * parallel.ep)
    if not isinstance(nproc, int) or nproc < 1:
        problems.append(f"nproc must be a positive integer, got {nproc!r}")
    importance = load_dataclass(ImportanceSection, raw.get("importance"), "importance", problems)
    evaluation = load_dataclass(EvaluationSection, raw.get("evaluation"), "evaluation", problems)
    if not isinstance(evaluation.tasks, list) or not all(isinstance(t, str) and t for t in evaluation.tasks):
        problems.append(f"evaluation.tasks must be a list of lm-eval task names, got {evaluation.tasks!r}")
    training = _check_training(raw.get("training"), "training", problems)

    final = _target(raw.get("target", {}), "target", problems) if "target" in raw else None
    if "preset" in raw:
        if "stages" in raw:
            problems.append("give either preset (stages derived from target) or stages, not both")
        elif raw["preset"] not in PRESETS:
            problems.append(f"preset must be one of {list(PRESETS)}, got {raw['preset']!r}")
        elif final is None:
            problems.append(f"preset {raw['preset']!r} needs target (the final student)")
        elif raw["preset"] == "depth_first" and final.num_layers is None:
            problems.append("preset depth_first needs target.num_layers (its first stage prunes depth)")
        stage_dicts = _preset_stages(raw, final, training, problems) if not problems else []
    else:
        for key in ("train_tokens", "stage_token_split"):
            if key in raw:
                problems.append(f"{key} only applies with a preset")
        stage_dicts = raw.get("stages") or []
        if not isinstance(stage_dicts, list) or not stage_dicts:
            problems.append("stages: give a non-empty list of stages, or a preset")
            stage_dicts = []

    stages: list[Stage] = []
    for i, s in enumerate(stage_dicts):
        where = f"stages[{i}]"
        if not isinstance(s, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        unknown = sorted(set(s) - _STAGE_KEYS)
        if unknown:
            problems.append(f"{where}: unknown keys {unknown} (known: {sorted(_STAGE_KEYS)})")
        name = s.get("name")
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"{where}: name must be a non-empty word (letters, digits, - and _), got {name!r}")
            continue
        if name in RESERVED:
            problems.append(f"{where}: {name!r} is reserved for the run's own steps")
            continue
        spec = _target(s.get("target", {}), f"{where}.target", problems)
        over = _check_training(s.get("training"), f"{where}.training", problems)
        flags = {k: s[k] for k in ("align_neurons", "rescale_norms") if k in s}
        bad = [k for k, v in flags.items() if not isinstance(v, bool)]
        if bad:
            problems.append(f"{where}: {bad} must be true or false")
        if spec is not None and not bad:
            stages.append(Stage(name=name, target=spec, training=_merge(training, over), **flags))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        problems.append(f"stage names must be unique, got {names}")
    init = raw.get("init", "pruned")
    if init not in INITS:
        problems.append(f"init must be one of {list(INITS)}, got {init!r}")
    add_mtp, export = raw.get("add_mtp_layers", 0), raw.get("export", True)
    if not isinstance(add_mtp, int) or isinstance(add_mtp, bool) or add_mtp < 0:
        problems.append(f"add_mtp_layers must be an integer >= 0, got {add_mtp!r}")
    if not isinstance(export, bool):
        problems.append(f"export must be true or false, got {export!r}")
    inference = None
    if raw.get("inference") is not None:
        from megatron_slim.engines.bench_inference_job import BenchInferenceJob

        inference = load_dataclass(InferenceSection, raw["inference"], "inference", problems)
        bench = BenchInferenceJob(models=(), **dataclasses.asdict(inference))
        problems += bench.settings_problems(lambda key: f"inference.{key}")
        if isinstance(inference.engines, list) and "vllm" in inference.engines:
            problems += bench.vllm_problems((path(raw["teacher"]),) if raw.get("teacher") else (),
                                            lambda key: f"inference.{key}")
        if export is not True:
            problems.append("inference measures the exported student: it needs export: true")
    cluster = load_dataclass(ClusterSection, raw.get("cluster"), "cluster", problems)
    if cluster.nodes < 1 or cluster.gpus_per_node < 0:
        problems.append(f"cluster: nodes must be >= 1 and gpus_per_node >= 0, got {cluster}")
    if cluster.gpu_memory:
        from megatron_slim.train.memory_plan import parse_memory

        try:
            parse_memory(cluster.gpu_memory)
        except ValueError as e:
            problems.append(f"cluster.gpu_memory: {e}")
    if parallel.etp is not None and parallel.etp < 1:
        problems.append(f"parallel.etp must be >= 1, got {parallel.etp}")
    timeout = raw.get("timeout_minutes", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        problems.append(f"timeout_minutes must be a positive number of minutes, got {timeout!r}")
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return Recipe(name=str(raw.get("name", "run")), teacher=path(raw["teacher"]), data=data, parallel=parallel,
                  nproc=nproc, importance=importance, evaluation=evaluation, stages=stages,
                  source=raw | {"_final_target": dataclasses.asdict(final) if final else None}, init=init,
                  add_mtp_layers=add_mtp, export=export, inference=inference, cluster=cluster,
                  timeout_minutes=float(timeout))


# ---- checks against the models (configs only) -------------------------------------------------------------------
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
    wanted = recipe.source.get("_final_target")
    if not wanted:
        return
    spec = TargetSpec.from_dict({k: v for k, v in wanted.items()})
    expected = spec.target_config(teacher, spec.placeholder_layers(teacher))
    expected = expected.replace(mtp_num_layers=expected.mtp_num_layers + recipe.add_mtp_layers)
    diffs = [f"{k}: stages give {getattr(final, k)}, target wants {getattr(expected, k)}"
             for k in ("num_layers", "hidden_size", "num_experts", "topk", "moe_ffn_hidden_size",
                       "shared_expert_ffn_hidden_size", "num_query_groups", "linear_num_key_heads", "mtp_num_layers")
             if getattr(final, k) != getattr(expected, k)]
    if diffs:
        raise RecipeError("invalid recipe: the stages do not end at `target`:\n  - " + "\n  - ".join(diffs))


@dataclass(frozen=True)
class Study:
    """What a recipe file asks for: one run (`variants` empty, the recipe under the key None), or variants of it,
    each a complete recipe, compared against `reference`."""

    recipes: dict[str | None, Recipe]
    reference: str | None = None

    @property
    def variants(self) -> list[str]:
        return [name for name in self.recipes if name is not None]

    def recipe(self, variant: str | None) -> Recipe:
        if variant not in self.recipes:
            if variant is None:
                raise RecipeError(f"the recipe declares variants {self.variants}: name one with --variant, or run "
                                  "them all")
            raise RecipeError(f"no variant {variant!r} in the recipe (variants: {self.variants or 'none'})")
        return self.recipes[variant]


def parse_study(raw: Any, base_dir: Path) -> Study:
    """The recipe as written, or each of its variants: the recipe deep-merged with the variant's overrides (any
    recipe key; mappings merge, other values replace). Every problem of every variant is reported at once."""
    if not isinstance(raw, dict) or "variants" not in raw:
        if isinstance(raw, dict) and "reference" in raw:
            raise RecipeError("invalid recipe:\n  - reference only applies with variants")
        return Study({None: parse_recipe(raw, base_dir)})
    variants, base = raw["variants"], {k: v for k, v in raw.items() if k not in ("variants", "reference")}
    if not isinstance(variants, dict) or not variants:
        raise RecipeError("invalid recipe:\n  - variants: give a mapping of variant name -> overrides ({} for the "
                          "recipe as written)")
    recipes: dict[str | None, Recipe] = {}
    problems: list[str] = []
    for name, over in variants.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"variant {name!r}: a name is a word (letters, digits, - and _)")
            continue
        if name in RESERVED:
            problems.append(f"variant {name!r}: the name is reserved for the run's own steps")
            continue
        if not isinstance(over, dict):
            problems.append(f"variant {name!r}: overrides must be a mapping of recipe keys, got {over!r}")
            continue
        nested = sorted({"variants", "reference"} & set(over))
        if nested:
            problems.append(f"variant {name!r}: {nested} cannot be set by a variant")
            continue
        try:
            recipes[name] = dataclasses.replace(parse_recipe(_merge(base, over), base_dir), variant=name)
        except RecipeError as e:
            problems += [f"variant {name!r}: {line.strip()[2:]}" for line in str(e).splitlines()[1:]]
    reference = raw.get("reference", next(iter(variants)))
    if reference not in variants:
        problems.append(f"reference {reference!r} is not one of the variants {list(variants)}")
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return Study(recipes, reference)


def read_study(path: str | Path) -> Study:
    """Parse a recipe file (structure only: no model or data is read)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    return parse_study(load_yaml(path), path.parent)


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
    for stage in recipe.stages:
        try:
            run_config_from_dict(stage_run_config(recipe, stage, "<student>", "<teacher>", [[1.0, "<data>"]],
                                                  "<save>")).validate(recipe.nproc)
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
    cfg = copy.deepcopy(stage.training)
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
def _stage_config(recipe: Recipe, stage: Stage):
    from megatron_slim.train.config import run_config_from_dict

    cfg = copy.deepcopy(stage.training)
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
