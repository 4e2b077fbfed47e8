"""Router losses for sparse MoE blocks, computed once and added the same way by SFT and DPO (added to the
loss in finetune/train/trainer.py).

Why by hand: transformers adds the load-balancing loss inside the model only when
`output_router_logits=True` (and counts padding when there is no attention mask), TRL adds it on its own
path for SFT and another for DPO, and neither has the router z-loss. Here forward hooks on the routers
collect the logits of the policy's forward pass (no second pass), and `router_losses` returns:

* aux: transformers' `load_balancing_loss_func` (Switch-Transformer form, padding excluded);
* z:   ST-MoE router z-loss, the mean over real tokens and layers of logsumexp(router logits)^2.

Gradient accumulation: the trainers divide each micro-batch's LM loss by the tokens of the whole
accumulated batch, so the sum over micro-batches is one mean. Router losses are per-micro-batch means,
so each is divided by the accumulation steps; their sum is then one mean too, never `steps` times it.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.moe.router import RouterTap, moe_blocks, token_mask


def load_balancing_loss(logits: list[torch.Tensor], num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all layers, padding excluded (transformers' formula)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(logits), num_experts, top_k, attention_mask)


def router_z_loss(logits: list[torch.Tensor], attention_mask=None) -> torch.Tensor:
    """ST-MoE z-loss: mean over real tokens and layers of logsumexp(router logits)^2."""
    mask = token_mask(attention_mask, logits[0].shape[0], logits[0].device)
    per_layer = [
        (torch.logsumexp(layer.float(), dim=-1).square() * mask).sum() / mask.sum().clamp(min=1) for layer in logits
    ]
    return torch.stack(per_layer).mean()


def router_losses(tap: RouterTap, logits: list[torch.Tensor], attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z) for one forward's router logits (`policy_logits(tap)`), padding excluded."""
    return (
        load_balancing_loss(logits, tap.num_experts, tap.top_k, attention_mask),
        router_z_loss(logits, attention_mask),
    )


def reachability(model: nn.Module, groups_trainable: dict[str, bool]) -> str:
    """Which trainable groups the load-balancing loss can move, in words."""
    reach = []
    if groups_trainable.get("router"):
        reach.append("router (directly)")
    if groups_trainable.get("attention"):
        reach.append("attention (through the hidden states the routers read)")
    if groups_trainable.get("experts") and len(moe_blocks(model)) > 1:
        reach.append("experts (through the hidden states of later layers' routers)")
    return ", ".join(reach)
