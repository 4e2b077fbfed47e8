"""Token log-probabilities computed only where they are trained, on devices without Triton.

Why by hand: TRL's trainers call `model(..., labels=..., fused_lm_head=True)`. On CUDA its Triton
kernel scores only the labelled positions; elsewhere (CPU) it scores every position through a tiled
torch loop, which took most of a tiny model's training step. `use_compact_lm_head` replaces that forward
on such devices with one that projects only the hidden states whose next token is labelled (a forward
pre-hook on the LM head, inside the model's normal forward, so PEFT, gradient checkpointing and
DeepSpeed's parameter hooks see an ordinary call) and returns the same output fields, in fp32.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from finetune.chat_format import IGNORE_INDEX
from finetune.private_apis import trl_uses_triton


class SelectedLogits:
    """While `select(rows)` is active, the LM head projects only those rows of the flattened
    [batch * sequence] hidden states; the model's `logits` are then [len(rows), vocab]."""

    def __init__(self, causal_lm: nn.Module):
        self.rows: torch.Tensor | None = None
        self._handle = causal_lm.get_output_embeddings().register_forward_pre_hook(self._hook)

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


def has_triton(device: torch.device) -> bool:
    return trl_uses_triton(device)


def use_compact_lm_head(model: nn.Module) -> bool:
    """Replace TRL's fused-LM-head forward by the compact torch one where Triton is absent (once)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm, "_compact_lm_head", False):
        return True
    if has_triton(causal_lm.get_output_embeddings().weight.device):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    transformers_forward = types.MethodType(type(causal_lm).forward, causal_lm)
    trl_forward = causal_lm.forward
    selected = SelectedLogits(causal_lm)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        kwargs.pop("output_router_logits", None)  # router losses come from finetune.moe
        if shift_labels is None:  # position t is scored against the token at t + 1
            shift_labels = labels[:, 1:]
            rows = F.pad(shift_labels != IGNORE_INDEX, (0, 1), value=False)
        else:  # already aligned with the positions (context / sequence parallelism)
            rows = shift_labels != IGNORE_INDEX
        mask = shift_labels != IGNORE_INDEX
        with selected.select(rows.reshape(-1).nonzero().squeeze(1)):
            logits = transformers_forward(*args, **kwargs).logits.float()
        targets = shift_labels[mask]
        log_z = torch.logsumexp(logits, dim=-1)
        token_log_probs = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - log_z
        with torch.no_grad():
            log_p = logits - log_z.unsqueeze(1)
            probs = log_p.exp()
            fields = {
                "entropy": -(probs * log_p).sum(-1),
                "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
                "mean_logits": logits.mean(-1),
                "is_top1": logits.argmax(-1) == targets,
            }

        def spread(values):
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = spread(token_log_probs)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=spread(fields["entropy"]),
            log_sum_sq_probs=spread(fields["log_sum_sq_probs"]),
            mean_logits=spread(fields["mean_logits"]),
            is_top1=spread(fields["is_top1"]),
            label_mask=mask,
            aux_loss=None,
        )

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._compact_lm_head = True
    return True
