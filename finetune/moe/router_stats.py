"""Router health from router logits: routed-token counts per layer x expert (real tokens only), routing
entropy, and the balance figures that training logs and evaluation reports (MaxVio, CV, dead experts)."""

from __future__ import annotations

import torch

from finetune.moe.router import token_mask


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
