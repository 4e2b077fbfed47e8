"""The steps of a training pass that SFT and DPO share, each a function `finetune/sft.py` and `finetune/dpo.py`
call in their `main()`: the command line, the data, what the pass announces before training, the trainer's
inputs, and training itself (with the SIGTERM stop)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from finetune.data.cache import Prepared, prepare
from finetune.data.chat_format import ChatEncoder
from finetune.data.packing import packed_rows
from finetune.errors import EXIT_INTERRUPTED
from finetune.model.trainable_report import router_loss_warning, trainable_table
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import Recipe, RecipeError
from finetune.train.checkpoints import SaveRecipeWithCheckpoint, StopWithCheckpoint, delete_earlier_run, stopper
from finetune.train.outputs import write_recipe
from finetune.train.run_folder import COMPLETE_FILE, claim_run_folder


def recipe_from_command_line(prog: str, kind: str | None, description: str,
                             argv: list[str] | None) -> tuple[Recipe, argparse.Namespace]:
    """`RECIPE [key.sub=value ...]`, the command line of both passes and `finetune check`: the recipe loaded and
    checked (as a `kind` recipe, when given), and the command line (a relaunch passes it on)."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=5")
    command = parser.parse_args(argv)
    return load_recipe(command.recipe, command.overrides, expect_kind=kind), command


def load_data(recipe: Recipe, args, encoder: ChatEncoder) -> Prepared:
    """The recipe's data, validated and encoded (finetune/data/cache.py), with skipped rows reported. Each
    node's main process tokenizes (or finds the cache) first; the other processes wait, then map its cache."""
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


def announce(model, recipe: Recipe, args, data: Prepared) -> None:
    """Before training: trainable parameters per group, router-loss reach, batch arithmetic."""
    if args.process_index != 0:
        return
    print(trainable_table(model, recipe))
    warning = router_loss_warning(model, recipe)
    if warning:
        print(warning, file=sys.stderr)
    lengths = data.lengths("train")
    if recipe.kind == "sft" and recipe.data.packing:
        rows = packed_rows(lengths, recipe.data.max_length)
        print(f"packing: {len(lengths)} samples -> {rows} rows of <= {recipe.data.max_length} tokens")
        lengths = [sum(lengths) / rows] * rows  # the batch arithmetic counts rows
    print(describe_batch(args, lengths, args.world_size))
    if recipe.sequence_parallel > 1:
        print(f"sequence parallel: each row's tokens split across {recipe.sequence_parallel} processes "
              "(DeepSpeed Ulysses); the data-parallel batch is per group of them")
    shard = next((p.expert_shard for p in model.parameters() if getattr(p, "expert_shard", None)), None)
    if shard is not None:
        print(f"expert parallel: each process holds {shard.local} of the {shard.total} experts of every layer "
              f"(this one experts {shard.first}-{shard.first + shard.local - 1}; the table above counts its share), "
              f"and sends each routed token to its expert's process")


def trainer_inputs(recipe: Recipe, data: Prepared, encoder: ChatEncoder) -> dict:
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


def train(trainer, recipe: Recipe, resume_from: str | None) -> int | None:
    """Train (continuing the run in `resume_from`, if any) once this run holds output_dir (one run per folder;
    taken only now, so a refused recipe or bad data leaves no folder behind), with the resolved recipe written
    first. Returns EXIT_INTERRUPTED when SIGTERM stopped it (a checkpoint was saved; the same command
    continues), else None."""
    is_main = trainer.is_world_process_zero()
    claim_run_folder(recipe)
    if is_main:
        delete_earlier_run(recipe)  # resume: restart
        (Path(recipe.output_dir) / COMPLETE_FILE).unlink(missing_ok=True)  # not complete until saved again
    write_recipe(recipe, is_main)
    if resume_from and is_main:
        print(f"resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=resume_from)
    if not stopper(trainer).interrupted:
        return None
    if is_main:
        print(f"stopped by SIGTERM at step {trainer.state.global_step} with a checkpoint in {recipe.output_dir}; "
              f"run the same command again to continue (exit code {EXIT_INTERRUPTED})", file=sys.stderr)
    return EXIT_INTERRUPTED

