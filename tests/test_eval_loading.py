"""Evaluation and chat load a model the way a full-size one fits (finetune/evaluation/loading.py): an adapter's
expert LoRA through the routed kernel, and a reference adapter of the same base swapped in, never a second copy
of the base. (`device_map="auto"` placement is CUDA's; the gpu tier and benchmarks/gpu_check.sh run it.)"""

import pytest
import torch

from finetune.evaluation.loading import load_for_eval
from finetune.evaluation.run import reference_logps
from finetune.evaluation.scoring import heldout_loss, preference_logps
from finetune.evaluation.suite import encoded, load_suite
from finetune.moe.expert_lora import _routed_forward
from helpers import make_trainer


def random_adapter(model_dir, folder, seed: int):
    """A PEFT adapter of the tiny model with non-zero LoRA factors on every group (as after training)."""
    _, trainer, _ = make_trainer(model_dir, folder / "run", "lora.init_lora_weights=false", seed=seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    trainer.model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    return [random_adapter(tiny_model_dir, tmp_path_factory.mktemp(f"adapter{seed}"), seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def suite(repo_root):
    import os

    os.chdir(repo_root)
    return load_suite("eval/bundled.yaml", ["limit=6"])


def test_an_adapter_is_evaluated_through_the_routed_kernel_with_peft_s_numbers(adapters, suite, tiny_model_dir):
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    loaded = load_for_eval(adapters[0])
    wrappers = [m for m in loaded.model.modules() if isinstance(m, ParamWrapper)]
    routed = [m for m in wrappers if getattr(m.forward, "__func__", None) is _routed_forward]
    assert len(routed) == 2  # one stack per layer: gate_up and down wrap each other, the outer one routes
    samples = encoded(suite.chat, "sft", loaded, suite)
    ours = heldout_loss(loaded.model, samples, suite.batch_size, progress=False)
    peft_path = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[0]).eval()
    theirs = heldout_loss(peft_path, samples, suite.batch_size, progress=False)
    assert ours["tokens"] == theirs["tokens"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_a_reference_adapter_on_the_same_base_is_swapped_in_not_loaded_again(adapters, suite, monkeypatch):
    from transformers import AutoModelForCausalLM

    policy = load_for_eval(adapters[1])
    samples = encoded(suite.preferences, "dpo", policy, suite)
    before = preference_logps(policy.model, samples, suite.batch_size, "policy", progress=False)
    expected = preference_logps(load_for_eval(adapters[0]).model, samples, suite.batch_size, "alone", progress=False)
    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    what, logps = reference_logps(policy, samples, suite, adapters[0], progress=False)
    assert what == adapters[0] and loads == []  # no second copy of the base
    for got, want in zip(logps, expected):
        assert got == pytest.approx(want, rel=1e-5)
    assert logps[0] != pytest.approx(before[0], rel=1e-3)  # really the other adapter's numbers
    after = preference_logps(policy.model, samples, suite.batch_size, "policy", progress=False)
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(after, before))  # its own adapter is back
    assert list(policy.model.peft_config) == ["default"]


def test_evaluate_plan_places_mixtral_8x7b_on_one_80_gib_gpu_and_the_cpu(repo_root, capsys, monkeypatch):
    from finetune.evaluate import main
    from finetune.planning.evaluation import evaluation_plan

    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["mistralai/Mixtral-8x7B-v0.1", "--suite", "eval/bundled.yaml", "--plan"]) == 0
    out = capsys.readouterr().out
    plan = evaluation_plan("mistralai/Mixtral-8x7B-v0.1", None, 16, 256, 80)
    gib = 2**30
    assert plan.parameters == 46_702_792_704 and plan.weights == 2 * plan.parameters  # 86.99 GiB in bf16
    assert plan.on_gpu == 80 * gib - plan.runtime - plan.batch and plan.on_cpu == plan.weights - plan.on_gpu
    assert f"keeps {plan.on_gpu / gib:.2f} GiB of them on the GPU and {plan.on_cpu / gib:.2f} GiB on the CPU" in out
    assert main(["mistralai/Mixtral-8x7B-v0.1", "--suite", "eval/bundled.yaml", "--plan", "--gpu-memory", "141"]) == 0
    assert "on one 141 GiB GPU: fits" in capsys.readouterr().out


def test_evaluate_plan_counts_an_adapters_base_exactly(adapters, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.planning.evaluation import evaluation_plan

    plan = evaluation_plan(adapters[0], None, 8, 2048, 80)
    assert plan.base == str(tiny_model_dir)
    assert plan.parameters == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert plan.batch == 8 * 2048 * (32000 * 10 + 64 * 2 * 8)  # logits in bf16 + fp32 + log-softmax; activations
