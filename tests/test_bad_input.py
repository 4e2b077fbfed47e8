"""Bad input through the command line: a non-zero exit, one `error:` line naming the input, no traceback,
no secret in any file written; and `finetune.check` refuses exactly what `finetune.sft` does. The recipe
cases run the command's entry in this process; the rest start the real process."""

import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from finetune.sft import main as sft_main
from helpers import assert_refused, log_history, logged, run_command, run_here, tiny_overrides

pytestmark = pytest.mark.slow
SECRET = "hf_abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """The folders and files the cases point at."""
    root = tmp_path_factory.mktemp("bad-input")
    adapter = root / "adapter"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, adapter, max_steps=1)]) == 0
    old_run = root / "old-run"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, old_run, max_steps=1,
                                                              save_strategy="steps", save_steps=1)]) == 0
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("hello")
    (root / "data-folder").mkdir()
    (root / "fake.parquet").write_text('{"messages": []}\n')
    half_adapter = root / "half-adapter"
    half_adapter.mkdir()
    shutil.copy(adapter / "adapter_config.json", half_adapter)
    orphan = root / "orphan-adapter"
    shutil.copytree(adapter, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(root / "gone")}))
    no_config = root / "base-without-config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    return {"root": root, "base": tiny_model_dir, "adapter": adapter, "old_run": old_run, "half_adapter": half_adapter,
            "orphan": orphan, "no_config": no_config, "foreign": foreign}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free now, and nothing listens on it


# (case, overrides, text the error line must contain). Each runs through both `check` and `sft`.
RECIPE_CASES = [
    ("hub token", ["train.hub_token=" + SECRET], "train.hub_token holds "),
    ("api key", ["train.api_key=abc"], "train.api_key holds a secret"),
    ("token as a value", ["train.run_name=" + SECRET], "train.run_name holds what looks like a secret"),
    ("unknown scheduler", ["train.lr_scheduler_type=foo"], "train.lr_scheduler_type must be one of linear"),
    ("negative learning rate", ["train.learning_rate=-0.001"], "train.learning_rate must be >= 0"),
    ("zero batch", ["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size must be >= 1"),
    ("zero accumulation", ["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be >= 1"),
    ("model not a model", ["model={root}/not-a-model"], "model={root}/not-a-model: not a model folder (no config.json)"),
    ("model is an adapter", ["model={adapter}"], "it is a LoRA adapter, give its base model"),
    ("model missing", ["model={root}/absent"], "python -m finetune.tiny"),
    ("model offline Hub id", ["model=someorg/somemodel"], "model=someorg/somemodel: no such folder"),
    ("train is a number", ["train=5"], "train must be a mapping"),
    ("train is a list", ["train=[1, 2]"], "train must be a mapping"),
    ("override not YAML", ["train.max_steps=[1"], "override 'train.max_steps=[1': the value is not valid YAML"),
    ("unknown group", ["trainable=[nonexistent]"], "trainable must be a list, each item one of 'attention'"),
    ("data is a folder", ["data.train=[{{path: {root}/data-folder}}]"], "data-folder: is a folder"),
    ("not parquet", ["data.train=[{{path: {root}/fake.parquet}}]"], "fake.parquet: not a readable parquet file"),
    ("output_dir is the model", ["output_dir={base}"], "it is the model"),
    ("output_dir is foreign", ["output_dir={foreign}"], "holds no run of this toolkit"),
    ("old checkpoints with resume=never", ["output_dir={old_run}", "resume=never"], "use resume=restart"),
    ("unknown key", ["colour=blue"], "unknown key 'colour'"),
]


def recipe_args(case_overrides: list[str], inputs, out: Path) -> list[str]:
    base = [f"model={inputs['base']}", f"output_dir={out}", "train.max_steps=1", "train.eval_strategy=no",
            "train.save_strategy=no", "launch=null"]
    return ["recipes/tiny/sft.yaml", *base, *(o.format(**inputs) for o in case_overrides)]


@pytest.mark.parametrize("case, overrides, expected", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_check_and_sft_refuse_the_same_recipe_the_same_way(case, overrides, expected, inputs, repo_root, capsys):
    out = inputs["root"] / f"out-{case.replace(' ', '-')}"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    args = recipe_args(overrides, inputs, out)
    # In this process (the same code as the console script, without seconds of imports per case); the Hub
    # case in a process of its own, where HF_HUB_OFFLINE is set before huggingface_hub reads it.
    if case == "model offline Hub id":
        run = lambda command: run_command([f"finetune.{command}", *args], repo_root)  # noqa: E731
    else:
        run = lambda command: run_here(capsys, [command, *args])  # noqa: E731
    checked = assert_refused(run("check"), expected.format(**inputs))
    trained = assert_refused(run("sft"), expected.format(**inputs))
    assert checked == trained
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing written
    if case == "unknown key":
        assert "'source'" not in checked


def test_check_and_sft_accept_the_same_recipe(inputs, repo_root):
    out = inputs["root"] / "out-good"
    args = recipe_args([], inputs, out)
    checked, trained = (run_command([module, *args], repo_root) for module in ("finetune.check", "finetune.sft"))
    assert checked.returncode == 0 and trained.returncode == 0, checked.stderr[-3000:] + trained.stderr[-3000:]
    # The same recipe resolved to the same data: the check's sample count is the one the pass trains on, from
    # the cache folder the check built (the pass opens it instead of tokenizing again).
    samples = re.search(r"rows +\d+ read, (\d+) train samples", checked.stdout).group(1)
    cache = re.search(r"data cache (\S+) \(", checked.stdout).group(1)
    assert f"data: opened the cache {cache} in" in trained.stdout and f"({samples} train samples)" in trained.stdout
    assert "SFT adapter written to" in trained.stdout and (out / "adapter_model.safetensors").is_file()


def test_no_secret_and_no_machine_path_is_written(inputs, repo_root, tmp_path):
    """A token in the environment never reaches an output file; cards name inputs without this machine's paths."""
    out = inputs["root"] / "out-secret"
    proc = run_command(["finetune.sft", *recipe_args(["train.hub_token=" + SECRET], inputs, out)], repo_root)
    assert_refused(proc, "train.hub_token holds ")
    env = {"HF_TOKEN": SECRET}
    proc = run_command(["finetune.sft", *recipe_args([], inputs, out)], repo_root, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "merged"
    proc = run_command(["finetune.export", str(out), "--out", str(merged)], repo_root, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in (out, merged):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    for card in (out / "README.md", merged / "README.md"):
        text = card.read_text()
        assert str(inputs["root"]) not in text and str(repo_root) not in text, card
        assert f"base_model: {inputs['base'].name}" in text


@pytest.mark.parametrize("args, expected", [
    (["--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--gpus", "-2"], "--gpus must be >= 1, got -2"),
    (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    (["--gpu-memory", "-5"], "--gpu-memory -5: give a number above 0"),
    (["--gpu-memory", "nan"], "--gpu-memory nan: give a finite number"),
    (["--gpus", "0", "--zero", "3"], "--gpus must be >= 1, got 0"),
])
def test_plan_refuses_impossible_setups(args, expected, inputs, repo_root):
    assert_refused(run_command(["finetune.plan", "recipes/tiny/sft.yaml", f"model={inputs['base']}", *args], repo_root), expected)


@pytest.mark.parametrize("entry", ["module", "command"])
@pytest.mark.parametrize("case", ["adapter without weights", "base without config"])
def test_export_refuses_incomplete_folders_from_both_entry_points(entry, case, inputs, repo_root, tmp_path):
    adapter, base = {"adapter without weights": (inputs["half_adapter"], inputs["base"]),
                     "base without config": (inputs["adapter"], inputs["no_config"])}[case]
    expected = {"adapter without weights": "half-adapter: no adapter_model.safetensors",
                "base without config": "base-without-config: no config.json"}[case]
    program = "finetune.export" if entry == "module" else "finetune"
    args = [program] + (["export"] if entry == "command" else [])
    proc = run_command([*args, str(adapter), "--base", str(base), "--out", str(tmp_path / "merged")], repo_root)
    assert_refused(proc, expected)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", ["missing", "offline Hub id", "orphan adapter", "not a model"])
def test_evaluate_refuses_unloadable_models_before_writing(case, inputs, repo_root, tmp_path):
    model, expected = {"missing": (str(inputs["root"] / "absent"), "absent: no such folder"),
                       "offline Hub id": ("someorg/somemodel", "model=someorg/somemodel: no such folder"),
                       "orphan adapter": (str(inputs["orphan"]), "its recorded base model"),
                       "not a model": (str(inputs["root"] / "not-a-model"), "not-a-model: not a model folder")}[case]
    out = tmp_path / "eval"
    assert_refused(run_command(["finetune.evaluate", model, "--suite", "eval/bundled.yaml", "--out", str(out)], repo_root),
                   expected)
    assert not out.exists()


def test_push_to_an_unreachable_hub_is_one_line(inputs, repo_root):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}
    before = sorted(p.name for p in inputs["adapter"].iterdir())
    proc = run_command(["finetune.push", str(inputs["adapter"]), "--repo-id", "me/tiny", "--base-id", "me/base"],
                       repo_root, env)
    assert_refused(proc, f"upload of {inputs['adapter']} to me/tiny at http://127.0.0.1", code=1)
    assert SECRET not in proc.stdout + proc.stderr
    assert sorted(p.name for p in inputs["adapter"].iterdir()) == before


def test_training_whose_push_fails_keeps_its_outputs_and_exits_3(inputs, repo_root):
    from finetune.errors import EXIT_PUSH_FAILED

    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}
    out = inputs["root"] / "out-push"
    proc = run_command(["finetune.sft", *recipe_args(["hub.repo_id=me/tiny", "hub.base_id=me/base"], inputs, out)],
                       repo_root, env)
    assert_refused(proc, f"push it later with: python -m finetune.push {out} --repo-id me/tiny --base-id me/base",
                   code=EXIT_PUSH_FAILED)
    # Nothing lost: the finished run is all there, trained to the end, and loads as a PEFT adapter.
    from peft import PeftConfig
    from safetensors.torch import load_file

    assert logged(out, "loss") and log_history(out)[-1]["step"] == 1  # recipe_args: train.max_steps=1
    assert PeftConfig.from_pretrained(str(out)).r == 8 and load_file(out / "adapter_model.safetensors")
    assert "hub:\n  repo_id: me/tiny" in (out / "recipe.yaml").read_text() and (out / "README.md").is_file()


def test_demo_and_tiny_refuse_a_foreign_folder(inputs, repo_root):
    foreign = inputs["foreign"]
    assert_refused(run_command(["finetune.demo", "--out", str(foreign)], repo_root), "was not written by the demo")
    assert_refused(run_command(["finetune", "tiny", str(foreign), "--pretrain-steps", "0"], repo_root),
                   "exists and is not empty (thesis.tex)")
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
