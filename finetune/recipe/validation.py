"""The combinations a recipe refuses at parse time, section by section, each error naming the recipe file,
the key and the fix. Called by `load_recipe` (finetune/recipe/loading.py); what can only be known on the
machine that runs the pass (the model's config, the launched processes) is checked at preflight
(finetune/train/preflight.py)."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.files.hub_ids import is_hub_id, looks_like_hub_id
from finetune.recipe.launch_file import launch_processes, uses_deepspeed
from finetune.recipe.library_keys import check_library_keys, trainer_config_class
from finetune.recipe.schema import OWNED_TRAIN_KEYS, Recipe, RecipeError


def validate(recipe: Recipe) -> None:
    src = recipe.source
    check_library_keys(recipe.train, trainer_config_class(recipe.kind), OWNED_TRAIN_KEYS, src, "train.")
    validate_data(recipe)
    validate_trainable(recipe)
    for key in ("aux_loss_coef", "z_loss_coef"):
        if getattr(recipe.moe, key) < 0:
            raise RecipeError(f"{src}: moe.{key} must be >= 0, got {getattr(recipe.moe, key)}")
    validate_hub(recipe)
    if recipe.launch is not None:
        if not Path(recipe.launch).is_file():
            raise RecipeError(f"{src}: launch={recipe.launch!r}: no such accelerate config")
        launch_processes(recipe.launch)  # read now: a broken launch file is named here, not by accelerate later
    if recipe.stop_after_steps is not None and recipe.stop_after_steps < 1:
        raise RecipeError(f"{src}: stop_after_steps must be >= 1, got {recipe.stop_after_steps}")
    if recipe.kind == "sft" and recipe.dpo.sft_adapter is not None:
        raise RecipeError(f"{src}: dpo.sft_adapter belongs in a DPO recipe")
    if recipe.quantization != "none":
        validate_quantization(recipe)
    validate_attention(recipe)
    if recipe.sequence_parallel != 1:
        validate_sequence_parallel(recipe)
    if recipe.expert_parallel != 1:
        validate_expert_parallel(recipe)


MASKED_ATTENTION = ("sdpa", "eager")
"""The kernels that see a packed row as one sequence plus a block-diagonal mask (transformers builds it from the
restarting `position_ids`); the others take the rows' boundaries (`cu_seq_lens`), need CUDA and need no mask."""
ATTENTION_IMPLEMENTATIONS = (*MASKED_ATTENTION, "flash_attention_2", "flash_attention_3")
HUB_KERNEL = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:\w+)?$")  # transformers' `org/name[@rev][:function]`
ULYSSES_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")  # what DeepSpeed's Ulysses wraps


def validate_attention(recipe: Recipe) -> None:
    src, attention = recipe.source, recipe.attn_implementation
    if attention not in ATTENTION_IMPLEMENTATIONS and not HUB_KERNEL.match(attention):
        raise RecipeError(f"{src}: attn_implementation={attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
                          "or a Hub kernel org/name (e.g. kernels-community/flash-attn2)")
    if attention not in MASKED_ATTENTION and recipe.device == "cpu":
        raise RecipeError(f"{src}: attn_implementation: {attention} runs on CUDA only, and the recipe says device: cpu; "
                          "set attn_implementation=sdpa")
    if recipe.sequence_parallel != 1 and attention not in ULYSSES_ATTENTION:
        raise RecipeError(f"{src}: sequence_parallel wraps {', '.join(ULYSSES_ATTENTION)} attention only, not "
                          f"attn_implementation: {attention}")


def validate_hub(recipe: Recipe) -> None:
    src, hub = recipe.source, recipe.hub
    for key in ("repo_id", "base_id"):
        value = getattr(hub, key)
        if value is not None and not looks_like_hub_id(value):
            raise RecipeError(f"{src}: hub.{key} must look like ORG/NAME, got {value!r}")
    if hub.repo_id is not None and hub.base_id is None and not is_hub_id(recipe.model) and recipe.method == "lora":
        raise RecipeError(f"{src}: hub.repo_id pushes an adapter of model={recipe.model}, a folder of this machine; set "
                          "hub.base_id to the base's Hub id (ORG/NAME), which the pushed adapter will name")


def validate_data(recipe: Recipe) -> None:
    src, data = recipe.source, recipe.data
    if not data.train:
        raise RecipeError(f"{src}: data.train must name at least one source")
    for group in ("train", "eval"):
        for i, s in enumerate(getattr(data, group)):
            if s.weight <= 0:
                raise RecipeError(f"{src}: data.{group}[{i}].weight must be > 0, got {s.weight}")
    if not 0 <= data.eval_fraction < 1:
        raise RecipeError(f"{src}: data.eval_fraction must be in [0, 1), got {data.eval_fraction}")
    if data.num_proc is not None and data.num_proc < 1:
        raise RecipeError(f"{src}: data.num_proc must be >= 1 (or left out for automatic), got {data.num_proc}")
    if data.max_length < 8:
        raise RecipeError(f"{src}: data.max_length must be at least 8 tokens, got {data.max_length}")
    if data.packing and recipe.kind == "dpo":
        raise RecipeError(f"{src}: data.packing is for SFT only; DPO keeps each pair whole")


def validate_trainable(recipe: Recipe) -> None:
    """`method`, `trainable` and the LoRA fields that go with them."""
    src, groups, peft = recipe.source, recipe.trainable, recipe.lora.peft
    if not groups:
        raise RecipeError(f"{src}: trainable is empty: nothing would train")
    if len(set(groups)) != len(groups):
        raise RecipeError(f"{src}: trainable lists a group twice: {groups}")
    if recipe.method == "full":
        if peft:
            raise RecipeError(f"{src}: lora.{next(iter(peft))} has no meaning with method: full")
        if recipe.kind == "dpo":
            raise RecipeError(f"{src}: method: full is not supported for DPO (the reference would be a copy)")
        return
    if groups == ["router"]:
        raise RecipeError(f"{src}: trainable: [router] gives LoRA nothing to adapt (the router trains in full, "
                          "not through LoRA); add attention or experts, or train the router alone with method: full")
    for key in ("r", "lora_alpha"):
        if key in peft and peft[key] <= 0:
            raise RecipeError(f"{src}: lora.{key} must be > 0, got {peft[key]}")
    dropout = peft.get("lora_dropout", 0.0)
    if "experts" in groups and dropout:
        raise RecipeError(
            f"{src}: lora.lora_dropout={dropout} is impossible with 'experts' in trainable: "
            "PEFT's LoRA on fused expert parameters (target_parameters) has no dropout. "
            "Set lora.lora_dropout: 0 or drop 'experts' from trainable."
        )
    for key in ("use_dora", "lora_bias"):
        if "experts" in groups and peft.get(key):
            raise RecipeError(f"{src}: lora.{key} is not supported on fused expert parameters")


def validate_quantization(recipe: Recipe) -> None:
    src, what = recipe.source, f"quantization: {recipe.quantization}"
    if recipe.method == "full":
        raise RecipeError(f"{src}: {what} needs method: lora (4-bit weights cannot train); "
                          "use quantization: none for full training")
    if recipe.lora.expert_kernel != "routed":
        raise RecipeError(f"{src}: {what} needs lora.expert_kernel: routed (PEFT's expert path rebuilds every "
                          "expert's 16-bit weight on each forward, which is what 4-bit is meant to avoid)")
    if recipe.launch is not None and uses_deepspeed(recipe.launch):
        raise RecipeError(f"{src}: {what} does not run under DeepSpeed (launch={recipe.launch}): ZeRO cannot "
                          "partition or broadcast the 4-bit expert stacks. Use one whole 4-bit copy per GPU: "
                          "launch: recipes/accelerate/single.yaml, or recipes/accelerate/ddp.yaml for several GPUs")


def validate_sequence_parallel(recipe: Recipe) -> None:
    src, sp = recipe.source, recipe.sequence_parallel
    if sp < 1:
        raise RecipeError(f"{src}: sequence_parallel must be >= 1, got {sp}")
    if recipe.kind != "sft":
        raise RecipeError(f"{src}: sequence_parallel is for SFT; DPO keeps each pair whole on one process")
    if recipe.launch is None:  # `accelerate launch` itself may bring DeepSpeed: checked at preflight
        return
    if not uses_deepspeed(recipe.launch):
        raise RecipeError(f"{src}: sequence_parallel: {sp} runs under DeepSpeed (Ulysses); set launch to a DeepSpeed "
                          f"config, e.g. recipes/accelerate/zero3.yaml (launch={recipe.launch})")
    processes = launch_processes(recipe.launch)
    if processes % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the processes of {recipe.launch} "
                          f"(num_processes: {processes})")


def validate_expert_parallel(recipe: Recipe) -> None:
    src, ep = recipe.source, recipe.expert_parallel
    what = f"expert_parallel: {ep}"
    if ep < 1:
        raise RecipeError(f"{src}: expert_parallel must be >= 1, got {ep}")
    if recipe.kind != "sft":
        raise RecipeError(f"{src}: {what} is for SFT only: TRL builds DPO's reference adapter after the experts are "
                          "split, and DDP's start-up broadcast would give every process rank 0's reference experts. "
                          "Set expert_parallel=1 (a ZeRO-3 launch for DPO: recipes/accelerate/zero3.yaml)")
    if recipe.quantization != "none":
        raise RecipeError(f"{src}: {what} with quantization: {recipe.quantization} is not supported (the 4-bit expert "
                          "stacks are not cut per process); use quantization: none, or expert_parallel=1")
    if recipe.sequence_parallel != 1:
        raise RecipeError(f"{src}: {what} with sequence_parallel: {recipe.sequence_parallel} is not supported "
                          "(sequence parallelism runs under DeepSpeed, expert parallelism under DDP); set one of them to 1")
    if recipe.method == "lora" and "experts" in recipe.trainable and recipe.lora.expert_kernel != "routed":
        raise RecipeError(f"{src}: {what} needs lora.expert_kernel: routed (the kernel that sends each process's "
                          "routed tokens to their experts); remove lora.expert_kernel: peft")
    if recipe.launch is None:  # `accelerate launch` itself may bring DeepSpeed or another count: checked at preflight
        return
    if uses_deepspeed(recipe.launch):
        raise RecipeError(f"{src}: {what} runs under plain data parallel, not DeepSpeed (launch={recipe.launch}): ZeRO "
                          "treats every parameter as the same tensor on every process, and each process's experts "
                          "differ. Set launch: recipes/accelerate/ep8.yaml (one node of 8 GPUs) or "
                          "recipes/accelerate/ep_multinode.yaml")
    processes = launch_processes(recipe.launch)
    if processes % ep:
        raise RecipeError(f"{src}: {what} must divide the processes of {recipe.launch} (num_processes: {processes})")
