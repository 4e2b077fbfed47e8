"""A 4-bit (NF4) base: its bytes, its logits and LoRA gradients against the dequantized model, learning,
the adapter on the unquantized base, DPO from ln 2, and every refusal before loading."""

import json
import math
import subprocess
import sys

import pytest
import torch

from finetune.model.loading import load_base_model
from finetune.model.lora_targets import make_trainable
from finetune.moe.nf4 import (
    EXPERT_BYTES_PER_WEIGHT,
    LINEAR_BYTES_PER_WEIGHT,
    NF4ExpertStack,
    bitsandbytes,
)
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from helpers import log_history, logged, tiny_overrides

bnb = bitsandbytes()
RECIPE = "recipes/tiny/sft.yaml"


def recipe_for(model_dir, *extra):
    return load_recipe(RECIPE, [f"model={model_dir}", "launch=null", *extra])


def quantized(model_dir, *extra, device="cpu"):
    from finetune.model.quantized import load_quantized_model

    return load_quantized_model(recipe_for(model_dir, "quantization=nf4", *extra), torch.float32, device, progress=False)


def dequantized_twin(quantized_model, model_dir):
    """The unquantized model with every 4-bit weight replaced by its dequantized value."""
    from bitsandbytes.functional import dequantize_4bit

    dense = load_base_model(recipe_for(model_dir), torch.float32).to(quantized_model.device)
    modules = dict(quantized_model.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            twin = modules[name]
            if isinstance(twin, bnb.nn.Linear4bit):
                module.weight.copy_(dequantize_4bit(twin.weight.data, twin.weight.quant_state))
            elif hasattr(module, "gate_up_proj"):
                module.gate_up_proj.copy_(twin.gate_up_proj.dequantize())
                module.down_proj.copy_(twin.down_proj.dequantize())
    return dense


@pytest.fixture(scope="module")
def fused_layout_dir(tiny_model_dir, tmp_path_factory):
    """The same tiny model saved by transformers 5 (fused expert stacks, `mlp.gate`)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("fused") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_expert_weights_take_under_0_30x_their_bf16_bytes_as_the_plan_counts(tiny_model_dir):
    model = quantized(tiny_model_dir)
    stacks = [p for p in model.parameters() if isinstance(p, NF4ExpertStack)]
    assert len(stacks) == 2 * model.config.num_hidden_layers
    stored = sum(s.packed.nbytes + s.absmax.nbytes for s in stacks)
    weights = sum(s.numel() for s in stacks)
    assert stored / (2 * weights) <= 0.30
    assert stored == weights * EXPERT_BYTES_PER_WEIGHT  # what finetune.plan charges per expert weight
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * model.config.num_hidden_layers  # q, k, v, o; the LM head stays dense
    state = [m.weight.quant_state for m in linears]
    linear_bytes = sum(m.weight.data.nbytes + s.absmax.nbytes + s.state2.absmax.nbytes for m, s in zip(linears, state))
    linear_weights = sum(s.shape.numel() for s in state)
    assert linear_bytes == pytest.approx(linear_weights * LINEAR_BYTES_PER_WEIGHT, rel=0.01)
    assert not any(p.requires_grad for p in stacks)


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_logits_equal_the_dequantized_model(tiny_model_dir, fused_layout_dir, layout):
    folder = tiny_model_dir if layout == "original" else fused_layout_dir
    model = quantized(folder)
    dense = dequantized_twin(model, tiny_model_dir)
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-5)
    if layout == "fused":  # either layout quantizes to the very same codes
        original = dict(quantized(tiny_model_dir).named_parameters())
        for name, stack in model.named_parameters():
            if isinstance(stack, NF4ExpertStack):
                assert torch.equal(stack.packed, original[name].packed) and torch.equal(stack.absmax, original[name].absmax)


@pytest.mark.parametrize("evaluated_first", [False, True], ids=["fresh", "after-an-eval-pass"])
def test_lora_gradients_equal_peft_on_the_dequantized_weights(tiny_model_dir, evaluated_first):
    """Every trainable gradient (attention LoRA through bitsandbytes, expert LoRA through the routed 4-bit
    path, the router) equals PEFT's own path on a model holding the dequantized values. After an eval pass
    too: bitsandbytes would otherwise repack its CPU weights for a kernel without backward."""
    torch.manual_seed(0)
    base = quantized(tiny_model_dir, "lora.init_lora_weights=false")
    dense = dequantized_twin(base, tiny_model_dir)
    model = make_trainable(base, recipe_for(tiny_model_dir, "quantization=nf4", "lora.init_lora_weights=false"))
    reference = make_trainable(dense, recipe_for(tiny_model_dir, "lora.expert_kernel=peft", "lora.init_lora_weights=false"))
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    assert not reference.load_state_dict(trained, strict=False).unexpected_keys
    ids = torch.randint(3, 32000, (2, 33), generator=torch.Generator().manual_seed(1))
    if evaluated_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    for m in (model, reference):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and len(got) == 26  # 16 attention, 8 expert, 2 router tensors
    for name in got:
        error = ((got[name] - expected[name]).norm() / expected[name].norm()).item()
        assert error <= 1e-4, (name, error)


@pytest.mark.gpu
def test_on_cuda_logits_and_gradients_equal_the_dequantized_model(tiny_model_dir):
    """bitsandbytes' CUDA kernels (quantize, dequantize, Linear4bit), fp32 so the comparison is exact."""
    model = quantized(tiny_model_dir, "lora.init_lora_weights=false", device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    reference = make_trainable(dequantized_twin(model, tiny_model_dir),
                             recipe_for(tiny_model_dir, "lora.expert_kernel=peft", "lora.init_lora_weights=false"))
    model = make_trainable(model, recipe_for(tiny_model_dir, "quantization=nf4", "lora.init_lora_weights=false"))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k},
                              strict=False)
    ids = torch.randint(3, 32000, (2, 33), generator=torch.Generator().manual_seed(1)).cuda()
    losses = [m(input_ids=ids, labels=ids).loss for m in (model, reference)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for loss in losses:
        loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            error = ((param.grad - expected[name].grad).norm() / expected[name].grad.norm()).item()
            assert error <= 1e-4, (name, error)


def test_backward_keeps_no_dequantized_expert_weight(tiny_model_dir):
    """What autograd saves for backward: never an expert's dequantized matrix (backward rebuilds it)."""
    model = make_trainable(quantized(tiny_model_dir), recipe_for(tiny_model_dir, "quantization=nf4"))
    config = model.config
    expert_shapes = {(2 * config.intermediate_size, config.hidden_size), (config.hidden_size, config.intermediate_size)}
    expert_shapes |= {s[::-1] for s in expert_shapes}
    expert_shapes |= {(config.num_local_experts, *s) for s in expert_shapes}  # a whole dequantized stack
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    ids = torch.randint(3, 32000, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert saved and not expert_shapes & set(saved)


def test_merging_into_the_4bit_stacks_is_refused(tiny_model_dir):
    """Export merges into the unquantized base; PEFT merging expert LoRA into the NF4 codes must not
    silently compute on something that is not the weight."""
    from peft.tuners.lora.layer import ParamWrapper

    model = make_trainable(quantized(tiny_model_dir), recipe_for(tiny_model_dir, "quantization=nf4"))
    wrapper = next(m for m in model.modules() if isinstance(m, ParamWrapper))
    with pytest.raises(NotImplementedError, match="on a 4-bit expert stack"):
        wrapper.merge()


@pytest.mark.parametrize("override, message", [
    ("method=full", "needs method: lora"),
    ("lora.expert_kernel=peft", "needs lora.expert_kernel: routed"),
    ("launch=recipes/accelerate/zero3.yaml", "does not run under DeepSpeed"),
])
def test_impossible_combinations_fail_at_parse_time(override, message, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    extra = ["lora.r=null", "lora.lora_alpha=null"] if override == "method=full" else []
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, ["quantization=nf4", override, *extra])


def test_a_deepspeed_launch_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from finetune.train.preflight import preflight

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    recipe = load_recipe(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path / "out"), "quantization=nf4"])
    with pytest.raises(RecipeError, match="does not run under DeepSpeed"):
        preflight(recipe)


def test_without_bitsandbytes_the_pass_names_the_install_command(tiny_model_dir, tmp_path, repo_root):
    """bitsandbytes made unimportable the way Python itself allows (None in sys.modules)."""
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "out"), "quantization=nf4"]
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from finetune.cli import run_guarded; from finetune.sft import main\n"
            f"sys.exit(run_guarded(main, {[RECIPE, *overrides]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'quantization: nf4 needs bitsandbytes, which is not installed; install it with: pip install -e ".[qlora]"' \
        in proc.stderr
    assert "loading in 4-bit" not in proc.stderr + proc.stdout and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A 4-bit SFT pass, its adapter on the unquantized base, its export, DPO from it


@pytest.fixture(scope="module")
def qlora_sft(tiny_model_dir, tmp_path_factory):
    from finetune.sft import main as sft_main

    out = tmp_path_factory.mktemp("qlora") / "sft"
    overrides = tiny_overrides(tiny_model_dir, out, max_steps=4, learning_rate=0.02)
    assert sft_main([RECIPE, *overrides, "quantization=nf4"]) == 0
    return out


def test_adapter_loads_on_the_unquantized_base_and_exports_verified(qlora_sft, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.cli import run_guarded
    from finetune.export import main as export_main

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, qlora_sft)  # plain PEFT, on the 16/32-bit base
    saved = load_file(qlora_sft / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert "4-bit NF4 copy of the base (QLoRA)" in (qlora_sft / "README.md").read_text()
    assert json.loads((qlora_sft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    capsys.readouterr()
    assert run_guarded(export_main, [str(qlora_sft), "--out", str(tmp_path / "merged")]) == 0
    assert "verification: max |logit difference| merged vs base + adapters" in capsys.readouterr().out
    assert "merged into the original unquantized base" in (tmp_path / "merged" / "README.md").read_text()


def test_dpo_from_a_4bit_base_starts_at_ln2_with_zero_margin(qlora_sft, tiny_model_dir, tmp_path):
    from finetune.dpo import main as dpo_main

    out = tmp_path / "dpo"
    overrides = tiny_overrides(tiny_model_dir, out, max_steps=2, per_device_train_batch_size=4)
    assert dpo_main(["recipes/tiny/dpo.yaml", *overrides, f"dpo.sft_adapter={qlora_sft}", "quantization=nf4"]) == 0
    history = log_history(out)
    first = next(h for h in history if "loss" in h)
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.slow
def test_4bit_sft_learns_within_10_percent_of_full_precision(pretrained_tiny_dir, tmp_path, capsys):
    from finetune.sft import main as sft_main

    def eval_losses(out, *extra):
        overrides = tiny_overrides(pretrained_tiny_dir, out, max_steps=40, learning_rate=3e-3, eval_strategy="steps",
                                   eval_steps=20, eval_on_start=True, per_device_train_batch_size=8)
        assert sft_main([RECIPE, *overrides, *extra]) == 0
        data_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
        return logged(out, "eval_loss"), data_lines[0].split(" in ")[0].split()[-1]

    four_bit, four_bit_data = eval_losses(tmp_path / "nf4", "quantization=nf4")
    full, full_data = eval_losses(tmp_path / "fp32")
    assert four_bit_data == full_data  # both trained and evaluated on the same tokenized samples (one cache folder)
    assert four_bit[-1] < four_bit[0] - 0.5, four_bit  # held-out loss goes down
    assert abs(four_bit[-1] - full[-1]) <= 0.10 * full[-1], (four_bit, full)
