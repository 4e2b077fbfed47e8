"""The CPU tiers mean the same run on a GPU machine: the tiny recipes (and the test settings) resolve to the
CPU in fp32 even where CUDA is present, while a recipe left on `device: auto` takes the GPU in bf16 there.
CUDA's presence is faked here (torch.cuda.is_available / is_bf16_supported), the one thing this machine
cannot provide; everything downstream is the real code."""

from pathlib import Path

import pytest
import torch

from finetune.model.device import training_device, training_dtype
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from finetune.train.arguments import trainer_args
from helpers import tiny_overrides

TINY = sorted(str(p.relative_to(Path(__file__).resolve().parents[1])) for p in
              (Path(__file__).resolve().parents[1] / "recipes" / "tiny").glob("*.yaml"))


def resolved(recipe):
    args = trainer_args(recipe)
    return training_device(recipe), training_dtype(recipe), args.use_cpu, args.bf16


@pytest.mark.parametrize("path", TINY)
def test_tiny_recipes_stay_on_the_cpu_in_fp32_where_cuda_is_present(path, repo_root, tiny_model_dir, tmp_path,
                                                                    monkeypatch, cuda_present):
    monkeypatch.chdir(repo_root)
    recipe = load_recipe(path, recipe_overrides(path, tiny_model_dir, tmp_path))
    assert resolved(recipe) == ("cpu", torch.float32, True, False)
    # The same recipe left to choose takes the (fake) GPU in bf16: the fake is what the tiny recipes resist.
    # (Not through TRL's config: without use_cpu it calls torch.cuda.set_device, which needs a real GPU.)
    chooses = load_recipe(path, [*recipe_overrides(path, tiny_model_dir, tmp_path), "device=auto"])
    assert (training_device(chooses), training_dtype(chooses)) == ("cuda", torch.bfloat16)


def recipe_overrides(path, model, out):
    return [f"model={model}", f"output_dir={out}", "launch=null"] + (["dpo.sft_adapter=null"] if "dpo" in path else [])


def test_the_test_settings_put_a_full_size_recipe_on_the_cpu_too(repo_root, tiny_model_dir, tmp_path, monkeypatch,
                                                                 cuda_present):
    monkeypatch.chdir(repo_root)
    recipe = load_recipe("recipes/sft.yaml", [*tiny_overrides(tiny_model_dir, tmp_path), "train.report_to=none"])
    assert resolved(recipe) == ("cpu", torch.float32, True, False)


def test_device_cuda_is_refused_where_there_is_none(repo_root, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(repo_root)
    recipe = load_recipe("recipes/tiny/sft.yaml", [*recipe_overrides("sft", tiny_model_dir, tmp_path), "device=cuda"])
    with pytest.raises(RecipeError, match="device: cuda, but this machine has no CUDA device.*set device=cpu"):
        trainer_args(recipe)
    assert resolved(load_recipe("recipes/tiny/sft.yaml", recipe_overrides("sft", tiny_model_dir, tmp_path))) == \
        ("cpu", torch.float32, True, False)
