"""The third round of misuse, refused before anything is loaded or written: non-finite numbers, YAML that
expands without bound, files that are not UTF-8, launch files accelerate would choke on, model sizes the
kernels cannot run, and published cards that a folder name could rewrite. Each case is one `error:` line that
names the input and the fix, run through the `finetune` command in this process."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from finetune.model.tiny import make_tiny_mixtral
from finetune.publish.card import adapter_card, merged_card, public_recipe
from finetune.recipe.loading import load_recipe
from finetune.recipe.resolved import dump_yaml
from finetune.recipe.typed_yaml import parse_yaml
from helpers import ROOT, refused_here, tiny_overrides

SFT = "recipes/tiny/sft.yaml"


@pytest.fixture
def check(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`finetune check` of the tiny SFT recipe with overrides, expected to be refused naming `names`."""
    monkeypatch.chdir(ROOT)

    def refuse(overrides, names, recipe=SFT, model=tiny_model_dir):
        argv = ["check", str(recipe), *tiny_overrides(model, tmp_path / "out"), *overrides]
        refused_here(capsys, argv, names)
        assert not (tmp_path / "out").exists()  # nothing written

    return refuse


@pytest.mark.parametrize("override, names", [
    ("moe.aux_loss_coef=.nan", "moe.aux_loss_coef must be a finite number, got nan"),
    ("moe.z_loss_coef=.inf", "moe.z_loss_coef must be a finite number, got inf"),
    ("train.learning_rate=.nan", "train.learning_rate must be a finite number, got nan"),
    ("data.train=[{path: data/chat/train.jsonl, weight: .nan}]", "data.train[0].weight must be a finite number"),
    ("data.eval_fraction=-.inf", "data.eval_fraction must be a finite number, got -inf"),
    ("trainable=[router]", "trainable: [router] gives LoRA nothing to adapt"),
    ("lora.targets=[attention]", "lora.targets is set by the recipe itself; use trainable"),
    ("lora.method=full", "lora.method is set by the recipe itself; use method"),
])
def test_recipe_values_that_cannot_train(check, override, names):
    check([override], names)


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


@pytest.mark.parametrize("text, names", [
    (BILLION_LAUGHS, "not valid YAML: an alias (*a) is not allowed here"),
    ("a: &self [*self]\n", "not valid YAML: an alias (*self) is not allowed here"),
    (b"kind: sft\nmodel: caf\xe9\n", ":2: not valid UTF-8 (byte 0xe9); save the recipe file as UTF-8"),
])
def test_recipe_files_that_cannot_be_read(check, tmp_path, text, names):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else Path(SFT).read_text().encode() + b"\n" + text.encode())
    check([], names, recipe=recipe)


@pytest.mark.parametrize("text, names", [
    ("num_processes: two\n", "num_processes must be a whole number >= 1, got 'two'"),
    ("distributed_type: [DEEPSPEED\n", "not valid YAML"),
    (b"num_processes: 2\n# caf\xe9\n", "not valid UTF-8"),
])
def test_launch_files_accelerate_would_choke_on(check, tmp_path, text, names):
    launch = tmp_path / "launch.yaml"
    launch.write_bytes(text if isinstance(text, bytes) else text.encode())
    check([f"launch={launch}"], f"{launch}")
    check([f"launch={launch}"], names)


def test_a_recipe_file_named_with_a_newline_resumes(tiny_model_dir, tmp_path):
    recipe = tmp_path / "odd\nname.yaml"
    recipe.write_text(Path(ROOT / SFT).read_text())
    loaded = load_recipe(recipe, tiny_overrides(tiny_model_dir, tmp_path / "out"))
    dump_yaml(loaded, tmp_path / "recipe.yaml")
    assert parse_yaml((tmp_path / "recipe.yaml").read_text())["model"] == str(tiny_model_dir)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    strides = make_tiny_mixtral(root / "strides", hidden=36, intermediate=50)  # 50 fp32 rows: 200 bytes
    blocks = make_tiny_mixtral(root / "blocks", hidden=36, intermediate=52)  # 2 * 52 * 36 = 58.5 blocks of 64
    return strides, blocks


@pytest.mark.slow  # builds two tiny models of odd sizes
def test_sizes_the_expert_kernels_cannot_run(check, odd_models, monkeypatch, capsys):
    strides, blocks = odd_models
    check([], "intermediate_size 50 must be multiples of 4 in 32-bit weights", model=strides)
    pytest.importorskip("bitsandbytes")
    check(["quantization=nf4"], "the gate_up expert matrix (104 x 36) is not a whole number of 64-weight blocks",
          model=blocks)
    refused_here(capsys, ["plan", SFT, f"model={blocks}", "quantization=nf4", "--device", "cpu"], "64-weight blocks")
    refused_here(capsys, ["plan", SFT, f"model={strides}", "--device", "cpu"], "intermediate_size 50")


def test_plan_refuses_sequence_parallel_over_fewer_processes(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    refused_here(capsys, ["plan", SFT, f"model={tiny_model_dir}", "sequence_parallel=2", "--gpus", "3",
                          "--device", "cpu"], "sequence_parallel: 2 must divide the 3 processes (--gpus 3 x --nodes 1)")


@pytest.mark.parametrize("argv, names", [
    (["chat", "MODEL", "--temperature", "nan"], "--temperature nan: give a finite number"),
    (["chat", "MODEL", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
    (["export", "MODEL", "--out", "OUT", "--tolerance", "-1"], "--tolerance -1: give a number of at least 0"),
    (["export", "MODEL", "--out", "OUT", "--tolerance", "inf"], "--tolerance inf: give a finite number"),
    (["plan", SFT, "--gpu-memory", "nan"], "--gpu-memory nan: give a finite number"),
    (["evaluate", "MODEL", "--suite", "eval/bundled.yaml", "--out", "OUT", "lm_eval_tasks=[capitals_mcq]"],
     "lm_eval_tasks: capitals_mcq is no lm-eval task"),
    (["evaluate", "MODEL", "--suite", "eval/bundled.yaml", "--out", "OUT", "beta=.nan"],
     "eval/bundled.yaml: beta must be a finite number, got nan"),
])
def test_options_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys, argv, names):
    monkeypatch.chdir(ROOT)
    argv = [str(tiny_model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    refused_here(capsys, argv, names)
    assert not (tmp_path / "out").exists()


def test_export_of_an_adapter_whose_config_is_cut_short(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "')
    refused_here(capsys, ["export", str(adapter), "--out", str(tmp_path / "merged")],
                 "adapter_config.json: not readable JSON")
    assert not (tmp_path / "merged").exists()


def test_export_out_in_a_symlink_loop(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir),
                                                              "r": 8, "lora_alpha": 16}))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refused_here(capsys, ["export", str(adapter), "--out", str(tmp_path / "loop" / "merged")], "cannot be followed")


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_cards_cannot_be_rewritten_by_a_folder_name_and_name_no_local_path(tiny_model_dir, tmp_path):
    evil = "x\nlicense: evil-injected"
    recipe = load_recipe(SFT, tiny_overrides(tiny_model_dir, tmp_path / "out") + [
        f"data.cache_dir={tmp_path}/cache", f"resume={tmp_path}/out/checkpoint-2", f"train.run_name={tmp_path}/run"])
    # Base and output folders named so no override can spell them; cards show both names.
    recipe = dataclasses.replace(recipe, model=str(tmp_path / evil), output_dir=str(tmp_path / evil))
    cards = [adapter_card(recipe, []), merged_card(evil, str(tmp_path / evil), [])]
    for card in cards:
        assert set(front_matter(card)) == {"base_model", "library_name", "tags"}, card
        assert front_matter(card)["base_model"] == evil
    assert str(tmp_path) not in cards[0]
    shown = public_recipe({"cache_dir": f"{tmp_path}/cache", "model": "mistralai/Mixtral-8x7B-v0.1",
                           "train": {"run_name": f"{tmp_path}/run", "lr_scheduler_type": "cosine"}})
    assert shown == {"cache_dir": "cache", "model": "mistralai/Mixtral-8x7B-v0.1",
                     "train": {"run_name": "run", "lr_scheduler_type": "cosine"}}
