"""Every recipe in recipes/ is parsed and built against a tiny model, so none goes stale."""

from pathlib import Path

import pytest
import torch

from finetune.recipe.loading import load_recipe
from finetune.train.arguments import trainer_args
from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts
)
LOCAL_DATA = {("sft", "v1"): "data/chat", ("dpo", "v1"): "data/preferences",
              ("sft", "v3"): "data/tools", ("dpo", "v3"): "data/tool_preferences"}
"""The bundled data each recipe is built on: function-calling rows for the v3 (Mixtral 8x22B) recipes."""


def test_every_dpo_recipe_has_its_sft_recipe_and_every_launch_config_exists():
    """What the build test below relies on: a DPO recipe is built from its SFT sibling's adapter, and a
    recipe's `launch` (and that config's DeepSpeed file) exist."""
    from finetune.recipe.typed_yaml import parse_yaml

    kinds = {path: load_recipe(path).kind for path in RECIPES}
    assert sorted(set(kinds.values())) == ["dpo", "sft"]
    for path, kind in kinds.items():
        if kind == "dpo":
            assert kinds.get(path.replace("dpo", "sft")) == "sft", path
        launch = load_recipe(path).launch
        if launch:
            deepspeed = (parse_yaml((ROOT / launch).read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
            assert deepspeed is None or (ROOT / deepspeed).is_file(), (path, deepspeed)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_parses_and_builds(path, request, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the GPU recipes report to wandb; no network here
    recipe = load_recipe(path)
    trainer_args(recipe)  # TRL accepts the train section as written
    kind = recipe.kind
    v3 = recipe.chat_format == "v3"
    tiny_model_dir = request.getfixturevalue("tiny_v3_model_dir" if v3 else "tiny_model_dir")
    data, sft_data = LOCAL_DATA[kind, "v3" if v3 else "v1"], LOCAL_DATA["sft", "v3" if v3 else "v1"]
    max_length = 512 if v3 else 256  # the bundled tools' JSON alone is about 300 tokens
    # Same recipe, on the tiny model and the bundled data (Hub datasets cannot be reached here).
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "out", max_steps=1, per_device_train_batch_size=2,
                               gradient_accumulation_steps=1)
    overrides += [
        f"data.train=[{{path: {data}/eval.jsonl}}]", "data.eval=[]", "data.eval_fraction=0",
        f"data.max_length={max_length}", "train.report_to=none",
    ]
    if kind == "dpo":
        from finetune.sft import main as sft_main

        sft_dir = tmp_path / "sft"
        sft_recipe = path.replace("dpo", "sft")
        sft_overrides = tiny_overrides(tiny_model_dir, sft_dir, max_steps=1)
        sft_overrides += [f"data.train=[{{path: {sft_data}/eval.jsonl}}]", "data.eval=[]", "data.eval_fraction=0",
                          f"data.max_length={max_length}", "train.report_to=none"]
        assert sft_main([sft_recipe, *sft_overrides]) == 0
        overrides.append(f"dpo.sft_adapter={sft_dir}")
        from finetune.dpo import build
    else:
        from finetune.sft import build
    trainer, _ = build(load_recipe(path, overrides, expect_kind=kind))
    # The recipe's own method on the tiny model: exactly its groups train, at its rank.
    from finetune.model.lora_targets import group_of

    trained = {group_of(n) for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == set(recipe.trainable)
    from finetune.moe.nf4 import quantized_stacks

    assert len(quantized_stacks(trainer.model)) == (4 if recipe.quantization == "nf4" else 0)  # 2 layers x 2 stacks
    if recipe.method == "lora":
        assert trainer.model.peft_config["default"].r == recipe.lora.peft.get("r", 16)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_wandb_without_login_fails_before_loading(tmp_path, monkeypatch):
    from finetune.recipe.schema import RecipeError

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RecipeError, match="wandb has no login"):
        trainer_args(load_recipe("recipes/sft.yaml"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    trainer_args(load_recipe("recipes/sft.yaml"))
