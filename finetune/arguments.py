"""From a recipe to TRL's arguments, and everything a pass refuses before loading anything (`preflight`).

`finetune.check` runs the same `preflight` as `python -m finetune.sft` / `finetune.dpo`, so the pre-flight
check and the passes never disagree about a recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from finetune.checkpoints import check_run_folder
from finetune.config import Recipe, RecipeError, trainer_config_class
from finetune.model import use_bf16


def trainer_args(recipe: Recipe):
    """The TRL config for the recipe; TRL's own checks fail here with the recipe named."""
    kwargs = {
        "lr_scheduler_type": "cosine",
        "logging_steps": 10,
        "report_to": "none",
        "gradient_checkpointing": True,
        "logging_first_step": True,  # the first step alone: DPO's must be ln 2, SFT's the base model's loss
        **recipe.train,
        "output_dir": recipe.output_dir,
        "max_length": recipe.data.max_length,
        "bf16": use_bf16(recipe),
        # Router losses are added by finetune.moe (once, padding excluded); TRL's own copy stays off.
        "router_aux_loss_coef": 0.0,
    }
    kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    has_eval = bool(recipe.data.eval) or recipe.data.eval_fraction > 0
    if has_eval and str(kwargs.get("eval_strategy", "no")) != "no":
        kwargs.setdefault("eval_on_start", True)  # the starting eval loss, to compare against
    if recipe.kind == "sft":
        kwargs["packing"] = recipe.data.packing
        if not recipe.data.packing:
            # The data is tokenized, labelled and within max_length already (finetune/data_cache.py); TRL's
            # preparation would copy every token once more per process, to truncate nothing.
            kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if recipe.sequence_parallel > 1:
        kwargs["parallelism_config"] = sequence_parallel_config(recipe.sequence_parallel)
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    check_wandb_login(recipe, kwargs.get("report_to"))
    try:
        args = trainer_config_class(recipe.kind)(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{recipe.source}: the train section is not valid: {err}") from None
    # Values TRL accepts here and fails on only later, after the model loaded (or with a ZeroDivisionError).
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise RecipeError(f"{recipe.source}: train.{key} must be >= 1, got {getattr(args, key)}")
    if args.learning_rate < 0:
        raise RecipeError(f"{recipe.source}: train.learning_rate must be >= 0, got {args.learning_rate}")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if recipe.lora.method == "full" and args.gradient_checkpointing and is_deepspeed_zero3_enabled():
        # Measured here: torch's checkpoint recompute sees the parameters ZeRO-3 released and fails with
        # "a different number of tensors was saved" (LoRA, whose trained weights ZeRO-3 keeps, is fine).
        raise RecipeError(
            f"{recipe.source}: lora.method: full under DeepSpeed ZeRO-3 fails with gradient checkpointing; "
            "set train.gradient_checkpointing=false, or use lora.method: lora"
        )
    return args


def sequence_parallel_config(size: int):
    """accelerate's ParallelismConfig for DeepSpeed Ulysses over `size` processes: transformers' Trainer hands
    it to accelerate, which registers Ulysses attention and shards each batch's tokens across the group.
    Variable lengths: packed rows and single samples differ from batch to batch."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    return ParallelismConfig(sp_backend="deepspeed", sp_size=size, sp_handler=handler)


def preflight(recipe: Recipe):
    """Everything the passes refuse before training, checked before any weight or data loads; the TRL
    arguments. `finetune.check` runs exactly this too, so the check and the passes never disagree."""
    from finetune.model import ModelSourceError, check_sft_adapter, model_config

    args = trainer_args(recipe)
    check_run_folder(recipe)
    try:
        model_config(recipe.model)
    except ModelSourceError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    check_sft_adapter(recipe)
    if recipe.sequence_parallel > 1:
        check_sequence_parallel_runs_here(recipe, model_config(recipe.model).num_attention_heads)
    if recipe.quantization != "none":
        check_quantization_runs_here(recipe)
    if recipe.train.get("activation_offloading") and not torch.cuda.is_available():
        # TRL's OffloadActivations copies saved activations from the accelerator to CPU memory on side streams;
        # without an accelerator it fails deep inside SFTTrainer.__init__ (measured: AttributeError).
        raise RecipeError(f"{recipe.source}: train.activation_offloading moves activations from GPU to CPU memory "
                          "and needs a GPU; this machine has none: set train.activation_offloading=false")
    return args


def check_quantization_runs_here(recipe: Recipe) -> None:
    """A 4-bit base needs bitsandbytes, and no DeepSpeed launch (the recipe's own `launch` is checked at parse
    time; this catches `accelerate launch --config_file <a DeepSpeed config>`)."""
    from finetune.nf4 import bitsandbytes

    bitsandbytes(recipe.source)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise RecipeError(f"{recipe.source}: quantization: {recipe.quantization} does not run under DeepSpeed, and "
                          "this process was launched with it; launch with recipes/accelerate/single.yaml or ddp.yaml")


def check_sequence_parallel_runs_here(recipe: Recipe, heads: int) -> None:
    """Ulysses gives each process whole attention heads, and needs DeepSpeed: the recipe's `launch` (checked at
    parse time) or the `accelerate launch` this process runs under."""
    sp, src = recipe.sequence_parallel, recipe.source
    if heads % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the model's {heads} attention heads "
                          "(Ulysses gives each process whole heads)")
    launched = "LOCAL_RANK" in os.environ
    if (launched and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true") or (
            not launched and recipe.launch is None):
        raise RecipeError(f"{src}: sequence_parallel: {sp} runs under DeepSpeed (Ulysses); set launch: "
                          "recipes/accelerate/zero3.yaml (or another DeepSpeed config), or `accelerate launch` with one")
    world = int(os.environ.get("WORLD_SIZE", sp))
    if launched and world % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the {world} launched processes")


def check_wandb_login(recipe: Recipe, report_to) -> None:
    """Fail before loading anything when wandb would ask for a login it cannot get."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise RecipeError(
        f"{recipe.source}: train.report_to includes wandb but wandb has no login: run `wandb login`, "
        "set WANDB_API_KEY, or set WANDB_MODE=offline (no network) or train.report_to=none"
    )
