"""Expert parallelism (`expert_parallel: N`): refused where it cannot run, before anything loads; PEFT's expert
factors cut and put back in their own layout; and, over 2 CPU processes (gloo), a step equal to plain data
parallel's, a resumed run's adapter equal to one process's, each rank holding only its experts, and a full-training
step equal to one process's, saved in Mixtral's layout."""

import json
import os
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from finetune.files.adapter_folder import expert_factors
from finetune.moe.expert_parallel import ExpertShard
from finetune.moe.expert_shards import _expert_slice
from finetune.recipe.schema import RecipeError
from finetune.train.launch import check_expert_parallel_runs_here
from finetune.train.preflight import preflight
from helpers import ROOT, assert_same_as_one_process, launch, load_tiny_recipe, log_history, make_trainer, overrides_for

SFT = "recipes/tiny/sft.yaml"
EP_LAUNCH = "recipes/accelerate/cpu_ep.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["expert_parallel=0"], "expert_parallel must be >= 1, got 0"),
    (["expert_parallel=2", "launch=recipes/accelerate/cpu_zero3.yaml"],
     "expert_parallel: 2 runs under plain data parallel, not DeepSpeed (launch=recipes/accelerate/cpu_zero3.yaml)"),
    (["expert_parallel=4", f"launch={EP_LAUNCH}"],
     f"expert_parallel: 4 must divide the processes of {EP_LAUNCH} (num_processes: 2)"),
    (["expert_parallel=2", "quantization=nf4"], "expert_parallel: 2 with quantization: nf4 is not supported"),
    (["expert_parallel=2", "sequence_parallel=2"], "expert_parallel: 2 with sequence_parallel: 2 is not supported"),
    (["expert_parallel=2", "lora.expert_kernel=peft"], "expert_parallel: 2 needs lora.expert_kernel: routed"),
])
def test_impossible_expert_parallel_recipes_fail_at_parse_time(tmp_path, tiny_model_dir, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_tiny_recipe(tmp_path, tiny_model_dir, *overrides)


def test_expert_parallel_is_for_sft(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError, match="expert_parallel: 2 is for SFT only"):
        load_tiny_recipe(tmp_path, tiny_model_dir, "expert_parallel=2", f"dpo.sft_adapter={tmp_path}", path="recipes/tiny/dpo.yaml")


def test_preflight_refuses_experts_that_do_not_split_and_a_single_process(tmp_path, tiny_model_dir, monkeypatch):
    # The tiny model has 4 experts per layer; recipes/accelerate/ep8.yaml starts 8 processes.
    eight = load_tiny_recipe(tmp_path, tiny_model_dir, "expert_parallel=8", "launch=recipes/accelerate/ep8.yaml")
    with pytest.raises(RecipeError, match="expert_parallel: 8 must divide the model's 4 experts per layer"):
        preflight(eight)
    with pytest.raises(RecipeError, match="expert_parallel: 2 needs 2 or a multiple of 2 processes"):
        preflight(load_tiny_recipe(tmp_path, tiny_model_dir, "expert_parallel=2", "launch=null"))
    # Under `accelerate launch` (the environment it sets).
    launched = load_tiny_recipe(tmp_path, tiny_model_dir, "expert_parallel=2", "launch=null")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(RecipeError, match="expert_parallel: 2 must divide the 3 launched processes"):
        check_expert_parallel_runs_here(launched, experts=4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_expert_parallel_runs_here(launched, experts=4)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="runs under plain data parallel, not DeepSpeed"):
        check_expert_parallel_runs_here(launched, experts=4)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_shard_of_peft_factors_holds_exactly_its_experts(index):
    """PEFT's A is expert-major and B expert-minor (finetune/files/adapter_folder.py): the slice of each that a
    process keeps must be, expert for expert, the factors of the experts it owns."""
    experts, r, inputs, outputs = 6, 3, 5, 7
    a, b = torch.randn(r * experts, inputs), torch.randn(outputs, r * experts)
    shard = ExpertShard(total=experts, size=3, index=index)
    local_a, local_b = _expert_slice(a, shard, 0, r), _expert_slice(b, shard, 1, r)
    assert local_a.shape == (r * 2, inputs) and local_b.shape == (outputs, r * 2)
    whole_a, whole_b = expert_factors(a, b, experts)
    got_a, got_b = expert_factors(local_a, local_b, shard.local)
    owned = slice(shard.first, shard.first + shard.local)
    assert torch.equal(got_a, whole_a[owned]) and torch.equal(got_b, whole_b[owned])


def test_an_expert_parallel_checkpoint_needs_every_process_optimizer_state(tmp_path):
    from finetune.train.checkpoints import checkpoint_problem

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "expert_optimizer_0.pt"):
        torch.save({}, folder / name)
    (folder / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # an empty one
    assert checkpoint_problem(folder) is None  # without expert parallelism, complete
    assert checkpoint_problem(folder, expert_parallel=True) == "no expert_optimizer_1.pt"
    torch.save({}, folder / "expert_optimizer_1.pt")
    assert checkpoint_problem(folder, expert_parallel=True) is None


def launch_sft(out, data, model_dir, *extra, **train):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["accelerate", "launch", "--config_file", EP_LAUNCH, "-m", "finetune.sft", SFT,
               *overrides_for(model_dir, out, data, *extra, **train)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.distributed
def test_one_expert_parallel_step_equals_data_parallel(tiny_model_dir, four_rows, tmp_path):
    """Over the same 2 processes and batches, EP=2 (each holds 2 of 4 experts) and plain DDP (each holds all 4)
    take the same SGD step at lr 1 with no clipping: the adapter's change is minus the gradient, so every LoRA
    tensor's and the router's gradient agree to 1e-4, and the losses (router losses on) to 1e-5."""
    from finetune.sft import main as sft_main

    common = ["lora.init_lora_weights=false", "moe.z_loss_coef=0.001", "train.optim=sgd", "train.max_grad_norm=0",
              "train.weight_decay=0"]
    proc = launch_sft(tmp_path / "ep", four_rows, tiny_model_dir, *common, "expert_parallel=2", max_steps=1,
                      learning_rate=1.0, per_device_train_batch_size=2)
    assert "expert parallel: each process holds 2 of the 4 experts of every layer (this one experts 0-1;" in proc.stdout
    launch_sft(tmp_path / "ddp", four_rows, tiny_model_dir, *common, max_steps=1, learning_rate=1.0,
               per_device_train_batch_size=2)
    assert sft_main([SFT, *overrides_for(tiny_model_dir, tmp_path / "start", four_rows, *common, max_steps=1,
                                         learning_rate=0.0, per_device_train_batch_size=4)]) == 0
    adapters = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("ep", "ddp", "start")}
    assert adapters["ep"].keys() == adapters["ddp"].keys()
    assert any(".mlp.gate." in key for key in adapters["ep"]) and any(".experts.lora_B" in key for key in adapters["ep"])
    for key, start in adapters["start"].items():
        expected, got = start - adapters["ddp"][key], start - adapters["ep"][key]  # lr x gradient
        assert expected.abs().max() > 0, key
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), key
    for name in ("loss", "aux_loss", "z_loss", "grad_norm"):  # the logged norm: over all experts, not rank 0's
        ep, ddp = log_history(tmp_path / "ep")[0][name], log_history(tmp_path / "ddp")[0][name]
        assert ep == pytest.approx(ddp, rel=1e-5), name


EP_COMMON = ["moe.aux_loss_coef=0", "expert_parallel=2", "train.save_strategy=steps", "train.save_steps=2"]


@pytest.fixture(scope="module")
def ep_resumed(tiny_model_dir, four_rows, tmp_path_factory):
    """3 AdamW steps with EP=2 (router losses off: a per-rank mean, not additive over ranks), stopped after step 2
    with a checkpoint and run again, as a user continues a run; each rank reports what it holds
    (tests/zero3_driver.py)."""
    out = tmp_path_factory.mktemp("ep") / "resumed"
    overrides = [o for o in overrides_for(tiny_model_dir, out, four_rows, *EP_COMMON, per_device_train_batch_size=2)
                 if o != "resume=never"]
    launch("sft", SFT, [*overrides, "stop_after_steps=2"], config=EP_LAUNCH)
    launch("sft", SFT, overrides, config=EP_LAUNCH)
    return out


@pytest.mark.distributed
def test_expert_parallel_resumed_adapter_equals_one_process(ep_resumed, tiny_model_dir, four_rows, tmp_path):
    """The saved adapter and every step's loss equal one process's uninterrupted run with the same global batch.
    Step 3 after the resume needs each process's AdamW state of its own experts (expert_optimizer_{rank}.pt), not
    the main process's, and the whole saved adapter sliced back into each process's experts."""
    assert sorted(p.name for p in (ep_resumed / "checkpoint-2").glob("expert_optimizer_*")) == [
        "expert_optimizer_0.pt", "expert_optimizer_1.pt"]
    assert [h["step"] for h in log_history(ep_resumed) if "loss" in h] == [1, 2, 3]
    assert_same_as_one_process(ep_resumed, tiny_model_dir, four_rows, ["moe.aux_loss_coef=0"], tmp_path / "single")


@pytest.mark.distributed
def test_each_rank_holds_only_its_half_of_the_experts(ep_resumed, tiny_model_dir, tmp_path):
    reports = [json.loads((ep_resumed / f"rank{r}.json").read_text()) for r in (0, 1)]
    _, one_process, _ = make_trainer(tiny_model_dir, tmp_path / "whole")
    whole = dict(one_process.model.named_parameters())
    for rank, report in enumerate(reports):
        shards = report["expert_shards"]
        assert len(shards) == 2 * 2 + 2 * 4  # 2 layers x (2 stacks + A and B of 2 stacks)
        for name, (numel, total) in shards.items():
            assert numel * 2 == whole[name].numel(), name
            if name.endswith(("gate_up_proj", "down_proj")):  # frozen under LoRA: the base's own experts
                mine = whole[name][2 * rank:2 * rank + 2]
                assert total == pytest.approx(mine.double().sum().item(), rel=1e-9), (rank, name)
        held = sum(p.numel() for p in whole.values()) - sum(numel for numel, _ in shards.values())
        assert report["parameters"] == held


@pytest.mark.distributed
def test_full_training_under_expert_parallel_equals_one_process_in_mixtral_layout(tiny_model_dir, four_rows, tmp_path):
    """Every weight trains (experts included, through the routed kernel's weight gradient), and the gradients are
    clipped to a norm they exceed: one norm over all experts, the same on both processes. One SGD step at lr 1:
    the change of every weight, each expert of each process's share, equals one process's with the same global
    batch to 1e-4 (plus the saved fp32 weights' own rounding; router losses off: a per-rank mean); the saved model
    has Mixtral's own layout."""
    from transformers import AutoModelForCausalLM

    from finetune.model.tiny import checkpoint_keys
    from finetune.sft import main as sft_main

    common = ["method=full", "lora.r=null", "lora.lora_alpha=null", "trainable=[attention,experts,router]",
              "train.gradient_checkpointing=false", "train.optim=sgd", "train.max_grad_norm=0.05",
              "train.weight_decay=0", "moe.aux_loss_coef=0"]
    launch_sft(tmp_path / "ep", four_rows, tiny_model_dir, *common, "expert_parallel=2", max_steps=1,
               learning_rate=1.0, per_device_train_batch_size=2)
    assert sft_main([SFT, *overrides_for(tiny_model_dir, tmp_path / "one", four_rows, *common, max_steps=1,
                                         learning_rate=1.0, per_device_train_batch_size=4)]) == 0
    assert set(checkpoint_keys(tmp_path / "ep")) == set(checkpoint_keys(tiny_model_dir))  # Mixtral's own layout
    assert log_history(tmp_path / "ep")[0]["grad_norm"] > 0.05  # clipping took part
    ep = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ep").named_parameters())
    one = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "one").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    moved = 0
    for name, start in base.items():
        expected, got = start - one[name], start - ep[name]
        rounding = 4 * torch.finfo(start.dtype).eps * start.abs().max()  # the saved weights', not the step's
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() + rounding, name
        moved += bool(expected.abs().max() > 0)
    assert moved == 2 * (4 + 1 + 2)  # per layer: q, k, v, o, the router and both expert stacks
    assert log_history(tmp_path / "ep")[0]["loss"] == pytest.approx(log_history(tmp_path / "one")[0]["loss"], rel=1e-5)


def test_expert_parallel_launch_files_are_plain_data_parallel():
    from finetune.recipe.launch_file import launch_processes, uses_deepspeed

    for name, processes in (("ep8.yaml", 8), ("ep_multinode.yaml", 16), ("cpu_ep.yaml", 2)):
        path = ROOT / "recipes" / "accelerate" / name
        assert not uses_deepspeed(path) and launch_processes(path) == processes, name
