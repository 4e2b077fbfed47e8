"""The recipe's `attn_implementation`: checked at parse time and before loading (CUDA, bf16, the package), the
loaded model uses it, and packed rows under flash attention carry no mask in the plan (tests/test_plan.py)."""

import pytest

from finetune.model.attention import check_attention_runs_here
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from helpers import make_trainer, tiny_overrides


def sft_recipe(model_dir, out, *extra):
    return load_recipe("recipes/sft.yaml", [*tiny_overrides(model_dir, out), "train.report_to=none", *extra])


@pytest.mark.parametrize("extra, names", [
    (["attn_implementation=flash"], "attn_implementation='flash' is not one of sdpa, eager, flash_attention_2"),
    (["attn_implementation=flash_attention_2"], "runs on CUDA only, and the recipe says device: cpu"),
    (["attn_implementation=kernels-community/flash-attn2", "device=auto", "sequence_parallel=2",
      "launch=recipes/accelerate/zero3.yaml"], "sequence_parallel wraps sdpa, flash_attention_2, flash_attention_3"),
])
def test_refused_at_parse_time(repo_root, tiny_model_dir, tmp_path, monkeypatch, extra, names):
    monkeypatch.chdir(repo_root)
    with pytest.raises(RecipeError, match="recipes/sft.yaml: ") as err:
        sft_recipe(tiny_model_dir, tmp_path, *extra)
    assert names in str(err.value)


def test_flash_attention_is_refused_before_loading_without_cuda(repo_root, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = sft_recipe(tiny_model_dir, tmp_path, "device=auto", "attn_implementation=flash_attention_2")
    with pytest.raises(RecipeError, match="flash_attention_2 runs on CUDA only, and this run is on the CPU; "
                                          "set attn_implementation=sdpa"):
        check_attention_runs_here(recipe)


def test_flash_attention_on_a_gpu_needs_bf16_and_its_package(repo_root, tiny_model_dir, tmp_path, monkeypatch,
                                                             cuda_present):
    monkeypatch.chdir(repo_root)
    fp32 = sft_recipe(tiny_model_dir, tmp_path, "device=auto", "attn_implementation=flash_attention_2", "train.bf16=false")
    with pytest.raises(RecipeError, match=r"computes in bf16, and this run is fp32 \(train.bf16: false\)"):
        check_attention_runs_here(fp32)
    # flash-attn never installs on a CPU machine; `kernels` (the Hub builds) may come with other packages. Without
    # it the install command is named; with it, transformers loads the Hub build and the recipe is accepted.
    from transformers.utils import is_kernels_available

    for attention, fix in [("flash_attention_2", "pip install flash-attn --no-build-isolation, or pip install kernels"),
                           ("kernels-community/flash-attn3", "pip install kernels")]:
        recipe = sft_recipe(tiny_model_dir, tmp_path, "device=auto", f"attn_implementation={attention}")
        if is_kernels_available():
            check_attention_runs_here(recipe)
        else:
            with pytest.raises(RecipeError, match=f"{attention} is not installed here; {fix}, or set attn"):
                check_attention_runs_here(recipe)
    check_attention_runs_here(sft_recipe(tiny_model_dir, tmp_path, "device=auto", "attn_implementation=sdpa"))


@pytest.mark.parametrize("extra", [[], ["quantization=nf4"]], ids=["bf16-or-fp32", "4-bit"])
def test_the_loaded_model_attends_with_the_recipes_kernel(tiny_model_dir, tmp_path, extra):
    _, trainer, _ = make_trainer(tiny_model_dir, tmp_path, "attn_implementation=eager", *extra)
    assert trainer.model.config._attn_implementation == "eager"
    _, trainer, _ = make_trainer(tiny_model_dir, tmp_path / "default", *extra)
    assert trainer.model.config._attn_implementation == "sdpa"
