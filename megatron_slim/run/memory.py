"""The memory plan of every distillation stage of a recipe (train/memory_plan.py), before anything runs: the dry
run prints it, and a stage that does not fit the GPUs (`cluster.gpu_memory` or `run --gpu-memory`) is refused
with its largest component and the cheapest changes that would make it fit."""
from __future__ import annotations

from megatron_slim.models.config import ModelConfig
from megatron_slim.run.recipe_check import stage_run_config
from megatron_slim.run.recipe_schema import Recipe, RecipeError
from megatron_slim.train.config import run_config_from_dict
from megatron_slim.train.memory_plan import StagePlan, StageSetup, parse_memory, plan_stage, refusal, setup_of


def world_size(recipe: Recipe) -> int:
    """The GPUs a stage trains on: cluster.nodes x cluster.gpus_per_node, else the recipe's nproc."""
    c = recipe.cluster
    return c.nodes * (c.gpus_per_node or recipe.nproc) if c.gpus_per_node or c.nodes > 1 else recipe.nproc


def stage_setups(recipe: Recipe, teacher: ModelConfig, configs: list[ModelConfig],
                 gpu_memory: str | None = None) -> list[StageSetup]:
    """Each stage's plan inputs: its student, the online teacher, its run config's knobs and batch, the world."""
    text = gpu_memory or recipe.cluster.gpu_memory
    try:
        gpu = parse_memory(text) if text else None
    except ValueError as e:
        raise RecipeError(f"--gpu-memory: {e}") from None
    world = world_size(recipe)
    out = []
    for stage, cfg in zip(recipe.stages, configs):
        run = run_config_from_dict(stage_run_config(recipe, stage, "<student>", "<teacher>", [[1.0, "<data>"]],
                                                    "<save>"))
        try:
            out.append(setup_of(stage.name, run, cfg, teacher, world, gpu))
        except ValueError as e:
            raise RecipeError(f"stage {stage.name!r}: {world} GPUs do not fit the layout: {e}") from None
    return out


def plans(setups: list[StageSetup]) -> list[StagePlan]:
    return [plan_stage(s) for s in setups]


def check_fit(setups: list[StageSetup], stage_plans: list[StagePlan], where: str = "") -> None:
    """Refuse (RecipeError) when a stage's plan exceeds the usable GPU memory, naming why and what would fit."""
    bad = [refusal(s, p) for s, p in zip(setups, stage_plans) if p.fits is False]
    if bad:
        raise RecipeError(f"{where}does not fit the GPUs:\n" + "\n".join(bad))
