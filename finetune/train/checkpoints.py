"""A run's checkpoints: kill the run at any moment, run the same command again, and it continues the same run.

- `resume_checkpoint`: `resume: auto` continues from the newest *complete* checkpoint (weights,
  optimizer, scheduler, RNG and trainer state present and readable) saved under the same recipe, and
  says which incomplete ones (a kill while saving) it skipped.
- `StopWithCheckpoint`: on SIGTERM (what schedulers and spot instances send before a kill), or after
  `stop_after_steps`, the run finishes the current optimizer step, saves a checkpoint and stops;
  the pass then exits with `EXIT_INTERRUPTED` (finetune/errors.py).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import sys
import zipfile
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.moe.expert_shards import sharded_parameters
from finetune.recipe.resolved import RECIPE_FILE, changed_keys, dump_yaml
from finetune.recipe.schema import Recipe, RecipeError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin")


def resume_checkpoint(recipe: Recipe, is_main: bool = True) -> str | None:
    """The checkpoint to continue from, per `recipe.resume`: the newest complete one for `auto`; none for
    `restart` (`delete_earlier_run` clears the folder once the run holds it) and `never`."""
    out = Path(recipe.output_dir)
    if recipe.resume in ("never", "restart") or not out.is_dir():
        return None
    needs_optimizer = not recipe.train.get("save_only_model", False)
    if recipe.resume != "auto":
        checkpoint = Path(recipe.resume)
        if not checkpoint.is_dir():
            raise RecipeError(f"{recipe.source}: resume={recipe.resume!r}: no such checkpoint folder")
        problem = checkpoint_problem(checkpoint, needs_optimizer, recipe.expert_parallel > 1)
        if problem:
            raise RecipeError(f"{recipe.source}: resume={recipe.resume!r}: incomplete checkpoint ({problem})")
    else:
        checkpoint = None
        for candidate in sorted(checkpoints(out), key=lambda p: -int(CHECKPOINT.match(p.name).group(1))):
            problem = checkpoint_problem(candidate, needs_optimizer, recipe.expert_parallel > 1)
            if problem is None:
                checkpoint = candidate
                break
            if is_main:
                print(f"skipping incomplete checkpoint {candidate} ({problem}): probably killed while saving")
        if checkpoint is None:
            return None
    own_recipe = checkpoint / RECIPE_FILE
    if own_recipe.is_file():
        changed = changed_keys(own_recipe, recipe)
        if changed:
            raise RecipeError(f"{recipe.source}: {checkpoint} was saved by a different run (changed: "
                              f"{', '.join(changed)}). Use a new output_dir.")
    return str(checkpoint)


def delete_earlier_run(recipe: Recipe) -> None:
    """`resume: restart`: delete the earlier run's checkpoints, saying which (main process, holding the folder)."""
    out = Path(recipe.output_dir)
    if recipe.resume == "restart" and out.is_dir():
        for old in sorted(checkpoints(out)):
            shutil.rmtree(old)
            print(f"resume=restart: deleted {old}")


def checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]


def checkpoint_problem(folder: Path, needs_optimizer: bool = True, expert_parallel: bool = False) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or truncated files), or None if complete.
    Checks file headers and zip directories only: cheap even for a 47B model's checkpoint. Under expert
    parallelism, each process's optimizer state too (`ExpertOptimizerFiles`)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json"
    except (ValueError, KeyError):
        return "trainer_state.json is unreadable"
    deepspeed_tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else None
    if deepspeed_tag is not None and not (folder / deepspeed_tag).is_dir():
        return f"'latest' names {deepspeed_tag}, which is missing"
    if deepspeed_tag is None and not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    if needs_optimizer:
        if deepspeed_tag is None and not (folder / "optimizer.pt").is_file():
            return "no optimizer.pt"
        if deepspeed_tag is None and not (folder / "scheduler.pt").is_file():
            return "no scheduler.pt"
        if not any(folder.glob("rng_state*.pth")):
            return "no RNG state"
        if expert_parallel:
            for rng in folder.glob("rng_state_*.pth"):
                rank = rng.stem.rsplit("_", 1)[1]
                if not (folder / EXPERT_OPTIMIZER.format(rank=rank)).is_file():
                    return f"no {EXPERT_OPTIMIZER.format(rank=rank)}"
    for path in sorted(folder.rglob("*")):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            problem = "truncated (no zip directory)"
        if problem:
            return f"{path.relative_to(folder)} is {problem}"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({s for s in json.loads(index.read_text())["weight_map"].values() if not (folder / s).is_file()})
        if missing:
            return f"shards missing: {', '.join(missing)}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file whose header is unreadable or whose data is shorter than the header says."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size:
                return "truncated"
            header = json.loads(f.read(length))
    except (struct.error, ValueError):
        return "unreadable"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return "truncated" if 8 + length + end > size else None


class SaveRecipeWithCheckpoint(TrainerCallback):
    """Each checkpoint carries the recipe it was saved under, so a resume compares against its own run."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            dump_yaml(self.recipe, folder / RECIPE_FILE)


EXPERT_OPTIMIZER = "expert_optimizer_{rank}.pt"


class ExpertOptimizerFiles(TrainerCallback):
    """Under expert parallelism each process's optimizer holds the state of its own experts, which Trainer's
    `optimizer.pt` (written by the main process alone, read by every process) cannot carry. Every process also
    writes its optimizer state to `expert_optimizer_{rank}.pt`; a resumed run loads its own over the main
    process's at its first step (Trainer loads `optimizer.pt` after `on_train_begin`, before any step).
    `resume_from` is set by the trainer's `train` (finetune/train/trainer.py)."""

    def __init__(self):
        self.resume_from: str | None = None

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None and sharded_parameters(model):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            torch.save(optimizer.state_dict(), folder / EXPERT_OPTIMIZER.format(rank=args.process_index))

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.resume_from is None:
            return
        folder, self.resume_from = Path(self.resume_from), None
        if sharded_parameters(model):
            own = torch.load(folder / EXPERT_OPTIMIZER.format(rank=args.process_index), weights_only=True)
            optimizer.load_state_dict(own)


# ----------------------------------------------------------------------------------------------
# Stopping with a checkpoint


class StopWithCheckpoint(TrainerCallback):
    """Stop at the end of the current optimizer step, with a checkpoint, on SIGTERM or after `steps` steps
    (the schedule still follows train.max_steps). `interrupted` tells the caller a signal stopped it."""

    def __init__(self, steps: int | None = None):
        self.steps = steps
        self.signalled = False
        self.interrupted = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def release(self) -> None:
        """Give SIGTERM back, once the pass has saved everything: a SIGTERM during the final save only marks
        the run (the save completes), instead of killing it with a half-written adapter."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        self.signalled = True
        print("SIGTERM received: stopping after this optimizer step, with a checkpoint", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signalled
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            # Signals reach ranks at different moments; all must stop after the same step or they hang.
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        self.interrupted = self.interrupted or (stop and state.global_step < state.max_steps)
        if stop or (self.steps is not None and state.global_step >= self.steps):
            control.should_save = True
            control.should_training_stop = True
        return control


def stopper(trainer) -> StopWithCheckpoint:
    """The trainer's StopWithCheckpoint callback (every pass has one: finetune/train/steps.py)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopWithCheckpoint))
