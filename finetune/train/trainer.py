"""What both trainers add to TRL's, in one place: where the router losses are added to the loss, router
health and throughput in the logs, and the compact LM head.

`MoETrainerMixin` goes in front of `SFTTrainer` / `DPOTrainer` (finetune/sft.py, finetune/dpo.py). The
load-balancing and z-losses themselves are computed in finetune/moe/router_losses.py; `RouterTerms.add`
adds them to the task loss (`add_router_losses`), once per forward.

Gradient accumulation: the trainers divide each micro-batch's LM loss by the tokens of the whole
accumulated batch, so the sum over micro-batches is one mean. Router losses are per-micro-batch means,
so each is divided by the accumulation steps; their sum is then one mean too, never `steps` times it.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from finetune.data.cache import maps_outside_cache
from finetune.model.lm_head import use_compact_lm_head
from finetune.moe.router import RouterTap, policy_logits
from finetune.moe.router_losses import router_losses
from finetune.moe.router_stats import entropy_sums, expert_counts, router_summary

SUMMARY_KEYS = ("maxvio_mean", "maxvio_max", "cv_mean", "entropy_mean", "dead_experts")


class MoETrainerMixin:
    """Router losses in the loss; `aux_loss` / `z_loss` (and `task_loss_name`), router health and tokens/s
    in the logs. Our metrics are kept here and averaged per log line, like TRL's own."""

    task_loss_name: str | None = None
    """Also log the loss without the router terms under this name (DPO: `dpo_loss`)."""

    def __init__(self, *args, moe, **kwargs):
        with maps_outside_cache():  # TRL packs (SFT) or maps the data here: its files stay out of our cache
            super().__init__(*args, **kwargs)
        use_compact_lm_head(self.model)
        self.router_terms = RouterTerms(self.model, moe)
        self.throughput = Throughput()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.router_terms.tap.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self.router_terms.add(self, loss, inputs.get("attention_mask"), num_items_in_batch, self.task_loss_name)
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        logs = self.router_terms.add_logs(logs, mode, self.state.global_step)
        super().log(self.throughput.update(logs, self.state.global_step, self._total_train_tokens), start_time)


class RouterTerms:
    """The router's part of a trainer's loss and logs: adds the recipe's router losses to each forward's loss,
    and keeps their values and the routed-token counts until the next log line."""

    def __init__(self, model, moe):
        self.tap = RouterTap(model)
        self.moe = moe
        self.metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.counts: dict[str, torch.Tensor] = {}  # mode -> [layers, experts] routed tokens since last log
        self.entropy: dict[str, list[torch.Tensor]] = {}  # mode -> [per-layer entropy sums, token count]
        self.eval_loads: list[tuple[int, list[list[float]]]] = []  # (step, layer x expert share) per evaluation

    def add(self, trainer, loss, attention_mask, num_items_in_batch, task_loss_name: str | None = None):
        """loss + router losses, from the router logits captured during this forward."""
        logits = policy_logits(self.tap)
        aux, z = router_losses(self.tap, logits, attention_mask)
        training = trainer.model.training
        mode = "train" if training else "eval"
        self._count_routing(mode, trainer, logits, attention_mask)
        # Where the trainer's loss is already scaled for gradient accumulation (SFT: divided by the tokens of
        # the accumulated batch), divide the router losses by the steps; where Trainer divides the whole loss
        # afterwards (DPO), add them as they are. Same rule as transformers' Trainer.training_step.
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            scaled = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = trainer.current_gradient_accumulation_steps if (training and scaled) else 1
        gather = trainer.accelerator.gather  # one value per process: never trimmed like per-sample metrics
        values = {task_loss_name: loss, "aux_loss": aux, "z_loss": z if self.moe.z_loss_coef > 0 else None}
        for name, value in values.items():
            if name is not None and value is not None:
                self.metrics[mode][name].append(gather(value.detach().reshape(1)).mean().item())
        return add_router_losses(loss, aux, z, self.moe.aux_loss_coef, self.moe.z_loss_coef, steps)

    def _count_routing(self, mode, trainer, logits, attention_mask):
        # Summed over ranks as counts, so shares are over all routed tokens (not a mean of ratios). `gather`, not
        # `gather_for_metrics`: these are one row per process, which the latter trims to the samples left in the
        # last batch of a dataloader.
        counts = expert_counts(logits, self.tap.top_k, attention_mask)
        entropy, tokens = entropy_sums(logits, attention_mask)
        gather = trainer.accelerator.gather
        world = trainer.accelerator.num_processes
        counts = gather(counts.unsqueeze(0)).reshape(world, *counts.shape).sum(0).cpu()
        entropy = gather(entropy.unsqueeze(0)).reshape(world, -1).sum(0).cpu()
        tokens = gather(tokens.reshape(1)).sum().cpu()
        self.counts[mode] = self.counts.get(mode, 0) + counts
        previous = self.entropy.get(mode, [0, 0])
        self.entropy[mode] = [previous[0] + entropy, previous[1] + tokens]

    def router_stats(self, mode: str) -> dict | None:
        """Balance since the last call (finetune/moe/router_stats.py), and resets; None if nothing was routed."""
        if mode not in self.counts:
            return None
        entropy, tokens = self.entropy.pop(mode)
        return router_summary(self.counts.pop(mode), entropy / max(float(tokens), 1.0))

    def add_logs(self, logs: dict, mode: str, step: int = 0) -> dict:
        """The loss metrics (averaged since the last line) and router summaries into the log line; every
        layer's values to wandb when it is running."""
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self.metrics[mode].items():
            logs[prefix + name] = sum(values) / len(values)
        self.metrics[mode].clear()
        stats = self.router_stats(mode)
        if stats is None:
            return logs
        if mode == "eval":
            self.eval_loads.append((step, stats["share"].tolist()))
        for key in SUMMARY_KEYS:
            logs[f"{prefix}router/{key}"] = stats[key]
        try:
            import wandb
        except ImportError:
            return logs
        if wandb.run is not None:
            per_layer = {}
            for layer, shares in enumerate(stats["share"].tolist()):
                for key in ("maxvio", "cv", "entropy", "dead"):
                    per_layer[f"{prefix}router_layers/{key}/layer_{layer}"] = float(stats[key][layer])
                for expert, share in enumerate(shares):
                    per_layer[f"{prefix}router_layers/share/layer_{layer}/expert_{expert}"] = share
            wandb.log(per_layer, commit=False)
        return logs


def add_router_losses(loss, aux, z, aux_coef: float, z_coef: float, accumulation_steps: int):
    """loss + (aux_coef * aux + z_coef * z) / accumulation_steps (gradient accumulation: see the module docstring)."""
    extra = aux_coef * aux + z_coef * z
    return loss + extra.to(loss.device) / accumulation_steps


class Throughput:
    """Adds tokens/s and tokens per optimizer step (non-pad tokens, all ranks) to training log lines."""

    def __init__(self):
        self.last: tuple[float, float, int] | None = None

    def update(self, logs: dict, step: int, total_tokens: float) -> dict:
        if "loss" not in logs:  # eval and summary lines
            return logs
        now = (time.perf_counter(), float(total_tokens), step)
        if self.last is not None and step > self.last[2]:
            tokens = now[1] - self.last[1]
            logs["tokens_per_second"] = round(tokens / max(now[0] - self.last[0], 1e-9), 1)
            logs["tokens_per_step"] = round(tokens / (step - self.last[2]), 1)
        self.last = now
        return logs
