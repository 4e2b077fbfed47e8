"""Every recipe in recipes/ is parsed and built against a tiny model, so none goes stale."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from finetune.config import load_recipe
from finetune.runs import trainer_args

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts
)
LOCAL_DATA = {"sft": "data/chat", "dpo": "data/preferences"}


def test_all_recipes_are_covered():
    assert {"recipes/sft.yaml", "recipes/dpo.yaml", "recipes/tiny/sft.yaml", "recipes/tiny/dpo.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_parses_and_builds(path, tiny_model_dir, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the GPU recipes report to wandb; no network here
    recipe = load_recipe(path)
    trainer_args(recipe)  # TRL accepts the train section as written
    kind = recipe.kind
    # Same recipe, on the tiny model and the bundled data (Hub datasets cannot be reached here).
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "out", max_steps=1, per_device_train_batch_size=2,
                               gradient_accumulation_steps=1)
    overrides += [
        f"data.train=[{{path: {LOCAL_DATA[kind]}/eval.jsonl}}]", "data.eval=[]", "data.eval_fraction=0",
        "data.max_length=256", "train.report_to=none",
    ]
    if kind == "dpo":
        from finetune.sft import main as sft_main

        sft_dir = tmp_path / "sft"
        sft_recipe = path.replace("dpo.yaml", "sft.yaml")
        sft_overrides = tiny_overrides(tiny_model_dir, sft_dir, max_steps=1)
        sft_overrides += [f"data.train=[{{path: {LOCAL_DATA['sft']}/eval.jsonl}}]", "data.eval=[]", "data.eval_fraction=0",
                          "train.report_to=none"]
        assert sft_main([sft_recipe, *sft_overrides]) == 0
        overrides.append(f"dpo.sft_adapter={sft_dir}")
        from finetune.dpo import build
    else:
        from finetune.sft import build
    tiny = load_recipe(path, overrides, expect_kind=kind)
    assert tiny.lora == recipe.lora and tiny.moe == recipe.moe  # the recipe's own method and MoE settings
    trainer, _ = build(tiny)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_wandb_without_login_fails_before_loading(tmp_path, monkeypatch):
    from finetune.config import RecipeError

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RecipeError, match="wandb has no login"):
        trainer_args(load_recipe("recipes/sft.yaml"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    trainer_args(load_recipe("recipes/sft.yaml"))
