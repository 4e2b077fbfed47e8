"""Token log-probabilities of the trained positions, a bounded number of rows of logits at a time.

Why by hand: TRL's trainers call `model(..., labels=..., fused_lm_head=True)`.
- On CUDA/XPU with Triton, TRL's own fused head is used, unchanged: it projects only the labelled
  positions, in tiles of 4096 tokens x 32768 vocabulary entries, and rebuilds each tile in backward, so
  its memory is already bounded whatever the sequence length (trl.kernels.chunked_logprob).
- Elsewhere (CPU) TRL scores every position, prompt included, through a slow tiled torch loop.
  `use_compact_lm_head` replaces that forward: only the hidden states whose next token is labelled are
  projected, `CHUNK_ROWS` of them at a time (`TokenLogProbs`), so a 32k-token sample never holds
  32k x vocab logits.

The rows are scored inside the LM head's own call, in the model's normal forward, so DeepSpeed's
parameter hooks and PEFT see an ordinary call of the module.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.chat_format import IGNORE_INDEX
from finetune.private_apis import trl_uses_triton

CHUNK_ROWS = 1024
"""Positions whose logits exist at once. 1024 x 32000 fp32 logits are 125 MiB, and a chunk holds about
four such arrays at its peak: large enough for efficient matmuls, small next to a 32k-token sample."""

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The per-position fields of TRL's FusedCausalLMOutput, in the column order of `TokenLogProbs`."""


def _score(hidden, weight, bias, targets):
    """One chunk's fp32 logits, built as the LM head builds them (its dtype, then fp32), and its targets
    as a column."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits, targets.unsqueeze(1)


def score_rows(hidden, weight, bias, targets, chunk_rows: int, keep_input_gradient: bool):
    """Per row of `hidden` [N, H]: the FIELDS of `hidden @ weight.T + bias` against `targets` [N] as [N, 5]
    fp32, the log-sum-exp of each row's logits [N], and, with `keep_input_gradient`, d log p(target) / d hidden
    [N, H] (in the weight's dtype), computed here from the chunk's probabilities while they exist."""
    rows = hidden.shape[0]
    out = torch.empty(rows, len(FIELDS), dtype=torch.float32, device=hidden.device)
    log_z = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    input_gradient = hidden.new_empty(rows, hidden.shape[1], dtype=weight.dtype) if keep_input_gradient else None
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        logits, target = _score(hidden[start:end], weight, bias, targets[start:end])
        chunk_log_z = torch.logsumexp(logits, dim=-1)
        log_z[start:end] = chunk_log_z
        out[start:end, 0] = logits.gather(1, target).squeeze(1) - chunk_log_z
        out[start:end, 3] = logits.mean(-1)
        out[start:end, 4] = (logits.argmax(-1) == targets[start:end]).float()
        log_p = logits.sub_(chunk_log_z.unsqueeze(1))  # in place: the chunk's logits are not needed again
        out[start:end, 2] = torch.logsumexp(2 * log_p, dim=-1)
        probs = log_p.exp()
        out[start:end, 1] = -(probs * log_p).sum(-1)
        if input_gradient is not None:  # d log p(t) / d logits = onehot(t) - p
            del log_p, logits
            grad_logits = probs.neg_().scatter_add_(1, target, torch.ones_like(target, dtype=probs.dtype))
            input_gradient[start:end] = grad_logits.to(weight.dtype) @ weight
    return out, log_z, input_gradient


class TokenLogProbs(torch.autograd.Function):
    """`score_rows` with a backward; only the log-probability column carries a gradient.

    A frozen LM head (LoRA): forward keeps d log p / d hidden for each row, [N, H], computed from the
    chunk's probabilities with the same matmul backward would do, so backward only scales it by each row's
    incoming gradient and no logits are rebuilt. A trained head (full fine-tuning): forward keeps the
    log-sum-exp of each row and backward rebuilds the logits chunk by chunk for the weight's gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, grad_enabled: bool):
        head_trains = grad_enabled and (ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]))
        keep_input_gradient = grad_enabled and ctx.needs_input_grad[0] and not head_trains
        out, log_z, input_gradient = score_rows(hidden, weight, bias, targets, chunk_rows, keep_input_gradient)
        ctx.head_trains, ctx.chunk_rows = head_trains, chunk_rows
        if head_trains:
            ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        else:
            ctx.save_for_backward(input_gradient)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_log_probs = grad_out[:, 0]
        if not ctx.head_trains:
            (input_gradient,) = ctx.saved_tensors
            if input_gradient is None:
                return None, None, None, None, None, None
            grad_hidden = input_gradient * grad_log_probs.unsqueeze(1).to(input_gradient.dtype)
            return grad_hidden, None, None, None, None, None
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=weight.device) if bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, hidden.shape[0])
            logits, target = _score(hidden[start:end], weight, bias, targets[start:end])
            g = grad_log_probs[start:end].unsqueeze(1).float()
            # d loss / d logits = g * (onehot(t) - p)
            grad_logits = logits.sub_(log_z[start:end].unsqueeze(1)).exp_().mul_(-g).scatter_add_(1, target, g)
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().float(), hidden[start:end].float())
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


class TrainedPositionsHead:
    """While `scoring(rows, targets)` is active, a call of the LM head keeps the `rows` of the flattened
    [batch * sequence, hidden] states it is given and returns their FIELDS, [len(rows), 5] fp32, in place
    of logits. Its forward is swapped for the duration, so every other call is the plain head."""

    def __init__(self, head: nn.Linear, chunk_rows: int | None = None):
        self.head = head
        self.chunk_rows = chunk_rows or CHUNK_ROWS

    @contextmanager
    def scoring(self, rows: torch.Tensor, targets: torch.Tensor):
        head = self.head
        previous = head.__dict__.get("forward")

        def score(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))
            return TokenLogProbs.apply(hidden, head.weight, head.bias, targets.to(hidden.device),
                                       self.chunk_rows, torch.is_grad_enabled())

        head.forward = score
        try:
            yield
        finally:
            if previous is None:
                del head.forward
            else:
                head.forward = previous


def has_triton(device: torch.device) -> bool:
    return trl_uses_triton(device)


def use_compact_lm_head(model: nn.Module) -> bool:
    """Replace TRL's fused-LM-head forward by the compact chunked one where Triton is absent (once).
    False where TRL's own Triton path runs, or where the head is not a plain linear layer."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm, "_compact_lm_head", False):
        return True
    head = causal_lm.get_output_embeddings()
    if has_triton(head.weight.device) or type(head) is not nn.Linear:
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    transformers_forward = types.MethodType(type(causal_lm).forward, causal_lm)
    trl_forward = causal_lm.forward
    trained_positions = TrainedPositionsHead(head)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        kwargs.pop("output_router_logits", None)  # router losses come from finetune/moe/router_losses.py
        if shift_labels is None:  # position t is scored against the token at t + 1
            shift_labels = labels[:, 1:]
            rows = F.pad(shift_labels != IGNORE_INDEX, (0, 1), value=False)
        else:  # already aligned with the positions (context / sequence parallelism)
            rows = shift_labels != IGNORE_INDEX
        mask = shift_labels != IGNORE_INDEX
        with trained_positions.scoring(rows.reshape(-1).nonzero().squeeze(1), shift_labels[mask]):
            per_row = transformers_forward(*args, **kwargs).logits  # [trained positions, FIELDS]

        def spread(values):
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        # Only the log-probabilities carry a gradient (TokenLogProbs); the rest are statistics for the logs.
        fields = {name: spread(per_row[:, i] if i == 0 else per_row[:, i].detach()) for i, name in enumerate(FIELDS)}
        fields["is_top1"] = fields["is_top1"].bool()
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / count, label_mask=mask, aux_loss=None, **fields)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._compact_lm_head = True
    causal_lm._trained_positions_head = trained_positions
    return True
