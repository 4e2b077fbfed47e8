"""What SFT and DPO do the same way: trainer arguments, resume, throughput logs, router-loss
bookkeeping and the output folder."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from finetune.card import adapter_card
from finetune.chat_format import ChatEncoder, save_tokenizer
from finetune.checkpoints import (
    INTERRUPTED_EXIT_CODE,
    PUSH_FAILED_EXIT_CODE,
    RECIPE_FILE,
    SaveRecipeWithCheckpoint,
    StopWithCheckpoint,
    check_run_folder,
    resume_checkpoint,
)
from finetune.config import Recipe, RecipeError, dump_yaml, load_recipe, trainer_config_class
from finetune.model import use_bf16
from finetune.moe import (
    RouterTap,
    add_router_losses,
    balance_stats,
    entropy_sums,
    expert_counts,
    policy_logits,
    router_losses,
)


def trainer_args(recipe: Recipe):
    """The TRL config for the recipe; TRL's own checks fail here with the recipe named."""
    kwargs = {
        "lr_scheduler_type": "cosine",
        "logging_steps": 10,
        "report_to": "none",
        "gradient_checkpointing": True,
        "logging_first_step": True,  # the first step alone: DPO's must be ln 2, SFT's the base model's loss
        **recipe.train,
        "output_dir": recipe.output_dir,
        "max_length": recipe.data.max_length,
        "bf16": use_bf16(recipe),
        # Router losses are added by finetune.moe (once, padding excluded); TRL's own copy stays off.
        "router_aux_loss_coef": 0.0,
    }
    kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    has_eval = bool(recipe.data.eval) or recipe.data.eval_fraction > 0
    if has_eval and str(kwargs.get("eval_strategy", "no")) != "no":
        kwargs.setdefault("eval_on_start", True)  # the starting eval loss, to compare against
    if recipe.kind == "sft":
        kwargs["packing"] = recipe.data.packing
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    check_wandb_login(recipe, kwargs.get("report_to"))
    try:
        args = trainer_config_class(recipe.kind)(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{recipe.source}: the train section is not valid: {err}") from None
    # Values TRL accepts here and fails on only later, after the model loaded (or with a ZeroDivisionError).
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise RecipeError(f"{recipe.source}: train.{key} must be >= 1, got {getattr(args, key)}")
    if args.learning_rate < 0:
        raise RecipeError(f"{recipe.source}: train.learning_rate must be >= 0, got {args.learning_rate}")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if recipe.lora.method == "full" and args.gradient_checkpointing and is_deepspeed_zero3_enabled():
        # Measured here: torch's checkpoint recompute sees the parameters ZeRO-3 released and fails with
        # "a different number of tensors was saved" (LoRA, whose trained weights ZeRO-3 keeps, is fine).
        raise RecipeError(
            f"{recipe.source}: lora.method: full under DeepSpeed ZeRO-3 fails with gradient checkpointing; "
            "set train.gradient_checkpointing=false, or use lora.method: lora"
        )
    return args


def preflight(recipe: Recipe):
    """Everything the passes refuse before training, checked before any weight or data loads; the TRL
    arguments. `finetune.check` runs exactly this too, so the check and the passes never disagree."""
    from finetune.model import ModelSourceError, check_sft_adapter, model_config

    args = trainer_args(recipe)
    check_run_folder(recipe)
    try:
        model_config(recipe.model)
    except ModelSourceError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    check_sft_adapter(recipe)
    return args


def relaunch_with_accelerate(recipe: Recipe, recipe_path: str, overrides: list[str]) -> int | None:
    """Run the pass under `accelerate launch --config_file recipe.launch` unless already launched; the
    child's exit code, or None to carry on in this process."""
    if recipe.launch is None or os.environ.get("FINETUNE_LAUNCHED") or "LOCAL_RANK" in os.environ:
        return None
    import subprocess

    command = ["accelerate", "launch", "--config_file", recipe.launch, "-m", f"finetune.{recipe.kind}",
               recipe_path, *overrides]
    print("launching: " + " ".join(command), flush=True)
    return subprocess.call(command, env={**os.environ, "FINETUNE_LAUNCHED": "1"})


def check_wandb_login(recipe: Recipe, report_to) -> None:
    """Fail before loading anything when wandb would ask for a login it cannot get."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise RecipeError(
        f"{recipe.source}: train.report_to includes wandb but wandb has no login: run `wandb login`, "
        "set WANDB_API_KEY, or set WANDB_MODE=offline (no network) or train.report_to=none"
    )


def load_data(recipe: Recipe, args, encoder: ChatEncoder):
    """The recipe's data, validated and encoded (finetune.data), with skipped rows reported."""
    from finetune.data import prepare

    is_main = args.process_index == 0
    data = prepare(recipe.data, recipe.kind, encoder, progress=is_main)
    if args.eval_strategy != "no" and not data.eval:
        raise RecipeError(
            f"{recipe.source}: train.eval_strategy={args.eval_strategy} but the data has no eval split; "
            "set data.eval or data.eval_fraction, or train.eval_strategy=no"
        )
    if data.bad_rows and is_main:
        print(f"skipped {len(data.bad_rows)} bad row(s): {dict(data.skipped_by_reason())}")
    return data


def announce(model, recipe: Recipe, args, data) -> None:
    """Before training: trainable parameters per group, router-loss reach, batch arithmetic."""
    from finetune.data import sample_lengths
    from finetune.model import router_loss_warning, trainable_table

    if args.process_index != 0:
        return
    print(trainable_table(model, recipe))
    warning = router_loss_warning(model, recipe)
    if warning:
        print(warning, file=sys.stderr)
    print(describe_batch(args, sample_lengths(data.train), args.world_size))


def trainer_inputs(recipe: Recipe, data, encoder: ChatEncoder) -> dict:
    """The keyword arguments both trainers take the same way."""
    from datasets import Dataset

    return {
        "train_dataset": Dataset.from_list(data.train),
        "eval_dataset": Dataset.from_list(data.eval) if data.eval else None,
        "processing_class": encoder.hf_tokenizer,
        "callbacks": [StopWithCheckpoint(recipe.stop_after_steps), SaveRecipeWithCheckpoint(recipe)],
        "moe": recipe.moe,
    }


# ----------------------------------------------------------------------------------------------
# Router losses and logs shared by the trainer subclasses


class RouterLossHook:
    """Adds the recipe's router losses to a trainer's loss and keeps their metrics."""

    def __init__(self, model, moe):
        self.tap = RouterTap(model)
        self.moe = moe
        self.counts: dict[str, torch.Tensor] = {}  # mode -> [layers, experts] routed tokens since last log
        self.entropy: dict[str, list[torch.Tensor]] = {}  # mode -> [per-layer entropy sums, token count]
        self.eval_loads: list[tuple[int, list[list[float]]]] = []  # (step, layer x expert share) per evaluation

    def add(self, trainer, loss, attention_mask, num_items_in_batch, log_task_loss_as: str | None = None):
        """loss + router losses; `log_task_loss_as` also logs the loss without them (e.g. `dpo_loss`)."""
        logits = policy_logits(self.tap)
        aux, z = router_losses(self.tap, attention_mask, logits)
        training = trainer.model.training
        self._accumulate("train" if training else "eval", trainer, logits, attention_mask)
        # Where the trainer's loss is already scaled for gradient accumulation (SFT: divided by the tokens of
        # the accumulated batch), divide the router losses by the steps; where Trainer divides the whole loss
        # afterwards (DPO), add them as they are. Same rule as transformers' Trainer.training_step.
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            scaled = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = trainer.current_gradient_accumulation_steps if (training and scaled) else 1
        mode = "train" if training else "eval"
        gather = trainer.accelerator.gather_for_metrics
        if log_task_loss_as:
            trainer._metrics[mode][log_task_loss_as].append(gather(loss.detach().reshape(1)).mean().item())
        trainer._metrics[mode]["aux_loss"].append(gather(aux.detach().reshape(1)).mean().item())
        if self.moe.z_loss_coef > 0:
            trainer._metrics[mode]["z_loss"].append(gather(z.detach().reshape(1)).mean().item())
        return add_router_losses(loss, aux, z, self.moe.aux_loss_coef, self.moe.z_loss_coef, steps)


    def _accumulate(self, mode, trainer, logits, attention_mask):
        # Summed over ranks as counts, so shares are over all routed tokens (not a mean of ratios).
        counts = expert_counts(logits, self.tap.top_k, attention_mask)
        entropy, tokens = entropy_sums(logits, attention_mask)
        gather = trainer.accelerator.gather_for_metrics
        world = trainer.accelerator.num_processes
        counts = gather(counts.unsqueeze(0)).reshape(world, *counts.shape).sum(0).cpu()
        entropy = gather(entropy.unsqueeze(0)).reshape(world, -1).sum(0).cpu()
        tokens = gather(tokens.reshape(1)).sum().cpu()
        self.counts[mode] = self.counts.get(mode, 0) + counts
        previous = self.entropy.get(mode, [0, 0])
        self.entropy[mode] = [previous[0] + entropy, previous[1] + tokens]

    def router_stats(self, mode: str) -> dict[str, torch.Tensor] | None:
        """Per-layer balance since the last call: share, cv, maxvio, dead, entropy (and resets)."""
        if mode not in self.counts:
            return None
        stats = balance_stats(self.counts.pop(mode))
        entropy, tokens = self.entropy.pop(mode)
        stats["entropy"] = entropy / max(float(tokens), 1.0)
        return stats

    def add_router_stats(self, logs: dict, mode: str, step: int = 0) -> dict:
        """Compact summaries into the log line; every layer's values to wandb when it is running."""
        stats = self.router_stats(mode)
        if stats is None:
            return logs
        if mode == "eval":
            self.eval_loads.append((step, stats["share"].tolist()))
        prefix = "eval_" if mode == "eval" else ""
        logs[f"{prefix}router/maxvio_mean"] = stats["maxvio"].mean().item()
        logs[f"{prefix}router/maxvio_max"] = stats["maxvio"].max().item()
        logs[f"{prefix}router/cv_mean"] = stats["cv"].mean().item()
        logs[f"{prefix}router/entropy_mean"] = stats["entropy"].mean().item()
        logs[f"{prefix}router/dead_experts"] = int(stats["dead"].sum())
        try:
            import wandb

            if wandb.run is not None:
                per_layer = {}
                for layer in range(stats["share"].shape[0]):
                    for key in ("maxvio", "cv", "entropy", "dead"):
                        per_layer[f"{prefix}router_layers/{key}/layer_{layer}"] = float(stats[key][layer])
                    for expert, share in enumerate(stats["share"][layer].tolist()):
                        per_layer[f"{prefix}router_layers/share/layer_{layer}/expert_{expert}"] = share
                wandb.log(per_layer, commit=False)
        except ImportError:
            pass
        return logs


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


def describe_batch(args, lengths: list[int], world_size: int) -> str:
    """Derived numbers, with units, logged before training starts."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    mean_length = sum(lengths) / max(1, len(lengths))
    steps_per_epoch = math.ceil(len(lengths) / per_step)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return (
        f"batch: {args.per_device_train_batch_size} sequences/device x {args.gradient_accumulation_steps} "
        f"accumulation steps x {world_size} processes = {per_step} sequences per optimizer step, "
        f"about {per_step * mean_length:,.0f} tokens per optimizer step (mean sample {mean_length:.1f} tokens); "
        f"{steps_per_epoch} optimizer steps per epoch, {total} optimizer steps planned"
    )


# ----------------------------------------------------------------------------------------------
# Outputs


def save_outputs(trainer, recipe: Recipe, encoder: ChatEncoder) -> None:
    """Adapter (PEFT format), tokenizer with chat template, resolved recipe, training log."""
    out = Path(recipe.output_dir)
    trainer.save_model(str(out))  # gathers ZeRO-3 shards; writes on the main process only
    if trainer.is_world_process_zero():
        save_tokenizer(encoder.path, out)
        dump_yaml(recipe, out / RECIPE_FILE)
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        (out / "README.md").write_text(adapter_card(recipe, trainer.state.log_history))
        write_router_load(trainer.router_loss.eval_loads, out, "SFT policy" if recipe.kind == "dpo" else "base")
    trainer.accelerator.wait_for_everyone()
    if "wandb" in (trainer.args.report_to or []) and trainer.is_world_process_zero():
        import wandb

        wandb.finish()  # flush the run now (transformers leaves it open until the interpreter exits)


def write_router_load(eval_loads: list, out: Path, start_name: str) -> Path | None:
    """router_load.png: eval-set router load at the first evaluation (the starting model, when
    eval_on_start) beside the last one. None when the run evaluated fewer than twice."""
    if len(eval_loads) < 2:
        return None
    from finetune.plots import router_heatmaps

    (first_step, first), (last_step, last) = eval_loads[0], eval_loads[-1]
    first_name = f"{start_name} (step 0)" if first_step == 0 else f"step {first_step}"
    return router_heatmaps([(first_name, first), (f"fine-tuned (step {last_step})", last)],
                           out / "router_load.png")


def push_outputs(recipe: Recipe, is_main: bool) -> int:
    """Push output_dir to `hub.repo_id` from the main process only (after saving; the other ranks have
    nothing to wait for). The exit code: 0, or PUSH_FAILED_EXIT_CODE (the local folder is intact)."""
    if recipe.hub.repo_id is None or not is_main:
        return 0
    from finetune.push import PushError, push

    try:
        url = push(recipe.output_dir, recipe.hub.repo_id, recipe.hub.private, recipe.hub.revision)
    except PushError as err:
        print(f"error: {err}; push it later with: python -m finetune.push {recipe.output_dir} "
              f"--repo-id {recipe.hub.repo_id}", file=sys.stderr)
        return PUSH_FAILED_EXIT_CODE
    print(f"pushed {recipe.output_dir} to {url}")
    return 0


def write_recipe(recipe: Recipe, is_main: bool) -> None:
    if is_main:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(recipe, Path(recipe.output_dir) / RECIPE_FILE)


def run_pass(kind: str, build, description: str, argv: list[str] | None = None) -> int:
    """What `python -m finetune.sft` / `finetune.dpo` do, with the pass's own `build(recipe)`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m finetune.{kind}", description=description)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=5")
    cli = parser.parse_args(argv)

    # 1. Recipe: every key, TRL's arguments, the output folder, the model and adapter, before anything heavy.
    recipe = load_recipe(cli.recipe, cli.overrides, expect_kind=kind)
    preflight(recipe)
    launched = relaunch_with_accelerate(recipe, cli.recipe, cli.overrides)
    if launched is not None:
        return launched
    resume_from = resume_checkpoint(recipe, is_main=int(os.environ.get("RANK", "0")) == 0)

    # 2. Data, model and trainer: the pass's recipe.
    trainer, encoder = build(recipe)
    is_main = trainer.is_world_process_zero()

    # 3. Train (continuing the same run when output_dir holds its checkpoints).
    write_recipe(recipe, is_main)
    if resume_from and is_main:
        print(f"resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=resume_from)
    stopper = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopWithCheckpoint))
    if stopper.interrupted:
        if is_main:
            print(f"stopped by SIGTERM at step {trainer.state.global_step} with a checkpoint in {recipe.output_dir}; "
                  f"run the same command again to continue (exit code {INTERRUPTED_EXIT_CODE})", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE

    # 4. Save (adapter, tokenizer, resolved recipe, log history, model card), then push if asked.
    save_outputs(trainer, recipe, encoder)
    if is_main:
        what = "adapter" if recipe.lora.method == "lora" else "fully fine-tuned model"
        print(f"{kind.upper()} {what} written to {recipe.output_dir}")
    return push_outputs(recipe, is_main)
