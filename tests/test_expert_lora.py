"""Expert LoRA on the routed tokens gives PEFT's outputs and gradients, with PEFT's parameters and format."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model

from finetune.model.tiny import tiny_config
from finetune.moe.expert_lora import _routed_forward, use_routed_expert_lora
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from helpers import tiny_overrides

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def uses_routed_expert_lora(model) -> bool:
    """Whether any PEFT expert wrapper of `model` runs our routed forward."""
    return any(getattr(m.forward, "__func__", None) is _routed_forward for m in model.modules())


def moe_layer(hidden, intermediate, experts, top_k, dtype=torch.float32, seed=0):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = tiny_config(hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    layer = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.05)
    layer = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERT_PARAMS, target_modules=[]),
                                    layer.requires_grad_(False))
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # as after training: B = 0 would hide half the maths
    return layer.to(dtype)


def run(layer, x, grad, route=None):
    """Forward + backward; `route` = (top_k_index, top_k_weights) calls the experts directly."""
    x = x.clone().requires_grad_()
    out = layer.experts(x, *route) if route else layer(x)
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_same(a, b, rtol=1e-5):
    for left, right in zip(a[:2], b[:2]):
        torch.testing.assert_close(left, right, rtol=rtol, atol=rtol * left.abs().max().item())
    assert a[2].keys() == b[2].keys() and len(a[2]) == 4  # lora_A and lora_B of gate_up and down
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=rtol * a[2][name].abs().max().item())


@pytest.mark.parametrize("hidden,intermediate,experts,top_k,tokens", [
    (32, 48, 4, 2, 7),
    (64, 96, 8, 2, 64),
    (48, 80, 8, 3, 33),
    (16, 24, 4, 1, 5),
])
def test_matches_peft_outputs_and_gradients(hidden, intermediate, experts, top_k, tokens):
    peft_layer = moe_layer(hidden, intermediate, experts, top_k)
    ours = copy.deepcopy(peft_layer)
    assert use_routed_expert_lora(ours) == 1
    torch.manual_seed(1)
    x, grad = torch.randn(2, tokens, hidden), torch.randn(2, tokens, hidden)
    assert_same(run(peft_layer, x, grad), run(ours, x, grad))


def test_experts_without_tokens_and_repeated_hits():
    peft_layer = moe_layer(32, 48, 8, 2)
    ours = copy.deepcopy(peft_layer)
    use_routed_expert_lora(ours)
    torch.manual_seed(2)
    x, grad = torch.randn(10, 32), torch.randn(10, 32)
    # Only experts 1, 5 and 6 receive tokens; token 0 picks expert 5 twice.
    index = torch.tensor([[5, 5]] + [[1, 6], [6, 1]] * 4 + [[5, 1]])
    weights = torch.softmax(torch.randn(10, 2), -1)
    peft_result, our_result = run(peft_layer, x, grad, (index, weights)), run(ours, x, grad, (index, weights))
    assert_same(peft_result, our_result)
    a_grad = next(g for n, g in our_result[2].items() if "base_layer.lora_A" in n).reshape(8, 4, -1)
    assert a_grad[[0, 2, 3, 4, 7]].abs().max() == 0 and a_grad[[1, 5, 6]].abs().min(-1).values.max() > 0


def test_bf16_close_to_peft():
    peft_layer = moe_layer(64, 96, 8, 2, dtype=torch.bfloat16)
    ours = copy.deepcopy(peft_layer)
    use_routed_expert_lora(ours)
    torch.manual_seed(3)
    x, grad = torch.randn(1, 40, 64, dtype=torch.bfloat16), torch.randn(1, 40, 64, dtype=torch.bfloat16)
    peft_out, peft_x, peft_grads = run(peft_layer, x, grad)
    our_out, our_x, our_grads = run(ours, x, grad)
    torch.testing.assert_close(our_out.float(), peft_out.float(), rtol=3e-2, atol=3e-2 * peft_out.abs().max().item())
    torch.testing.assert_close(our_x.float(), peft_x.float(), rtol=3e-2, atol=3e-2 * peft_x.abs().max().item())
    # The LoRA factors' gradients too (what training updates): the same 4 tensors, in bf16, close to PEFT's.
    assert our_grads.keys() == peft_grads.keys() and len(our_grads) == 4
    for name, expected in peft_grads.items():
        assert our_grads[name].dtype == torch.bfloat16, name
        torch.testing.assert_close(our_grads[name].float(), expected.float(), rtol=3e-2,
                                   atol=3e-2 * expected.abs().max().item())


def tiny_peft_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERT_PARAMS, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def test_whole_model_with_gradient_checkpointing(tiny_model_dir):
    peft_model = tiny_peft_model(tiny_model_dir)
    ours = copy.deepcopy(peft_model)
    assert use_routed_expert_lora(ours) == 2 and uses_routed_expert_lora(ours)
    ids = torch.randint(3, 32000, (2, 24))
    results = []
    for model in (peft_model, ours):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


def test_adapters_keep_peft_format_both_ways(tiny_model_dir, tmp_path):
    """Ours saves a plain PEFT adapter; a PEFT adapter loads into ours; disabling the adapter gives the base."""
    from transformers import AutoModelForCausalLM

    ours = tiny_peft_model(tiny_model_dir)
    use_routed_expert_lora(ours)
    ours.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 32000, (1, 16))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert not uses_routed_expert_lora(plain)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        use_routed_expert_lora(plain)  # a PEFT-loaded adapter through our path
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        with plain.disable_adapter():
            torch.testing.assert_close(plain(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
        assert (expected - base).abs().max() > 1e-3


def test_recipe_switch(tiny_model_dir, tmp_path):
    
    from finetune.model.loading import load_base_model
    from finetune.model.lora_targets import make_trainable

    for kernel, routed in (("routed", True), ("peft", False)):
        recipe = load_recipe("recipes/tiny/sft.yaml", tiny_overrides(tiny_model_dir, tmp_path) + [f"lora.expert_kernel={kernel}"])
        assert uses_routed_expert_lora(make_trainable(load_base_model(recipe), recipe)) is routed
    with pytest.raises(RecipeError, match="lora.expert_kernel must be one of"):
        load_recipe("recipes/tiny/sft.yaml", tiny_overrides(tiny_model_dir, tmp_path) + ["lora.expert_kernel=fast"])
