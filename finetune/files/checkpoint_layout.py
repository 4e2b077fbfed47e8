"""A Mixtral decoder layer's tensors, read from a checkpoint in either layout, one expert at a time.

Two layouts exist. The original one (Mistral's release, and what finetune.export writes) stores each
expert's matrices apart: `model.layers.N.block_sparse_moe.experts.K.w1/w3/w2.weight`, with the router at
`block_sparse_moe.gate.weight`. transformers 5's `save_pretrained` writes its in-memory layout instead:
fused stacks `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up) and `mlp.experts.down_proj`
[E, H, I], router `mlp.gate.weight`. Readers here name everything the way transformers 5 does.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from finetune.files.safetensors import CheckpointFiles

ORIGINAL_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
FUSED_EXPERT = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
STACKS = ("gate_up_proj", "down_proj")
OUTSIDE_LAYER_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
"""The modules outside the decoder layers (embeddings, final norm, LM head), by their path in the model."""
OUTSIDE_LAYER_TENSORS = tuple(f"{module}.weight" for module in OUTSIDE_LAYER_MODULES)
"""Their tensors' checkpoint keys (the same in both layouts)."""


def stack_shape(stack: str, config) -> tuple[int, int, int]:
    """[E, out, in] of a fused stack, as transformers 5 holds it."""
    experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    return (experts, 2 * inter, hidden) if stack == "gate_up_proj" else (experts, hidden, inter)


def dense_keys(checkpoint: CheckpointFiles, layer: int) -> dict[str, str]:
    """{name in the layer, as transformers 5 names it: checkpoint key} of the layer's tensors that are not
    expert weights (attention, norms, router)."""
    prefix = f"model.layers.{layer}."
    found = {}
    for key in checkpoint.keys_under(prefix):
        name = key[len(prefix):]
        if not (ORIGINAL_EXPERT.match(name) or FUSED_EXPERT.match(name)):
            found[name.replace("block_sparse_moe.gate.", "mlp.gate.")] = key
    return found


def expert_matrices(checkpoint: CheckpointFiles, layer: int, stack: str, experts: int) -> Iterator[torch.Tensor]:
    """Each expert's matrix of `stack` ([out, in], the checkpoint's dtype), read one expert at a time."""
    for expert in range(experts):
        yield expert_matrix(checkpoint, layer, stack, expert)


def expert_matrix(checkpoint: CheckpointFiles, layer: int, stack: str, expert: int) -> torch.Tensor:
    """One expert's matrix of `stack` ([out, in]; gate_up_proj is w1's rows, then w3's), from either layout."""
    prefix = f"model.layers.{layer}."
    fused = f"{prefix}mlp.experts.{stack}"
    if fused in checkpoint.where:
        return checkpoint.get(fused, expert)
    original = f"{prefix}block_sparse_moe.experts.{expert}."
    if stack == "down_proj":
        return checkpoint.get(original + "w2.weight")
    return torch.cat([checkpoint.get(original + "w1.weight"), checkpoint.get(original + "w3.weight")])
