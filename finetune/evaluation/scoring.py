"""What evaluation computes with a model: held-out loss with router load, sequence log-probabilities for
preference pairs, and greedy generation. Plain functions over token ids, batched, with progress bars.

The samples are the training samples (finetune/data/rows.py), so held-out loss uses exactly the training
masks: the loss is over the assistant replies and their EOS, never the prompts or the padding.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.data.chat_format import IGNORE_INDEX, ChatEncoder
from finetune.data.groups import row_groups
from finetune.evaluation.groups import GroupMeans, RoutingByGroup
from finetune.moe.router import RouterTap
from finetune.moe.router_stats import entropy_sums, expert_counts_per_row, router_summary

PAD_ID = 0


def _batches(items: list, size: int, desc: str, progress: bool):
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit=" batch", disable=not progress, leave=False):
        yield items[start:start + size]


def _right_padded(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [fill] * (width - len(row)) for row in rows], device=device)


@torch.no_grad()
def heldout_loss(model: nn.Module, samples: list[dict], batch_size: int, progress: bool = True) -> dict:
    """Mean next-token loss over labelled tokens, perplexity, token accuracy, and router load per layer x
    expert on the real tokens; the loss and the router load also per language and task family of the
    samples (finetune/evaluation/groups.py), all from the same forward passes."""
    device = next(model.parameters()).device
    tap = RouterTap(model)
    total_loss, total_tokens, correct = 0.0, 0, 0
    counts, entropy, routed = 0, 0, 0
    by_group, routing = GroupMeans(), RoutingByGroup()
    try:
        for batch in _batches(samples, batch_size, "held-out loss", progress):
            input_ids = _right_padded([s["input_ids"] for s in batch], PAD_ID, device)
            labels = _right_padded([s["labels"] for s in batch], IGNORE_INDEX, device)
            mask = _right_padded([[1] * len(s["input_ids"]) for s in batch], 0, device)
            with tap.capture():
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            router_logits = tap.take()
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
            row_losses, row_tokens = (losses * scored).sum(-1).tolist(), scored.sum(-1).tolist()
            total_loss += sum(row_losses)
            total_tokens += sum(row_tokens)
            correct += int((logits[:, :-1].argmax(-1) == targets)[scored].sum())
            row_counts = expert_counts_per_row(router_logits, tap.top_k, mask).cpu()
            counts = counts + row_counts.sum(0)
            for sample, loss, tokens, sample_counts in zip(batch, row_losses, row_tokens, row_counts):
                groups = row_groups(sample)
                by_group.add(groups, "loss", loss, tokens)
                routing.add(groups, sample_counts)
            layer_entropy, tokens = entropy_sums(router_logits, mask)
            entropy, routed = entropy + layer_entropy.cpu(), routed + tokens.item()
    finally:
        tap.remove()
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": float(torch.tensor(loss).exp()),
        "token_accuracy": correct / max(total_tokens, 1),
        "tokens": total_tokens,
        "router": router_figures(counts, entropy / max(routed, 1)),
        "by_group": by_group.figures(size=("tokens", "loss")),
        "routing_by_group": routing.figures(),
    }


def router_figures(counts: torch.Tensor, entropy: torch.Tensor) -> dict:
    """finetune/moe/router_stats.py's router_summary as JSON-ready values (per-layer lists)."""
    summary = router_summary(counts, entropy)
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in summary.items() if k != "dead"}


@torch.no_grad()
def reply_logps(model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int, desc: str,
                progress: bool = True) -> list[float]:
    """Summed log-probability of each reply given its prompt: [(prompt_ids, reply_ids)] -> [logp]."""
    device = next(model.parameters()).device
    out = []
    for batch in _batches(pairs, batch_size, desc, progress):
        input_ids = _right_padded([p + r for p, r in batch], PAD_ID, device)
        labels = _right_padded([[IGNORE_INDEX] * len(p) + r for p, r in batch], IGNORE_INDEX, device)
        mask = _right_padded([[1] * (len(p) + len(r)) for p, r in batch], 0, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (logp * (targets != IGNORE_INDEX)).sum(-1).tolist()
    return out


def preference_logps(model: nn.Module, samples: list[dict], batch_size: int, desc: str,
                     progress: bool = True) -> tuple[list[float], list[float]]:
    """(chosen, rejected) summed reply log-probabilities for DPO samples."""
    pairs = [(s["prompt_ids"], s["chosen_ids"]) for s in samples] + [(s["prompt_ids"], s["rejected_ids"]) for s in samples]
    logps = reply_logps(model, pairs, batch_size, desc, progress)
    return logps[: len(samples)], logps[len(samples):]


@torch.no_grad()
def generate_replies(model: nn.Module, encoder: ChatEncoder, prompts: list[list[dict]], batch_size: int,
                     max_new_tokens: int, progress: bool = True) -> list[str]:
    """Greedy replies to chat prompts (Mixtral-Instruct format, left-padded batches), up to EOS."""
    device = next(model.parameters()).device
    eos = encoder.eos_id
    replies = []
    for batch in _batches(prompts, batch_size, "generating", progress):
        ids = [encoder.encode_prompt(messages) for messages in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[PAD_ID] * (width - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=PAD_ID, eos_token_id=eos)
        replies += [encoder.decode(until_eos(row, eos)[0]) for row in out[:, width:].tolist()]
    return replies


def until_eos(generated: list[int], eos_id: int) -> tuple[list[int], bool]:
    """(the reply's ids before EOS, whether EOS ended it) from the ids `generate` added after a prompt."""
    return (generated[: generated.index(eos_id)], True) if eos_id in generated else (generated, False)
