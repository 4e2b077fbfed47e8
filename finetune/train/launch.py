"""Where ZeRO-3 and the other launch modes are configured in code: relaunching a pass under `accelerate
launch` with the recipe's `launch` file, what a launched process is (rank, DeepSpeed or not), DeepSpeed
Ulysses sequence parallelism, ZeRO-3 leaf modules for the MoE blocks, and what DDP leaves alone (a 4-bit
base, expert-parallel shards).

The accelerate files themselves are recipes/accelerate/*.yaml (read by finetune/recipe/launch_file.py).
"""

from __future__ import annotations

import os
import subprocess

from torch import nn

from finetune.moe.nf4 import quantized_stacks
from finetune.moe.router import moe_blocks
from finetune.private_apis import ddp_ignore_parameters
from finetune.recipe.schema import Recipe, RecipeError

ZERO3_LEAF_CLASSES = ("MixtralSparseMoeBlock",)
"""The MoE block classes ZeRO-3 gathers whole; recipes/accelerate's ZeRO-3 files name the same ones in
`deepspeed_moe_layer_cls_names` (tests/test_recipes.py checks that they agree)."""


def is_launched() -> bool:
    """Whether this process was started by `accelerate launch` (or torchrun)."""
    return "LOCAL_RANK" in os.environ


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def is_main_process() -> bool:
    """Rank 0 of the launch (or the only process), before torch.distributed is set up."""
    return int(os.environ.get("RANK", "0")) == 0


def should_relaunch(recipe: Recipe) -> bool:
    """Whether this process should start the pass again under `accelerate launch` with the recipe's `launch`
    file: it names one, and this process is not already such a launch (or its parent)."""
    return recipe.launch is not None and not os.environ.get("FINETUNE_LAUNCHED") and not is_launched()


def relaunch_with_accelerate(recipe: Recipe, recipe_path: str, overrides: list[str]) -> int:
    """Run the pass under `accelerate launch --config_file recipe.launch`; the launched run's exit code."""
    command = ["accelerate", "launch", "--config_file", recipe.launch, "-m", f"finetune.{recipe.kind}",
               recipe_path, *overrides]
    print("launching: " + " ".join(command), flush=True)
    return subprocess.call(command, env={**os.environ, "FINETUNE_LAUNCHED": "1"})


def sequence_parallel_config(size: int, attention: str = "sdpa"):
    """accelerate's ParallelismConfig for DeepSpeed Ulysses over `size` processes: transformers' Trainer hands
    it to accelerate, which registers Ulysses attention and shards each batch's tokens across the group.
    Variable lengths: packed rows and single samples differ from batch to batch."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attention)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=size, sp_handler=handler)


def check_sequence_parallel_runs_here(recipe: Recipe, heads: int) -> None:
    """Ulysses gives each process whole attention heads, and needs DeepSpeed: the recipe's `launch` (checked at
    parse time) or the `accelerate launch` this process runs under."""
    sp, src = recipe.sequence_parallel, recipe.source
    if heads % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the model's {heads} attention heads "
                          "(Ulysses gives each process whole heads)")
    launched = is_launched()
    if (launched and not launched_with_deepspeed()) or (not launched and recipe.launch is None):
        raise RecipeError(f"{src}: sequence_parallel: {sp} runs under DeepSpeed (Ulysses); set launch: "
                          "recipes/accelerate/zero3.yaml (or another DeepSpeed config), or `accelerate launch` with one")
    world = int(os.environ.get("WORLD_SIZE", sp))
    if launched and world % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the {world} launched processes")


def check_expert_parallel_runs_here(recipe: Recipe, experts: int) -> None:
    """What only the model and the launched processes can tell: N divides the experts and the processes,
    and no DeepSpeed launch (the recipe's `launch` was checked at parse time)."""
    src, ep = recipe.source, recipe.expert_parallel
    if experts % ep:
        raise RecipeError(f"{src}: expert_parallel: {ep} must divide the model's {experts} experts per layer "
                          f"(model={recipe.model}); use a divisor of {experts}")
    if not is_launched():
        if recipe.launch is None:
            raise RecipeError(f"{src}: expert_parallel: {ep} needs {ep} or a multiple of {ep} processes; set launch: "
                              "recipes/accelerate/ep8.yaml, or start it with accelerate launch")
        return  # relaunched under the recipe's launch file, whose processes were checked at parse time
    if launched_with_deepspeed():
        raise RecipeError(f"{src}: expert_parallel: {ep} runs under plain data parallel, not DeepSpeed; launch with "
                          "recipes/accelerate/ep8.yaml")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % ep:
        raise RecipeError(f"{src}: expert_parallel: {ep} must divide the {world} launched processes")


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> bool:
    """Under ZeRO-3, gather each sparse MoE block's parameters as one unit. Ranks route their tokens to
    different experts, so per-expert gathers would stop matching across ranks and hang (DeepSpeed#4808).
    The accelerate files name the same classes (`deepspeed_moe_layer_cls_names`: ZERO3_LEAF_CLASSES)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted({type(block) for block in moe_blocks(model)}, key=lambda c: c.__name__))
    return True


def keep_out_of_ddp(model: nn.Module, recipe: Recipe) -> int:
    """Tell DistributedDataParallel to leave alone what differs or cannot travel between processes; returns
    how many parameters that is.
    - The NF4 expert stacks: DDP cannot broadcast them at start-up (they are not plain tensors). Every rank
      quantized the same checkpoint the same way, and they never train, so there is nothing to synchronise.
    - Under expert parallelism, each process's experts (finetune/moe/expert_shards.py): they differ by
      design, so DDP's start-up broadcast would overwrite them with rank 0's and its all-reduce would average
      different experts; their gradients are averaged by finetune/moe/expert_parallel.py instead."""
    names = list(quantized_stacks(model))
    if recipe.expert_parallel > 1:
        from finetune.moe.expert_shards import shard_experts

        names += list(shard_experts(model, recipe.expert_parallel))
    if names:
        ddp_ignore_parameters(model, names)
    return len(names)


def prepare_for_launch(model: nn.Module, recipe: Recipe) -> nn.Module:
    """What the launch mode needs of a loaded model: ZeRO-3 leaf MoE blocks, 4-bit stacks and expert shards
    kept out of DDP."""
    mark_moe_blocks_as_zero3_leaves(model)
    keep_out_of_ddp(model, recipe)
    return model
