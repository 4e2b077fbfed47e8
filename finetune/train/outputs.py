"""What a finished pass writes and pushes: the adapter (or full weights), tokenizer, resolved recipe,
training log, model card and router-load plot; then the Hub push when the recipe names `hub.repo_id`."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.data.chat_format import ChatEncoder, save_tokenizer
from finetune.errors import EXIT_PUSH_FAILED
from finetune.evaluation.plots import router_heatmaps
from finetune.publish.card import adapter_card
from finetune.publish.hub import PushError, push
from finetune.recipe.resolved import RECIPE_FILE, dump_yaml
from finetune.recipe.schema import Recipe
from finetune.train.checkpoints import stopper
from finetune.train.run_folder import mark_complete, release_run_folder


def save_outputs(trainer, recipe: Recipe, encoder: ChatEncoder) -> None:
    """Adapter (PEFT format), tokenizer with chat template, resolved recipe, training log."""
    out = Path(recipe.output_dir)
    trainer.save_model(str(out))  # gathers ZeRO-3 shards; writes on the main process only
    if trainer.is_world_process_zero():
        save_tokenizer(encoder, out)
        dump_yaml(recipe, out / RECIPE_FILE)
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        (out / "README.md").write_text(adapter_card(recipe, trainer.state.log_history))
        write_router_load(trainer.router_terms.eval_loads, out, "SFT policy" if recipe.kind == "dpo" else "base")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        mark_complete(recipe, trainer.state)  # last: a save cut short never looks finished
        release_run_folder(recipe)
    stop = stopper(trainer)
    stop.release()
    if not trainer.is_world_process_zero():
        return
    if "wandb" in (trainer.args.report_to or []):
        import wandb

        wandb.finish()  # flush the run now (transformers leaves it open until the interpreter exits)
    what = "adapter" if recipe.method == "lora" else "fully fine-tuned model"
    print(f"{recipe.kind.upper()} {what} written to {recipe.output_dir}")
    if stop.signalled and not stop.interrupted:
        print("SIGTERM arrived during the final save, which completed first: the run is complete", file=sys.stderr)


def write_router_load(eval_loads: list, out: Path, start_name: str) -> Path | None:
    """router_load.png: eval-set router load at the first evaluation (the starting model, when
    eval_on_start) beside the last one. None when the run evaluated fewer than twice."""
    if len(eval_loads) < 2:
        return None
    (first_step, first), (last_step, last) = eval_loads[0], eval_loads[-1]
    first_name = f"{start_name} (step 0)" if first_step == 0 else f"step {first_step}"
    return router_heatmaps([(first_name, first), (f"fine-tuned (step {last_step})", last)],
                           out / "router_load.png")


def push_outputs(recipe: Recipe, is_main: bool) -> int:
    """Push output_dir to `hub.repo_id` from the main process only (after saving; the other ranks have
    nothing to wait for). The exit code: 0, or EXIT_PUSH_FAILED (the local folder is intact)."""
    if recipe.hub.repo_id is None or not is_main:
        return 0
    try:
        url = push(recipe.output_dir, recipe.hub.repo_id, recipe.hub.private, recipe.hub.revision,
                   base_id=recipe.hub.base_id)
    except PushError as err:
        base = f" --base-id {recipe.hub.base_id}" if recipe.hub.base_id else ""
        print(f"error: {err}; push it later with: python -m finetune.push {recipe.output_dir} "
              f"--repo-id {recipe.hub.repo_id}{base}", file=sys.stderr)
        return EXIT_PUSH_FAILED
    print(f"pushed {recipe.output_dir} to {url}")
    return 0


def write_recipe(recipe: Recipe, is_main: bool) -> None:
    if is_main:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(recipe, Path(recipe.output_dir) / RECIPE_FILE)
