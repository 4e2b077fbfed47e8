"""fp32 master weights (finetune/model/master_weights.py): in a bf16 run without DeepSpeed, the optimizer sees
only fp32 tensors (LoRA, 4-bit LoRA and full fine-tuning), the forward still computes in bf16, and a small
update reaches every router weight instead of rounding away."""

import pytest
import torch

from finetune.moe.router import moe_blocks
from helpers import make_trainer

BF16_STEP = {"bf16": True, "max_steps": 1, "lr_scheduler_type": "constant", "warmup_steps": 0, "learning_rate": 1e-5}


def optimizer_dtypes(trainer) -> set:
    trainer.create_optimizer()
    return {param.dtype for group in trainer.optimizer.param_groups for param in group["params"]}


def router_weights(model) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if ".mlp.gate." in name and param.requires_grad}


def router_logit_dtypes(trainer, encoder) -> set:
    """The dtypes of the router logits one forward produces (the router computes in the model's dtype)."""
    from helpers import CONVERSATION, batch_of

    tap = trainer.router_terms.tap
    with torch.no_grad(), tap.capture():
        trainer.model(**{k: v for k, v in batch_of(encoder, CONVERSATION).items() if k != "labels"})
    return {logits.dtype for logits in tap.take()}


@pytest.mark.parametrize("extra", [[], ["quantization=nf4"]], ids=["bf16-lora", "bf16-4bit-lora"])
def test_router_trains_on_fp32_masters_in_a_bf16_run(tiny_model_dir, tmp_path, extra):
    _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path, *extra, **BF16_STEP)
    assert optimizer_dtypes(trainer) == {torch.float32}
    assert router_logit_dtypes(trainer, encoder) == {torch.bfloat16}
    frozen = {p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad and "embed" in n}
    assert frozen == {torch.bfloat16}  # only what trains gets a master copy
    routers = router_weights(trainer.model)
    assert len(routers) == len(moe_blocks(trainer.model))
    before = {name: param.detach().clone() for name, param in routers.items()}
    trainer.train()
    for name, param in routers.items():
        # Adam's first step moves each weight with a gradient by lr; in bf16 most of them would not move at all.
        moved = (param.detach() - before[name]).abs()
        assert moved.min() > 0.9e-5 and moved.max() < 1.1e-5, name


def test_full_fine_tuning_keeps_fp32_masters_and_computes_in_bf16(tiny_model_dir, tmp_path):
    _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path, "method=full", "lora.r=null", "lora.lora_alpha=null",
                                       **BF16_STEP)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    assert optimizer_dtypes(trainer) == {torch.float32}
    assert router_logit_dtypes(trainer, encoder) == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trained.items()}
    trainer.train()
    expert_stack = next(n for n in trained if n.endswith("experts.down_proj"))
    assert trainer.model.get_parameter(expert_stack).dtype == torch.float32  # the forward put the master back
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trained.items())
