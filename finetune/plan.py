"""Memory plan: what a recipe needs per GPU, before any weight is loaded.

    python -m finetune.plan recipes/sft.yaml --gpus 8 --gpu-memory 80 [--nodes 1] [--zero 3] [--offload]

How the plan is computed: finetune/planning/memory.py; what fits instead: finetune/planning/alternatives.py.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import check_number, invoked_as
from finetune.errors import InputError
from finetune.model.config import ModelSourceError, read_model_config
from finetune.model.shapes import shape_problems
from finetune.planning.alternatives import fitting_setups, render_suggestions
from finetune.planning.memory import (
    GIB,
    Plan,
    Setup,
    count_parameters,
    deepspeed_estimate,
    estimate,
    zero_settings,
)
from finetune.planning.prefetch import DEFAULT_MAX_LIVE, bucket_size
from finetune.planning.report import render
from finetune.planning.traffic import traffic_lines
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("plan"), description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (or CPU processes) per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, to say whether it fits")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="override the launch config")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    args = parser.parse_intermixed_args(argv)
    for option, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    check_number("--gpu-memory", args.gpu_memory, minimum=0, above=True)
    recipe = load_recipe(args.recipe, args.overrides)
    stage, off_opt, off_param, ds_settings = zero_settings(recipe, args.zero, args.offload)
    if recipe.quantization != "none" and (stage or off_opt or off_param):
        raise InputError(f"--zero {stage} / --offload: quantization: {recipe.quantization} runs without DeepSpeed "
                         "(one whole 4-bit copy per GPU); leave them out or use --zero 0 --no-offload")
    try:
        config, source = read_model_config(recipe.model, builtin=True)
    except ModelSourceError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    problems = shape_problems(config, 2 if args.device == "gpu" else 4, recipe.quantization != "none")
    if problems:
        raise InputError(f"{recipe.source}: model {recipe.model}: {problems[0]}")
    world = args.gpus * args.nodes
    if world % recipe.sequence_parallel:
        raise InputError(f"{recipe.source}: sequence_parallel: {recipe.sequence_parallel} must divide the {world} "
                         f"processes (--gpus {args.gpus} x --nodes {args.nodes})")
    check_expert_parallel(recipe, config, args, world, stage or off_opt or off_param)
    counts = count_parameters(recipe, config)
    setup = Setup(args.gpus, args.nodes, stage, off_opt, off_param, recipe.data.max_length,
                  recipe.train.get("per_device_train_batch_size", 8), recipe.train.get("gradient_accumulation_steps", 1),
                  float(ds_settings.get("stage3_max_live_parameters", DEFAULT_MAX_LIVE)),
                  float(ds_settings.get("stage3_max_reuse_distance", 1e9)), recipe.quantization,
                  bucket_size(ds_settings.get("stage3_prefetch_bucket_size"), config), recipe.expert_parallel)
    plan = estimate(recipe, config, counts, setup, args.device)
    ds = deepspeed_estimate(counts, args.gpus, args.nodes, stage, off_opt, off_param) if args.device == "gpu" else None
    print(render(recipe, source, counts, plan, args, setup, ds))
    for line in traffic_lines(config, counts, setup, 2 if args.device == "gpu" else 4):
        print(line)
    if args.gpu_memory and plan.total > args.gpu_memory * GIB:
        plans: dict[Setup, Plan] = {}

        def fits(candidate: Setup) -> bool:
            if candidate not in plans:
                plans[candidate] = estimate(recipe, config, counts, candidate, args.device)
            return plans[candidate].total <= args.gpu_memory * GIB

        chosen = fitting_setups(setup, fits, experts=config.num_local_experts)
        print(render_suggestions(args, setup, {s: plans[s] for s in chosen}, "GPU" if args.device == "gpu" else "process"))
    return 0


def check_expert_parallel(recipe, config, args, world: int, deepspeed: bool) -> None:
    ep = recipe.expert_parallel
    if ep == 1:
        return
    if deepspeed:
        raise InputError(f"--zero / --offload: expert_parallel: {ep} runs without DeepSpeed (plain data parallel); "
                         "leave them out or use --zero 0 --no-offload")
    if config.num_local_experts % ep:
        raise InputError(f"{recipe.source}: expert_parallel: {ep} must divide the model's {config.num_local_experts} "
                         "experts per layer")
    if world % ep:
        raise InputError(f"{recipe.source}: expert_parallel: {ep} must divide the {world} processes "
                         f"(--gpus {args.gpus} x --nodes {args.nodes})")


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
