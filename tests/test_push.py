"""Hub push against a real HTTP server on 127.0.0.1 that huggingface_hub talks to."""

import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from finetune.recipe.typed_yaml import parse_yaml
from helpers import assert_refused, run_command, tiny_overrides
from hub_server import HubServer

TOKEN = "hf_test_token_never_written_anywhere"


def folder_files(folder: Path, checkpoints: bool = False) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (checkpoints or not p.relative_to(folder).parts[0].startswith("checkpoint-"))
    }


def run(args, hub, repo_root):
    """A command talking to the loopback Hub with a token (online: the loopback Hub is the only network)."""
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    return run_command(args, repo_root, env, timeout=300)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from finetune.sft import main as sft_main

    out = tmp_path_factory.mktemp("push") / "sft"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, out, max_steps=2,
                                                              save_strategy="steps", save_steps=2)]) == 0
    assert (out / "checkpoint-2").is_dir()
    return out


PUBLIC_COPIES = {"recipe.yaml", "adapter_config.json", "trainer_state.json"}  # pushed with paths made public


def test_push_commits_the_folder_without_this_machines_paths(adapter_dir, repo_root):
    before = folder_files(adapter_dir, checkpoints=True)
    with HubServer() as hub:
        proc = run(["finetune.push", str(adapter_dir), "--repo-id", "org/tiny-sft", "--private",
                    "--revision", "v1", "--base-id", "org/tiny-base"], hub, repo_root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        repo = hub.state.repos["org/tiny-sft"]
        pushed = dict(repo["branches"]["v1"])
    committed = {path: hashlib.sha256(data).hexdigest() for path, data in pushed.items()}
    assert repo["private"] is True
    local = folder_files(adapter_dir)  # training checkpoints left out
    # Every file byte for byte, but the pickled training arguments and the run lock (never pushed) and the
    # public copies.
    never = {"training_args.bin", ".run.lock"}
    assert ".run.lock" in local and set(committed) == set(local) - never and PUBLIC_COPIES <= set(committed)
    assert {p: h for p, h in committed.items() if p not in PUBLIC_COPIES} == \
        {p: h for p, h in local.items() if p not in PUBLIC_COPIES | never}
    # No file names a path of this machine: not the run's folder, the base's, the data's, nor the temp root.
    for path, data in pushed.items():
        for local_path in (adapter_dir.parent, repo_root, Path(tempfile.gettempdir())):
            assert str(local_path).encode() not in data, (path, local_path)
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-base"
    assert parse_yaml(pushed["recipe.yaml"].decode())["output_dir"] == adapter_dir.name
    # The local folder keeps what resume and export read.
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] != "org/tiny-base"
    assert any(a == f"Bearer {TOKEN}" for a in hub.state.authorization)
    assert TOKEN not in proc.stdout + proc.stderr
    assert folder_files(adapter_dir, checkpoints=True) == before
    assert not any(TOKEN.encode() in p.read_bytes() for p in adapter_dir.rglob("*") if p.is_file())


def test_push_of_an_adapter_on_a_local_base_needs_its_hub_id(adapter_dir, repo_root):
    with HubServer() as hub:
        proc = run(["finetune.push", str(adapter_dir), "--repo-id", "org/tiny-sft"], hub, repo_root)
        assert not hub.state.repos  # refused before any request
    assert_refused(proc, "give the base's Hub id with --base-id ORG/NAME")


def test_failing_hub_leaves_folder_intact_and_exits_nonzero(adapter_dir, repo_root):
    before = folder_files(adapter_dir, checkpoints=True)
    with HubServer(fail_with=500) as hub:
        proc = run(["finetune.push", str(adapter_dir), "--repo-id", "org/tiny-sft", "--base-id", "org/b"], hub,
                   repo_root)
    assert proc.returncode == 1
    assert "failed" in proc.stderr and "the local folder is intact" in proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    assert folder_files(adapter_dir, checkpoints=True) == before


def test_model_card_records_the_run(adapter_dir):
    card = (adapter_dir / "README.md").read_text()
    for expected in ("base_model:", "`train.jsonl`", "lora on attention, experts, router", "| router | trainable |",
                     "| load-balancing loss coefficient | 0.1 |", "| router z-loss coefficient | 0.0 |",
                     "| aux_loss |", "| loss |", "kind: sft", "library_name: peft", "PeftModel.from_pretrained"):
        assert expected in card, expected
    # Published cards name inputs without this machine's paths.
    assert str(adapter_dir.parent) not in card and "data/chat" not in card


@pytest.mark.slow  # two trainings, each its own process (about 25 s)
def test_recipe_pushes_at_the_end_of_training(tiny_model_dir, tmp_path, repo_root):
    from finetune.errors import EXIT_PUSH_FAILED

    out = tmp_path / "sft"
    with HubServer() as hub:
        proc = run(["finetune.sft", "recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, out, max_steps=1),
                    "hub.repo_id=org/pushed", "hub.base_id=org/tiny-base"], hub, repo_root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = set(hub.state.repos["org/pushed"]["branches"]["main"])
    assert files == set(folder_files(out)) - {"training_args.bin", ".run.lock"}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "recipe.yaml"} <= files
    with HubServer(fail_with=503) as hub:
        proc = run(["finetune.sft", "recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, tmp_path / "b", max_steps=1),
                    "hub.repo_id=org/pushed", "hub.base_id=org/tiny-base"], hub, repo_root)
    assert proc.returncode == EXIT_PUSH_FAILED and "the local folder is intact" in proc.stderr
    assert "push it later with: python -m finetune.push" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


def test_cards_say_what_the_output_is_for_lora_and_full_fine_tuning(tiny_model_dir, tmp_path):
    from finetune.publish.card import adapter_card
    from finetune.recipe.loading import load_recipe

    overrides = tiny_overrides(tiny_model_dir, tmp_path / "out")
    lora = adapter_card(load_recipe("recipes/tiny/sft.yaml", overrides), [])
    full = adapter_card(load_recipe("recipes/tiny/sft.yaml", overrides + ["method=full", "lora.r=null",
                                                                           "lora.lora_alpha=null"]), [])
    assert "library_name: peft" in lora and "A SFT LoRA adapter for" in lora and "PeftModel" in lora
    assert "(r=8, alpha=16)" in lora
    assert "library_name: transformers" in full and "fully fine-tuned (SFT)" in full
    assert "LoRA" not in full and "PeftModel" not in full and "r=" not in full.split("## Recipe")[0]
    for card in (lora, full):
        assert f"base_model: {tiny_model_dir.name}" in card and str(tmp_path) not in card
