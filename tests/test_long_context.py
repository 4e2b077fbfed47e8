"""Long-context settings refused where they cannot run, before anything loads: sequence parallelism
(`sequence_parallel`, DeepSpeed Ulysses) and TRL's activation offloading; and what accelerate receives.
The 2-process sequence-parallel step itself: tests/test_distributed.py."""

import re

import pytest
import torch

from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from finetune.train.arguments import trainer_args
from finetune.train.launch import check_sequence_parallel_runs_here
from finetune.train.preflight import preflight
from helpers import load_tiny_recipe, tiny_overrides

SFT = "recipes/tiny/sft.yaml"


def test_accelerate_receives_a_deepspeed_ulysses_config(tmp_path, tiny_model_dir):
    args = trainer_args(load_tiny_recipe(tmp_path, tiny_model_dir, "sequence_parallel=2",
                               "launch=recipes/accelerate/cpu_zero3.yaml"))
    config = args.parallelism_config
    assert (config.sp_backend, config.sp_size, config.sp_enabled) == ("deepspeed", 2, True)
    assert config.sp_handler.sp_seq_length_is_variable and config.sp_handler.sp_attn_implementation == "sdpa"
    assert trainer_args(load_tiny_recipe(tmp_path, tiny_model_dir)).parallelism_config is None  # off by default


@pytest.mark.parametrize("overrides, message", [
    (["sequence_parallel=2", "launch=recipes/accelerate/single.yaml"], "sequence_parallel: 2 runs under DeepSpeed"),
    (["sequence_parallel=4", "launch=recipes/accelerate/cpu_zero3.yaml"],
     "sequence_parallel: 4 must divide the processes of recipes/accelerate/cpu_zero3.yaml (num_processes: 2)"),
    (["sequence_parallel=0"], "sequence_parallel must be >= 1"),
    (["train.parallelism_config={sp_size: 2}"], "use sequence_parallel"),
])
def test_impossible_sequence_parallel_recipes_fail_at_parse_time(tmp_path, tiny_model_dir, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_tiny_recipe(tmp_path, tiny_model_dir, *overrides)


def test_sequence_parallel_is_for_sft(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError, match="sequence_parallel is for SFT; DPO keeps each pair whole"):
        load_tiny_recipe(tmp_path, tiny_model_dir, "sequence_parallel=2", "launch=recipes/accelerate/cpu_zero3.yaml",
               f"dpo.sft_adapter={tmp_path}", path="recipes/tiny/dpo.yaml")


def test_preflight_refuses_heads_that_do_not_split_and_a_run_without_deepspeed(tmp_path, tiny_model_dir, monkeypatch):
    # The tiny model has 4 attention heads; recipes/accelerate/zero3.yaml has 8 processes.
    eight = load_tiny_recipe(tmp_path, tiny_model_dir, "sequence_parallel=8", "launch=recipes/accelerate/zero3.yaml")
    with pytest.raises(RecipeError, match="sequence_parallel: 8 must divide the model's 4 attention heads"):
        preflight(eight)
    # No launch in the recipe and not under `accelerate launch`: nothing would bring DeepSpeed.
    with pytest.raises(RecipeError, match="runs under DeepSpeed"):
        preflight(load_tiny_recipe(tmp_path, tiny_model_dir, "sequence_parallel=2", "launch=null"))
    # Under `accelerate launch` (the environment it sets; preflight's part that reads it, alone: TRL's
    # arguments would start the process group).
    launched = load_tiny_recipe(tmp_path, tiny_model_dir, "sequence_parallel=2", "launch=null")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)  # e.g. plain DDP
    with pytest.raises(RecipeError, match="runs under DeepSpeed"):
        check_sequence_parallel_runs_here(launched, heads=4)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_sequence_parallel_runs_here(launched, heads=4)  # what the 2-process test launches
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RecipeError, match="must divide the 3 launched processes"):
        check_sequence_parallel_runs_here(launched, heads=4)


def test_activation_offloading_is_refused_on_the_cpu(tmp_path, tiny_model_dir):  # device: cpu, on any machine
    with pytest.raises(RecipeError, match="train.activation_offloading moves activations from GPU to CPU memory"):
        preflight(load_tiny_recipe(tmp_path, tiny_model_dir, "train.activation_offloading=true", "launch=null"))


@pytest.mark.gpu
def test_activation_offloading_trains_one_step_on_a_gpu_as_without(tmp_path, tiny_model_dir):
    from trl.models.activation_offloading import OffloadActivations

    from finetune.sft import build

    losses, trained = {}, {}
    for offloading in (True, False):
        overrides = tiny_overrides(tiny_model_dir, tmp_path / str(offloading), max_steps=1, lr_scheduler_type="constant",
                                   warmup_steps=0, learning_rate=1e-3)
        trainer, _ = build(load_recipe(SFT, [*overrides, "device=cuda",
                                             f"train.activation_offloading={str(offloading).lower()}"]))
        # The trainer really runs its steps inside TRL's offloading context (and only when asked).
        assert isinstance(trainer.maybe_activation_offload_context, OffloadActivations) is offloading
        losses[offloading] = trainer.train().training_loss
        trained[offloading] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    # The step itself: every trained tensor (the routed expert LoRA's, whose backward builds a small graph of its
    # own, included) moved the same way with and without offloading.
    assert trained[True].keys() == trained[False].keys()
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=1e-5, atol=1e-6, msg=name)
