"""The recipe's attention kernel (`attn_implementation`): whether it can run on this machine, checked before any
weight loads, and whether packed rows attend through a mask.

transformers itself falls back from a missing `flash-attn` package to the `kernels` package's Hub build, and
fails only inside `from_pretrained` (or, on a CPU, inside the first forward); here the recipe is refused first,
with the key and the fix named.
"""

from __future__ import annotations

from finetune.model.device import training_device, use_bf16
from finetune.recipe.schema import Recipe, RecipeError
from finetune.recipe.validation import MASKED_ATTENTION


def packed_rows_need_a_mask(recipe: Recipe) -> bool:
    """Whether a packed SFT row attends through a max_length x max_length mask (finetune.plan counts it)."""
    return recipe.kind == "sft" and recipe.data.packing and recipe.attn_implementation in MASKED_ATTENTION


def check_attention_runs_here(recipe: Recipe) -> None:
    """Flash attention and Hub kernels need CUDA, bf16, and their package (`flash-attn`, else `kernels`)."""
    attention, src = recipe.attn_implementation, recipe.source
    if attention in MASKED_ATTENTION:
        return
    if training_device(recipe) != "cuda":
        raise RecipeError(f"{src}: attn_implementation: {attention} runs on CUDA only, and this run is on the CPU; "
                          "set attn_implementation=sdpa")
    if not use_bf16(recipe):
        raise RecipeError(f"{src}: attn_implementation: {attention} computes in bf16, and this run is fp32 "
                          "(train.bf16: false); set train.bf16=true or attn_implementation=sdpa")
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_kernels_available

    own_package = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if attention in own_package and own_package[attention]():
        return
    if is_kernels_available():
        return  # transformers loads the Hub build (kernels-community/...), from the Hub cache when offline
    install = {"flash_attention_2": "pip install flash-attn --no-build-isolation",
               "flash_attention_3": "install flash-attention 3 (hopper/ in the flash-attention repository)"}
    fix = f"{install[attention]}, or pip install kernels" if attention in install else "pip install kernels"
    raise RecipeError(f"{src}: attn_implementation: {attention} is not installed here; {fix}, "
                      "or set attn_implementation=sdpa")
