"""A run's `output_dir`: checked before anything loads (none of the run's inputs, nothing but this recipe's
own run; a changed recipe is named by the keys that changed), held by one run at a time (a lock), and marked
complete once everything is saved, so the same command run again says so and changes nothing.

Training further: raise `train.max_steps` (or `num_train_epochs`) and run again; the run continues from its
last checkpoint (with `train.save_strategy: no` there is none, and that is refused).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from finetune.files.output_folder import RUN_LOCK_FILE, overlap
from finetune.recipe.resolved import RECIPE_FILE, changed_keys
from finetune.recipe.schema import CONTINUABLE_KEYS, Recipe, RecipeError
from finetune.train.checkpoints import checkpoints
from finetune.train.launch import is_main_process

COMPLETE_FILE = "run_complete.json"
"""Written last by a finished pass (finetune/train/outputs.py): the steps done and the lengths planned."""
_held_locks: dict[Path, int] = {}  # folder -> descriptor of the lock this process holds, until the pass ends


def run_inputs(recipe: Recipe) -> dict[str, str | None]:
    """Every local path the pass reads, by the recipe key that names it."""
    inputs = {"model": recipe.model, "tokenizer": recipe.tokenizer}
    if recipe.kind == "dpo":
        inputs["dpo.sft_adapter"] = recipe.dpo.sft_adapter
    for group in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, group)):
            inputs[f"data.{group}[{i}].path"] = source.path
    return inputs


def check_run_folder(recipe: Recipe) -> None:
    """Refuse an output_dir that is (or holds, or lies in) an input, or that holds anything but this run."""
    out, src = Path(recipe.output_dir), recipe.source
    collision = overlap(out, run_inputs(recipe))
    if collision:
        raise RecipeError(f"{src}: output_dir={out}: {collision}; training never writes into its own inputs. "
                          "Set output_dir to a new folder.")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{src}: output_dir={out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir() if p.name != RUN_LOCK_FILE) if out.is_dir() else []
    if not entries:
        return
    earlier = sorted(p.name for p in checkpoints(out))
    if recipe.resume == "never" and earlier:
        refuse_never(recipe, ", ".join(earlier))
    if not (out / RECIPE_FILE).is_file():
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
        raise RecipeError(f"{src}: output_dir={out} is not empty ({shown}) and holds no run of this toolkit "
                          f"(no {RECIPE_FILE}); training writes only into a new or empty folder or its own run's. "
                          "Set output_dir to a new folder.")
    changed = changed_keys(out / RECIPE_FILE, recipe)
    if changed and recipe.resume != "restart":
        raise RecipeError(f"{src}: output_dir={out} holds a different run (changed: {', '.join(changed)}). "
                          f"Use a new output_dir, or remove {out} to start over there.")
    if recipe.resume == "never" and (out / COMPLETE_FILE).is_file():
        refuse_never(recipe, "finished")


def refuse_never(recipe: Recipe, what: str) -> None:
    raise RecipeError(f"{recipe.source}: resume=never, but output_dir={recipe.output_dir} holds an earlier run "
                      f"({what}) that a later resume=auto would pick up; use resume=restart to delete it and start "
                      "over, or a new output_dir")


def claim_run_folder(recipe: Recipe) -> None:
    """Lock output_dir for this run (the launch's main process), or refuse: another run is training there."""
    if not is_main_process():
        return
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() in _held_locks:
        return  # already this process's (a pass that failed earlier in this same process)
    descriptor = os.open(out / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise RecipeError(f"{recipe.source}: output_dir={out} is in use by another run (process {holder}); wait for "
                          "it to end, or set output_dir to another folder") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _held_locks[out.resolve()] = descriptor


def release_run_folder(recipe: Recipe) -> None:
    """Let go of output_dir: the pass is over (saved, or nothing to do). A process that dies lets go anyway."""
    descriptor = _held_locks.pop(Path(recipe.output_dir).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the last descriptor of the open file releases its flock


def planned_length(recipe: Recipe) -> dict:
    return {key: recipe.train.get(key.split(".", 1)[1]) for key in CONTINUABLE_KEYS}


def mark_complete(recipe: Recipe, state) -> None:
    """The last file a finished pass writes: without it, a run is never taken for finished."""
    record = {"global_step": state.global_step, "max_steps": state.max_steps, "planned": planned_length(recipe)}
    (Path(recipe.output_dir) / COMPLETE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def already_complete(recipe: Recipe) -> bool:
    """True (and says so) when output_dir holds this recipe's finished run: nothing to do. A run stopped early
    (`stop_after_steps`) is not finished; one asked to train longer continues from its last checkpoint."""
    marker = Path(recipe.output_dir) / COMPLETE_FILE
    if recipe.resume != "auto" or not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    if record["global_step"] < record["max_steps"]:
        return False
    if record["planned"] == planned_length(recipe):
        release_run_folder(recipe)
        if is_main_process():
            print(f"{recipe.output_dir}: this run is already complete ({record['global_step']} steps); nothing was "
                  "changed. To train further, raise train.max_steps: the run continues from its last checkpoint")
        return True
    if not checkpoints(Path(recipe.output_dir)):
        raise RecipeError(f"{recipe.source}: output_dir={recipe.output_dir} holds a finished run of "
                          f"{record['global_step']} steps and no checkpoint to continue it from (it was trained with "
                          "train.save_strategy=no); train in a new output_dir")
    return False
