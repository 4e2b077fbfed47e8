"""Next-token loss computed only where it is trained.

Why by hand: in chat data most tokens are prompt, yet TRL's fused LM head projects every position onto
the 32000-token vocabulary (on CPU its torch fallback took most of a tiny model's step). A forward
pre-hook on the LM head keeps only the hidden states whose next token is labelled, inside the model's
normal forward, so PEFT, gradient checkpointing and DeepSpeed's parameter hooks see an ordinary call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from finetune.chat_format import IGNORE_INDEX


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed / DDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


class SelectedLogits:
    """While `select(rows)` is active, the LM head projects only those rows of the flattened
    [batch * sequence] hidden states; the model's `logits` are then [len(rows), vocab]."""

    def __init__(self, model: nn.Module):
        self.rows: torch.Tensor | None = None
        head = _causal_lm(model).get_output_embeddings()
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.rows is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows.to(hidden.device)),) + args[1:]

    @contextmanager
    def select(self, rows: torch.Tensor):
        self.rows = rows
        try:
            yield
        finally:
            self.rows = None

    def remove(self) -> None:
        self._handle.remove()


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat row indices whose next token is labelled, those next tokens), in row-major order."""
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    keep = next_labels.reshape(-1) != IGNORE_INDEX
    return keep.nonzero().squeeze(1), next_labels.reshape(-1)[keep]


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in fp32, number of correct argmax predictions)."""
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct
