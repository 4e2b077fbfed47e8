"""fp32 master weights for the trained parameters that are not LoRA factors (the router; with `method: full`,
every trained group), where DeepSpeed does not keep them itself. The forward still computes in bf16.

Why: a bf16 weight cannot take a small update. bf16 keeps 8 significant bits, so an Adam step of lr 1e-4
is below half a bf16 step for any weight above ~0.03 and rounds away: in a bf16 QLoRA or DDP run the router
barely moves (tests/test_master_weights.py measures it). DeepSpeed's bf16 mode keeps an fp32 copy of what
it trains; plain data parallel and QLoRA have nobody doing it. LoRA factors are PEFT's: it already keeps them
in fp32 (`autocast_adapter_dtype`) and casts around them, so they are left alone here.

Why by hand: transformers' `keep_in_fp32_modules` also computes those modules in fp32, which changes the
forward, and `torch.autocast` only casts inside the context a trainer opens around its step, not in
evaluation, generation or a checkpoint's recompute started elsewhere. Here each owning module swaps in a
bf16 view of its fp32 parameters for the length of its own forward (the cast is differentiable, so the
gradient lands on the fp32 parameter in fp32) and puts the parameters back after, even when the forward
raises; outside a forward, `state_dict`, saving and the optimizer see the fp32 parameters.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def keep_fp32_master_weights(model: nn.Module) -> list[str]:
    """Make every trainable non-LoRA parameter held in bf16/fp16 an fp32 parameter whose module still computes
    in the old dtype. Returns the names of the parameters it converted (none in an fp32 model)."""
    converted = []
    for module_name, module in model.named_modules():
        if _is_lora_factor(module_name) or getattr(module, "_fp32_master_weights", None):
            continue
        owned = {name: param.dtype for name, param in module.named_parameters(recurse=False)
                 if param.requires_grad and param.dtype in LOW_PRECISION}
        if not owned:
            continue
        for name in owned:
            module._parameters[name].data = module._parameters[name].data.float()
        module._fp32_master_weights = owned
        module.register_forward_pre_hook(partial(_swap_in_compute_copies, owned))
        module.register_forward_hook(_put_back_masters, always_call=True)
        converted += [f"{module_name}.{name}" if module_name else name for name in owned]
    return converted


def _is_lora_factor(module_name: str) -> bool:
    return ".lora_" in f".{module_name}"


def _swap_in_compute_copies(owned: dict[str, torch.dtype], module: nn.Module, args) -> None:
    masters = {name: module._parameters[name] for name in owned}
    module._fp32_masters_in_forward = masters
    for name, dtype in owned.items():
        # A plain tensor in `_parameters` for the length of the forward: attribute reads return it, and its
        # backward casts the gradient back to fp32 into the master's `.grad`.
        module._parameters[name] = masters[name].to(dtype)


def _put_back_masters(module: nn.Module, args, output) -> None:
    masters = module.__dict__.pop("_fp32_masters_in_forward", None)
    if masters:
        module._parameters.update(masters)
