"""One training pass as `python -m finetune.sft` / `finetune.dpo` run it (`run_pass`), and the pieces of
the pass's build that SFT and DPO share: data, the pre-training report, the trainer's inputs."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

from finetune.arguments import preflight, trainer_args
from finetune.chat_format import ChatEncoder
from finetune.checkpoints import (
    INTERRUPTED_EXIT_CODE,
    SaveRecipeWithCheckpoint,
    StopWithCheckpoint,
    resume_checkpoint,
)
from finetune.config import Recipe, RecipeError, load_recipe
from finetune.saving import push_outputs, save_outputs, write_recipe


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


def load_data(recipe: Recipe, args, encoder: ChatEncoder):
    """The recipe's data, validated and encoded (finetune/data_cache.py), with skipped rows reported. Each
    node's main process tokenizes (or finds the cache) first; the other processes wait, then map its cache."""
    from finetune.data_cache import prepare

    is_main = args.process_index == 0
    with args.main_process_first(local=True, desc="tokenizing the data"):
        data = prepare(recipe.data, recipe.kind, encoder, progress=args.local_process_index == 0)
    how = "opened the cache" if data.cache_hit else "tokenized into the cache"
    who = f"[process {args.process_index}] " if args.world_size > 1 else ""
    print(f"{who}data: {how} {data.folder} in {data.seconds:.2f} s ({len(data.train)} train samples)", flush=True)
    if args.eval_strategy != "no" and data.eval is None:
        raise RecipeError(
            f"{recipe.source}: train.eval_strategy={args.eval_strategy} but the data has no eval split; "
            "set data.eval or data.eval_fraction, or train.eval_strategy=no"
        )
    if data.bad_rows and is_main:
        print(f"skipped {len(data.bad_rows)} bad row(s): {dict(data.skipped_by_reason())}")
    return data


def announce(model, recipe: Recipe, args, data) -> None:
    """Before training: trainable parameters per group, router-loss reach, batch arithmetic."""
    from finetune.model import router_loss_warning, trainable_table

    if args.process_index != 0:
        return
    print(trainable_table(model, recipe))
    warning = router_loss_warning(model, recipe)
    if warning:
        print(warning, file=sys.stderr)
    lengths = data.lengths("train")
    if recipe.kind == "sft" and recipe.data.packing:
        from finetune.check import packed_rows

        rows = packed_rows(lengths, recipe.data.max_length)
        print(f"packing: {len(lengths)} samples -> {rows} rows of <= {recipe.data.max_length} tokens")
        lengths = [sum(lengths) / rows] * rows  # the batch arithmetic counts rows
    print(describe_batch(args, lengths, args.world_size))
    if recipe.sequence_parallel > 1:
        print(f"sequence parallel: each row's tokens split across {recipe.sequence_parallel} processes "
              "(DeepSpeed Ulysses); the data-parallel batch is per group of them")


def trainer_inputs(recipe: Recipe, data, encoder: ChatEncoder) -> dict:
    """The keyword arguments both trainers take the same way."""
    return {
        "train_dataset": data.for_trainer("train"),
        "eval_dataset": data.for_trainer("eval"),
        "processing_class": encoder.hf_tokenizer,
        "callbacks": [StopWithCheckpoint(recipe.stop_after_steps), SaveRecipeWithCheckpoint(recipe)],
        "moe": recipe.moe,
    }


def describe_batch(args, lengths: list[int], world_size: int) -> str:
    """Derived numbers, with units, logged before training starts."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    mean_length = sum(lengths) / max(1, len(lengths))
    steps_per_epoch = math.ceil(len(lengths) / per_step)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return (
        f"batch: {args.per_device_train_batch_size} sequences/device x {args.gradient_accumulation_steps} "
        f"accumulation steps x {world_size} processes = {per_step} sequences per optimizer step, "
        f"about {per_step * mean_length:,.0f} tokens per optimizer step (mean sequence {mean_length:.1f} tokens); "
        f"{steps_per_epoch} optimizer steps per epoch, {total} optimizer steps planned"
    )


@dataclass(frozen=True)
class TrainingPass:
    """What makes a pass itself (finetune/sft.py, finetune/dpo.py); the rest is shared, here."""

    kind: str
    trainer_class: type
    load_model: Callable
    """recipe -> the model whose trainable part the pass trains"""
    description: str

    def build(self, recipe: Recipe, args=None):
        """(trainer, encoder) for a recipe; `args`: its TRL arguments when the caller already built them."""
        return build_pass(recipe, args or trainer_args(recipe), self.trainer_class, self.load_model)

    def main(self, argv: list[str] | None = None) -> int:
        return run_pass(self.kind, self.build, self.description, argv)


def build_pass(recipe: Recipe, args, trainer_class, load_model):
    """Recipe -> data -> model -> trainer, printing what will train: the steps SFT and DPO share."""
    from transformers import set_seed

    from finetune.chat_format import encoder_for
    from finetune.nf4 import keep_out_of_ddp

    # Data: Mixtral-Instruct token ids (SFT: labels on the replies; DPO: prompt and reply ids).
    encoder = encoder_for(recipe)
    data = load_data(recipe, args, encoder)

    # Model. Seeded first: PEFT draws the initialisation of a fresh LoRA adapter from the global RNG.
    set_seed(args.seed)
    model = load_model(recipe)
    keep_out_of_ddp(model)  # 4-bit expert stacks, if any: DDP cannot broadcast them, and need not
    announce(model, recipe, args, data)
    trainer = trainer_class(model=model, args=args, **trainer_inputs(recipe, data, encoder))
    return trainer, encoder


def run_pass(kind: str, build, description: str, argv: list[str] | None = None) -> int:
    """What `python -m finetune.sft` / `finetune.dpo` do, with the pass's own `build(recipe)`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m finetune.{kind}", description=description)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=5")
    cli = parser.parse_args(argv)

    # 1. Recipe: every key, TRL's arguments, the output folder, the model and adapter, before anything heavy.
    recipe = load_recipe(cli.recipe, cli.overrides, expect_kind=kind)
    args = preflight(recipe)
    launched = relaunch_with_accelerate(recipe, cli.recipe, cli.overrides)
    if launched is not None:
        return launched
    resume_from = resume_checkpoint(recipe, is_main=int(os.environ.get("RANK", "0")) == 0)

    # 2. Data, model and trainer: the pass's recipe.
    trainer, encoder = build(recipe, args)
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
