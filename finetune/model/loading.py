"""The recipe's base model, loaded for training in the training dtype (4-bit when `quantization: nf4`,
finetune/model/quantized.py), with its sparse MoE blocks checked."""

from __future__ import annotations

import torch

from finetune.model.device import training_dtype
from finetune.moe.router import moe_blocks
from finetune.recipe.schema import Recipe, RecipeError


def load_base_model(recipe: Recipe, dtype: torch.dtype | None = None):
    """The recipe's base model, frozen parts in 4-bit when `quantization: nf4` (finetune/model/quantized.py)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or training_dtype(recipe)
    try:
        if recipe.quantization == "nf4":
            from finetune.model.quantized import load_quantized_model

            model = load_quantized_model(recipe, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=dtype,
                                                         attn_implementation=recipe.attn_implementation)
    except OSError as err:
        raise RecipeError(f"{recipe.source}: cannot load model {recipe.model!r}: {err}") from None
    if not moe_blocks(model):
        raise RecipeError(f"{recipe.source}: model {recipe.model!r} ({type(model).__name__}) has no sparse MoE blocks")
    model.config.use_cache = False
    if getattr(model.config, "head_dim", None) is None:
        # Mixtral's config leaves head_dim unset (hidden / heads is implied). DeepSpeed's Ulysses reads it with
        # getattr(config, "head_dim", hidden // heads), gets None and fails; the value the model uses anyway.
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    return model
