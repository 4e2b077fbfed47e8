"""A run's `output_dir`, checked before anything loads: none of the run's inputs, and holding nothing but
this recipe's own run (a model, another recipe's adapter or stray files are refused). A changed recipe
is named by the keys that changed."""

from __future__ import annotations

from pathlib import Path

from finetune.files.output_folder import listing, overlap
from finetune.recipe.resolved import RECIPE_FILE, changed_keys
from finetune.recipe.schema import Recipe, RecipeError
from finetune.train.checkpoints import checkpoints


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
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = sorted(p.name for p in checkpoints(out))
    if recipe.resume == "never" and earlier:
        raise RecipeError(f"{src}: resume=never, but output_dir={out} holds checkpoints of an earlier run "
                          f"({', '.join(earlier)}) that a later resume=auto would "
                          "pick up; use resume=restart to delete them and start over, or a new output_dir")
    if not (out / RECIPE_FILE).is_file():
        raise RecipeError(f"{src}: output_dir={out} is not empty ({listing(out)}) and holds no run of this toolkit "
                          f"(no {RECIPE_FILE}); training writes only into a new or empty folder or its own run's. "
                          "Set output_dir to a new folder.")
    changed = changed_keys(out / RECIPE_FILE, recipe)
    if changed and recipe.resume != "restart":
        raise RecipeError(f"{src}: output_dir={out} holds a different run (changed: {', '.join(changed)}). "
                          f"Use a new output_dir, or remove {out} to start over there.")
