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
from finetune.model.master_weights import keep_fp32_master_weights
from finetune.moe.expert_parallel import clip_gradients
from finetune.moe.expert_shards import gathered_experts, sharded_parameters
from finetune.moe.router import RouterTap, policy_logits
from finetune.moe.router_losses import router_losses
from finetune.moe.router_stats import entropy_sums, expert_counts, router_summary
from finetune.train.checkpoints import ExpertOptimizerFiles

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
        if not self.is_deepspeed_enabled:  # DeepSpeed's bf16 mode keeps its own fp32 copy of what trains
            # After TRL built the DPO reference (frozen: it stays bf16), before the optimizer exists.
            keep_fp32_master_weights(self.model)
        self.router_terms = RouterTerms(self.model, moe, self.accelerator.gather)
        self.throughput = Throughput()
        self.expert_optimizer = ExpertOptimizerFiles()
        self.add_callback(self.expert_optimizer)
        self.expert_shards = sharded_parameters(self.model)  # expert parallelism: set before the trainer exists

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.expert_optimizer.resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.router_terms.tap.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self.router_terms.add(self, loss, inputs.get("attention_mask"), num_items_in_batch, self.task_loss_name)
        return (loss, result[1]) if return_outputs else loss

    def save_model(self, output_dir=None, _internal_call=False):
        """Under expert parallelism, every process gathers its experts to the first one first, so the adapter
        (or model) saved is the whole one-process layout (finetune/moe/expert_shards.py)."""
        with gathered_experts(self.model):
            super().save_model(output_dir, _internal_call)

    def _clip_grad_norm(self, model):
        """Under expert parallelism, one norm over all experts, the same on every process
        (finetune/moe/expert_parallel.py: `clip_gradients`); Trainer's own otherwise."""
        norm = self._expert_parallel_norm(model, self.args.max_grad_norm)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged norm: under expert parallelism without clipping, the same one norm over all experts, not
        the main process's own share."""
        if grad_norm is None:
            grad_norm = self._expert_parallel_norm(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _expert_parallel_norm(self, model, max_norm: float):
        if not self.expert_shards:
            return None
        shard = next(iter(self.expert_shards.values())).expert_shard
        return clip_gradients(list(model.parameters()), self.expert_shards.values(), max_norm, shard)

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        logs = self.router_terms.add_logs(logs, mode, self.state.global_step)
        super().log(self.throughput.update(logs, self.state.global_step, self._total_train_tokens), start_time)


class RouterTerms:
    """The router's part of a trainer's loss and logs: adds the recipe's router losses to each forward's loss,
    and sums their values and the routed-token counts until the next log line.

    The sums stay on the device and on each process: a micro-step reads nothing back to the host and
    talks to no other rank. At a log line they are gathered once and read (`pop_means`, `router_stats`).
    Reading them every micro-step, as before, cost a GPU sync and up to four NCCL all-gathers per
    micro-step, logged or not."""

    def __init__(self, model, moe, gather):
        self.tap = RouterTap(model)
        self.gather = gather  # accelerator.gather: one value per process, never trimmed like per-sample metrics
        self.moe = moe
        self.sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}  # loss sums since last log
        self.steps: dict[str, dict[str, int]] = {"train": defaultdict(int), "eval": defaultdict(int)}
        self.routing: dict[str, list[torch.Tensor]] = {}  # mode -> [layer x expert counts, entropy sums, tokens]
        self.eval_loads: list[tuple[int, list[list[float]]]] = []  # (step, layer x expert share) per evaluation

    def add(self, trainer, loss, attention_mask, num_items_in_batch, task_loss_name: str | None = None):
        """loss + router losses, from the router logits captured during this forward."""
        logits = policy_logits(self.tap)
        aux, z = router_losses(self.tap, logits, attention_mask)
        training = trainer.model.training
        mode = "train" if training else "eval"
        self._count_routing(mode, logits, attention_mask)
        # Where the trainer's loss is already scaled for gradient accumulation (SFT: divided by the tokens of
        # the accumulated batch), divide the router losses by the steps; where Trainer divides the whole loss
        # afterwards (DPO), add them as they are. Same rule as transformers' Trainer.training_step.
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            scaled = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = trainer.current_gradient_accumulation_steps if (training and scaled) else 1
        values = {task_loss_name: loss, "aux_loss": aux, "z_loss": z if self.moe.z_loss_coef > 0 else None}
        for name, value in values.items():
            if name is not None and value is not None:
                value = value.detach().float().reshape(1)
                self.sums[mode][name] = self.sums[mode][name] + value if name in self.sums[mode] else value
                self.steps[mode][name] += 1
        return add_router_losses(loss, aux, z, self.moe.aux_loss_coef, self.moe.z_loss_coef, steps)

    def _count_routing(self, mode, logits, attention_mask):
        counts = expert_counts(logits, self.tap.top_k, attention_mask)
        entropy, tokens = entropy_sums(logits, attention_mask)
        new = [counts, entropy, tokens.reshape(1).float()]
        previous = self.routing.get(mode)
        self.routing[mode] = new if previous is None else [a + b for a, b in zip(previous, new)]

    def pop_means(self, mode: str) -> dict[str, float]:
        """Each loss metric's mean over the micro-steps and processes since the last call, and resets."""
        means = {}
        for name, total in self.sums[mode].items():
            gathered = self.gather(total)  # [processes]
            means[name] = gathered.sum().item() / (self.steps[mode][name] * gathered.numel())
        self.sums[mode].clear()
        self.steps[mode].clear()
        return means

    def router_stats(self, mode: str) -> dict | None:
        """Balance since the last call (finetune/moe/router_stats.py), and resets; None if nothing was routed.
        Summed over processes as counts, so shares are over all routed tokens (not a mean of ratios); `gather`,
        not `gather_for_metrics`, which trims to the samples left in a dataloader's last batch."""
        if mode not in self.routing:
            return None
        counts, entropy, tokens = self.routing.pop(mode)
        counts = self.gather(counts.unsqueeze(0)).sum(0).cpu()
        entropy = self.gather(entropy.unsqueeze(0)).sum(0).cpu()
        tokens = self.gather(tokens).sum().item()
        return router_summary(counts, entropy / max(tokens, 1.0))

    def add_logs(self, logs: dict, mode: str, step: int = 0) -> dict:
        """The loss metrics (averaged since the last line) and router summaries into the log line; every
        layer's values to wandb when it is running."""
        prefix = "eval_" if mode == "eval" else ""
        for name, mean in self.pop_means(mode).items():
            logs[prefix + name] = mean
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
