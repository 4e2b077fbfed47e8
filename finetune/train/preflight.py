"""Everything a training pass refuses before loading any weight or data (`preflight`), with the TRL arguments
it builds on the way. `finetune check` runs exactly this too, so the check and the passes never disagree
about a recipe."""

from __future__ import annotations

from finetune.files.adapter_folder import ADAPTER_CONFIG, AdapterError, is_adapter_folder, read_adapter_config
from finetune.files.hub_ids import same_model
from finetune.model.attention import check_attention_runs_here
from finetune.model.config import ModelSourceError, model_config
from finetune.model.device import training_device
from finetune.model.lora_targets import adapter_groups
from finetune.model.shapes import shape_problems
from finetune.moe.nf4 import bitsandbytes
from finetune.recipe.schema import Recipe, RecipeError
from finetune.train.arguments import trainer_args
from finetune.train.launch import (
    check_expert_parallel_runs_here,
    check_sequence_parallel_runs_here,
    launched_with_deepspeed,
)
from finetune.train.run_folder import check_run_folder


def preflight(recipe: Recipe):
    """Everything the passes refuse before training, checked before any weight or data loads; the TRL
    arguments. `finetune.check` runs exactly this too, so the check and the passes never disagree."""
    args = trainer_args(recipe)
    check_run_folder(recipe)
    try:
        config = model_config(recipe.model)
    except ModelSourceError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    problems = shape_problems(config, 2 if args.bf16 else 4, recipe.quantization != "none")
    if problems:
        raise RecipeError(f"{recipe.source}: model {recipe.model}: {problems[0]}")
    check_sft_adapter(recipe)
    check_attention_runs_here(recipe)
    if recipe.sequence_parallel > 1:
        check_sequence_parallel_runs_here(recipe, config.num_attention_heads)
    if recipe.quantization != "none":
        check_quantization_runs_here(recipe)
    if recipe.expert_parallel > 1:
        check_expert_parallel_runs_here(recipe, config.num_local_experts)
    if recipe.train.get("activation_offloading") and training_device(recipe) != "cuda":
        # TRL's OffloadActivations copies saved activations from the accelerator to CPU memory on side streams;
        # without an accelerator it fails deep inside SFTTrainer.__init__ (measured: AttributeError).
        raise RecipeError(f"{recipe.source}: train.activation_offloading moves activations from GPU to CPU memory "
                          "and needs a GPU; this run is on the CPU: set train.activation_offloading=false")
    return args


def check_sft_adapter(recipe: Recipe) -> None:
    """DPO: `dpo.sft_adapter` is a PEFT adapter whose groups and rank the recipe's lora section matches."""
    sft = recipe.dpo.sft_adapter
    if recipe.kind != "dpo" or sft is None:
        return
    if not is_adapter_folder(sft):
        raise RecipeError(f"{recipe.source}: dpo.sft_adapter={sft!r} holds no {ADAPTER_CONFIG} (run SFT first)")
    try:
        adapter = read_adapter_config(sft)
    except AdapterError as err:
        raise RecipeError(f"{recipe.source}: dpo.sft_adapter: {err}") from None
    groups, src = adapter_groups(adapter), recipe.source
    recorded = adapter.get("base_model_name_or_path")
    if recorded and same_model(recorded, recipe.model) is False:
        raise RecipeError(f"{src}: dpo.sft_adapter={sft} was trained on {recorded}, not on model={recipe.model}; "
                          "DPO must start from the SFT adapter's own base (set model to it)")
    if sorted(groups) != sorted(recipe.trainable):
        raise RecipeError(f"{src}: trainable {recipe.trainable} differs from the SFT adapter's {groups} ({sft})")
    for key in ("r", "lora_alpha"):
        if key in recipe.lora.peft and recipe.lora.peft[key] != adapter.get(key):
            raise RecipeError(f"{src}: lora.{key}={recipe.lora.peft[key]} differs from the SFT adapter's {adapter.get(key)}")


def check_quantization_runs_here(recipe: Recipe) -> None:
    """A 4-bit base needs bitsandbytes, and no DeepSpeed launch (the recipe's own `launch` is checked at parse
    time; this catches `accelerate launch --config_file <a DeepSpeed config>`)."""
    bitsandbytes(recipe.source)
    if launched_with_deepspeed():
        raise RecipeError(f"{recipe.source}: quantization: {recipe.quantization} does not run under DeepSpeed, and "
                          "this process was launched with it; launch with recipes/accelerate/single.yaml or ddp.yaml")
