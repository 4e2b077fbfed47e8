"""From a recipe to TRL's arguments (`SFTConfig` / `DPOConfig`): our defaults, the recipe's `train` section,
and the keys the recipe owns elsewhere; TRL's own checks fail here with the recipe named."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.model.device import training_device, use_bf16
from finetune.recipe.library_keys import trainer_config_class
from finetune.recipe.schema import Recipe, RecipeError


def trainer_args(recipe: Recipe):
    """The TRL config for the recipe; TRL's own checks fail here with the recipe named."""
    kwargs = {
        "lr_scheduler_type": "cosine",
        "logging_steps": 10,
        "report_to": "none",
        "gradient_checkpointing": True,
        "logging_first_step": True,  # the first step alone: DPO's must be ln 2, SFT's the base model's loss
        # Trainer's filter reads every micro-step's loss back to the host (two GPU syncs) to replace a NaN or inf
        # by the running mean; off, a diverged step shows in the log as what it is.
        "logging_nan_inf_filter": False,
        **recipe.train,
        "output_dir": recipe.output_dir,
        "max_length": recipe.data.max_length,
        "bf16": use_bf16(recipe),
        # Router losses are added by finetune/train/trainer.py (once, padding excluded); TRL's own copy stays off.
        "router_aux_loss_coef": 0.0,
    }
    kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    has_eval = bool(recipe.data.eval) or recipe.data.eval_fraction > 0
    if has_eval and str(kwargs.get("eval_strategy", "no")) != "no":
        kwargs.setdefault("eval_on_start", True)  # the starting eval loss, to compare against
    if recipe.kind == "sft":
        kwargs["packing"] = recipe.data.packing
        if not recipe.data.packing:
            # The data is tokenized, labelled and within max_length already (finetune/data/cache.py); TRL's
            # preparation would copy every token once more per process, to truncate nothing.
            kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}
    if recipe.sequence_parallel > 1:
        from finetune.train.launch import sequence_parallel_config

        kwargs["parallelism_config"] = sequence_parallel_config(recipe.sequence_parallel, recipe.attn_implementation)
    if training_device(recipe) == "cpu":
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

    if recipe.method == "full" and args.gradient_checkpointing and is_deepspeed_zero3_enabled():
        # Measured here: torch's checkpoint recompute sees the parameters ZeRO-3 released and fails with
        # "a different number of tensors was saved" (LoRA, whose trained weights ZeRO-3 keeps, is fine).
        raise RecipeError(
            f"{recipe.source}: method: full under DeepSpeed ZeRO-3 fails with gradient checkpointing; "
            "set train.gradient_checkpointing=false, or use method: lora"
        )
    return args


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
