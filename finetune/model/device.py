"""Where a training pass runs and in which dtype, decided once from the recipe's `device` and this machine.

Every choice that depends on the machine asks here (the model's dtype, TRL's `use_cpu`, what preflight
allows, where 4-bit weights are placed), so `device: cpu` means the same run on a GPU machine as on a
laptop: the CPU test tiers never change meaning on a GPU host (tests/test_device.py)."""

from __future__ import annotations

import torch

from finetune.recipe.schema import Recipe, RecipeError


def training_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the base model loads in: bf16 where `use_bf16`, else fp32."""
    return torch.bfloat16 if use_bf16(recipe) else torch.float32


def use_bf16(recipe: Recipe) -> bool:
    """The recipe's `train.bf16` if set, else bf16 exactly when it trains on a GPU that supports it."""
    if "bf16" in recipe.train:
        return bool(recipe.train["bf16"])
    return training_device(recipe) == "cuda" and torch.cuda.is_bf16_supported()


def training_device(recipe: Recipe) -> str:
    """"cuda" or "cpu": the recipe's `device`, with `auto` resolved on this machine."""
    if recipe.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if recipe.device == "cuda":
        raise RecipeError(f"{recipe.source}: device: cuda, but this machine has no CUDA device (torch "
                          f"{torch.__version__}); run it on a GPU machine, or set device=cpu")
    return "cpu"
