"""Router losses for sparse MoE blocks, computed once and added the same way by SFT and DPO.

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

from contextlib import contextmanager

import torch
from torch import nn

from finetune.private_apis import in_backward


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks (anything with a `gate` router and fused `experts`)."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m, "top_k")]


class RouterTap:
    """Collects router logits from every MoE block during forward passes while `active`."""

    def __init__(self, model: nn.Module):
        blocks = moe_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no sparse MoE blocks (expected Mixtral-style mlp.gate)")
        config = _text_config(model)
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.logits: list[torch.Tensor] = []
        self.active = False
        self._handles = [block.gate.register_forward_hook(self._hook) for block in blocks]
        self.num_layers = len(blocks)

    def _hook(self, module, args, output):
        # Gradient checkpointing re-runs forwards during backward; those repeats are not new routing.
        if self.active and not in_backward():
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    @contextmanager
    def capture(self):
        """Collect the logits of the forward passes inside this block (and only those)."""
        self.logits = []
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        logits, self.logits = self.logits, []
        return logits

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def token_mask(attention_mask: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """Flat float mask over the router's rows (batch * sequence), 1 for real tokens."""
    if attention_mask is None:
        return torch.ones(rows, device=device)
    flat = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if flat.numel() != rows:
        raise ValueError(f"attention mask has {flat.numel()} tokens but the router saw {rows}")
    return flat


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


def policy_logits(tap: RouterTap) -> list[torch.Tensor]:
    """The router logits of the policy's forward since the last call, one tensor per layer."""
    # The first forward of a training step is the policy's; DPO then runs the reference (another adapter of
    # the same model) through the same routers, which must not count.
    logits = tap.take()[: tap.num_layers]
    if len(logits) != tap.num_layers:
        raise RuntimeError(f"expected router logits from {tap.num_layers} layers, got {len(logits)}")
    return logits


def router_losses(tap: RouterTap, logits: list[torch.Tensor], attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, z) for one forward's router logits (`policy_logits(tap)`), padding excluded."""
    return (
        load_balancing_loss(logits, tap.num_experts, tap.top_k, attention_mask),
        router_z_loss(logits, attention_mask),
    )


def add_router_losses(loss, aux, z, aux_coef: float, z_coef: float, accumulation_steps: int):
    """loss + (aux_coef * aux + z_coef * z) / accumulation_steps (see the module docstring)."""
    extra = aux_coef * aux + z_coef * z
    return loss + extra.to(loss.device) / accumulation_steps


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


def expert_counts(logits: list[torch.Tensor], top_k: int, attention_mask=None) -> torch.Tensor:
    """[layers, experts] number of real tokens each expert was chosen for (top-k), padding excluded."""
    mask = token_mask(attention_mask, logits[0].shape[0], logits[0].device)
    rows = []
    for layer in logits:
        chosen = layer.detach().topk(top_k, dim=-1).indices  # tokens x k
        weights = mask.unsqueeze(1).expand_as(chosen).reshape(-1)
        rows.append(torch.zeros(layer.shape[-1], device=layer.device).scatter_add_(0, chosen.reshape(-1), weights))
    return torch.stack(rows)


def expert_counts_per_row(logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """[rows, layers, experts]: `expert_counts` for each row of a [rows, sequence] batch on its own (the
    per-language and per-task routing of evaluation); summed over rows it equals `expert_counts`."""
    rows, length = attention_mask.shape
    mask = token_mask(attention_mask, logits[0].shape[0], logits[0].device).reshape(rows, length, 1)
    per_layer = []
    for layer in logits:
        chosen = layer.detach().topk(top_k, dim=-1).indices  # tokens x k
        picked = torch.nn.functional.one_hot(chosen, layer.shape[-1]).sum(1).float()  # tokens x experts
        per_layer.append((picked.reshape(rows, length, -1) * mask).sum(1))
    return torch.stack(per_layer, dim=1)


def entropy_sums(logits: list[torch.Tensor], attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers] summed router entropy over real tokens, number of real tokens)."""
    mask = token_mask(attention_mask, logits[0].shape[0], logits[0].device)
    sums = []
    for layer in logits:
        log_p = torch.log_softmax(layer.detach().float(), dim=-1)
        sums.append((-(log_p.exp() * log_p).sum(-1) * mask).sum())
    return torch.stack(sums), mask.sum()


def balance_stats(counts: torch.Tensor, dead_share: float = 0.01) -> dict[str, torch.Tensor]:
    """Per layer, from [layers, experts] counts: share of routed tokens per expert, its coefficient of
    variation, MaxVio (max load / mean load - 1) and the number of dead experts (share < 1%)."""
    counts = counts.double()
    share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    mean = counts.mean(-1)
    return {
        "share": share,
        "cv": counts.std(-1, unbiased=False) / mean.clamp(min=1e-12),
        "maxvio": counts.max(-1).values / mean.clamp(min=1e-12) - 1,
        "dead": (share < dead_share).sum(-1),
    }


def router_summary(counts: torch.Tensor, entropy: torch.Tensor) -> dict:
    """The router health figures logged in training and reported by evaluation, from [layers, experts]
    routed-token counts and per-layer mean routing entropy: the per-layer tensors of `balance_stats` and
    `entropy`, and their summaries (`maxvio_mean`, `maxvio_max`, `cv_mean`, `entropy_mean`, `dead_experts`)."""
    stats = balance_stats(counts)
    return {
        **stats,
        "entropy": entropy,
        "maxvio_mean": stats["maxvio"].mean().item(),
        "maxvio_max": stats["maxvio"].max().item(),
        "cv_mean": stats["cv"].mean().item(),
        "entropy_mean": entropy.mean().item(),
        "dead_experts": int(stats["dead"].sum()),
    }
