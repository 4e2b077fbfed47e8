"""The routers of a sparse MoE model, watched: which modules are MoE blocks, and the router logits of each
forward pass, collected by forward hooks (no second pass) for the router losses and statistics."""

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


def policy_logits(tap: RouterTap) -> list[torch.Tensor]:
    """The router logits of the policy's forward since the last call, one tensor per layer."""
    # The first forward of a training step is the policy's; DPO then runs the reference (another adapter of
    # the same model) through the same routers, which must not count.
    logits = tap.take()[: tap.num_layers]
    if len(logits) != tap.num_layers:
        raise RuntimeError(f"expected router logits from {tap.num_layers} layers, got {len(logits)}")
    return logits
