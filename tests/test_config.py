"""Recipes: YAML + dotted overrides -> typed dataclasses; bad keys fail at parse time, naming the key."""

import subprocess
import sys
import textwrap

import pytest

from finetune.recipe.loading import load_recipe
from finetune.recipe.resolved import dump_yaml
from finetune.recipe.schema import RecipeError

BASE = """
kind: sft
model: some/model
output_dir: out
data:
  train:
    - path: data/chat/train.jsonl
trainable: [attention, experts, router]
lora:
  r: 8
  lora_alpha: 16
train:
  max_steps: 10
  learning_rate: 1.0e-3
"""


def write(tmp_path, text=BASE, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_and_overrides_build_typed_recipe(tmp_path):
    path = write(tmp_path)
    recipe = load_recipe(path, ["train.max_steps=3", "model=path/to/dir", "data.max_length=512", "moe.z_loss_coef=0.001"])
    assert recipe.model == "path/to/dir"
    assert recipe.train["max_steps"] == 3 and recipe.train["learning_rate"] == 1e-3
    assert recipe.data.max_length == 512 and recipe.data.train[0].path == "data/chat/train.jsonl"
    assert recipe.lora.peft == {"r": 8, "lora_alpha": 16}
    assert recipe.moe.z_loss_coef == 0.001 and recipe.moe.aux_loss_coef == 0.02


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path), ["train.max_steps=7"])
    dump_yaml(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.train == recipe.train and again.lora == recipe.lora and again.data == recipe.data


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epochs=3"], "unknown key 'epochs'"),
        (["data.maxlen=3"], "unknown key 'data.maxlen'"),
        (["lora.rank=4"], "unknown key 'lora.rank'"),
        (["train.max_stepz=4"], "unknown key 'train.max_stepz'"),
        (["train.learning_rate=fast"], "train.learning_rate must be float"),
        (["data.max_length=long"], "data.max_length must be int"),
        (["lora.r=two"], "lora.r must be int"),
        (["trainable=[attention, mlp]"], "trainable must be"),
        (["data.on_bad_rows=ignore"], "data.on_bad_rows must be one of 'error', 'skip'"),
        (["lora.lora_dropout=0.1"], "lora.lora_dropout=0.1 is impossible with 'experts'"),
        (["train.max_length=99"], "use data.max_length"),
        (["train.router_aux_loss_coef=0.1"], "use moe.aux_loss_coef"),
        (["lora.target_modules=[q_proj]"], "use trainable"),
        (["moe.aux_loss_coef=-1"], "moe.aux_loss_coef must be >= 0"),
        (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1)"),
        (["trainable=[]"], "trainable is empty"),
        (["kind=dpo", "data.packing=true"], "data.packing is for SFT only"),
        (["method=full"], "lora.r has no meaning with method: full"),
        (["dpo.sft_adapter=x"], "dpo.sft_adapter belongs in a DPO recipe"),
        (["train.max_steps"], "must look like key.sub=value"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, overrides, message):
    path = write(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_expert_dropout_is_fine_without_experts(tmp_path):
    recipe = load_recipe(write(tmp_path), ["trainable=[attention]", "lora.lora_dropout=0.1"])
    assert recipe.lora.peft["lora_dropout"] == 0.1


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "model: m\ndata:\n  train: [{path: x.jsonl}]\n")
    with pytest.raises(RecipeError, match="missing required key 'output_dir'"):
        load_recipe(path)


def test_wrong_pass_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="run it with python -m finetune.sft"):
        load_recipe(write(tmp_path), expect_kind="dpo")


def test_cli_reports_bad_key_without_traceback(tmp_path, repo_root):
    path = write(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.check", str(path), "train.nonsense=1"],
        capture_output=True, text=True, cwd=repo_root,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.nonsense'" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
