"""ZeRO-3 prefetches the next MoE block: the shipped DeepSpeed configs leave room for it on Mixtral 8x7B and
8x22B, DeepSpeed's defaults do not, and the plan says which it assumed."""

import json

import pytest
from test_plan import row, run_plan

from finetune.model.config import read_model_config
from finetune.planning.memory import count_parameters
from finetune.planning.prefetch import DEFAULT_MAX_LIVE, bucket_size, moe_block_parameters, prefetch_problem
from finetune.recipe.loading import load_recipe

MODELS = ["mistralai/Mixtral-8x7B-v0.1", pytest.param("mistralai/Mixtral-8x22B-v0.1", marks=pytest.mark.slow)]
"""8x22B in the slow tier: the same rule on a larger config, 14 s a case (the fast tier's 5 minutes)."""


def shipped_zero3_configs(repo_root):
    found = sorted((repo_root / "recipes" / "accelerate").glob("ds_zero3*.json"))
    assert len(found) >= 2
    return {path.name: json.loads(path.read_text())["zero_optimization"] for path in found}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rank", [16, 64])
def test_shipped_configs_prefetch_the_next_block(repo_root, monkeypatch, model, rank):
    monkeypatch.chdir(repo_root)
    recipe = load_recipe("recipes/sft.yaml", [f"model={model}", f"lora.r={rank}"])
    config, _ = read_model_config(model, builtin=True)
    block = count_parameters(recipe, config).largest_block  # the leaf as ZeRO-3 gathers it: experts, router, LoRA
    assert block > moe_block_parameters(config) > 1.4e9
    for name, zero in shipped_zero3_configs(repo_root).items():
        max_live, bucket = float(zero["stage3_max_live_parameters"]), bucket_size(zero["stage3_prefetch_bucket_size"], config)
        assert prefetch_problem(config, max_live, bucket, block) is None, name
        assert max_live - block >= bucket >= block  # the bucket holds the next block, and max_live both


@pytest.mark.parametrize("model", MODELS)
def test_deepspeeds_defaults_prefetch_no_expert_block(model):
    config, _ = read_model_config(model, builtin=True)
    problem = prefetch_problem(config, DEFAULT_MAX_LIVE, bucket_size("auto", config))
    assert problem and "stage3_max_live_parameters" in problem and "stage3_prefetch_bucket_size" in problem
    assert "leave no room for it" in problem  # 8x7B: "auto" is 0.9 * 4096^2 = 15e6 of a 1.4e9 block: nothing fits


def test_the_plan_counts_the_prefetched_block_and_names_the_values(repo_root, tmp_path):
    out = run_plan(repo_root, "recipes/sft.yaml", "--gpus", 8)
    line = next(x for x in out.splitlines() if "ZeRO-3 gather" in x)
    assert "block + next (max_live 6e9, bucket 3e9)" in line and "note:" not in out
    ds = json.loads((repo_root / "recipes/accelerate/ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_max_live_parameters"] = 1e9
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    launch = (repo_root / "recipes/accelerate/zero3.yaml").read_text()
    (tmp_path / "zero3.yaml").write_text(launch.replace("recipes/accelerate/ds_zero3.json", str(tmp_path / "ds.json")))
    slow = run_plan(repo_root, "recipes/sft.yaml", "--gpus", 8, f"launch={tmp_path / 'zero3.yaml'}")
    assert row(slow, "ZeRO-3 gather: one block, no prefetch") == pytest.approx(row(out, "ZeRO-3 gather") / 2, abs=0.006)
    assert "note: ZeRO-3 cannot prefetch the next MoE block" in slow and "stage3_max_live_parameters=1e+09" in slow
