"""Cut a loaded (and PEFT-wrapped) Mixtral along the expert axis for expert parallelism, and put it back
together for saving. How the shards run is in finetune/moe/expert_parallel.py.

Sharding happens after PEFT has made its adapters, on every process alike: each process first builds the
whole model and the same seeded adapter, then keeps its slice, so the local factors are exactly the
one-process factors of its experts. Cut per layer, in place:
- the stacks `gate_up_proj` / `down_proj` [E, out, in] -> [E/N, out, in];
- PEFT's expert factors, in PEFT's layout (finetune/files/adapter_folder.py): `lora_A` [r*E, in] is
  expert-major (rows r*first ..), `lora_B` [out, r*E] expert-minor (columns first.. of each r block).
The experts module then says it has E/N experts, so PEFT's wrappers and the routed kernel see a consistent
smaller layer; `expert_shard` on it tells the kernel to send its rows to their owners.

Saving gathers each sharded tensor to the first process of its EP group, in the same layout, so the adapter
(or a full model) on disk is exactly what one process would save; loading one (a resume) slices it again.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from finetune.files.checkpoint_layout import STACKS
from finetune.moe.expert_lora import route_experts
from finetune.moe.expert_parallel import ExpertShard, expert_parallel_groups, watch_expert_gradients
from finetune.moe.router import moe_blocks


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The fused experts module of every MoE block, in model order (under PEFT's wrappers, if any)."""
    modules = [block.experts for block in moe_blocks(model)]
    return [m.get_base_layer() if hasattr(m, "get_base_layer") else m for m in modules]


def shard_experts(model: nn.Module, size: int) -> dict[str, nn.Parameter]:
    """Keep this process's E/size experts of every layer (see the module docstring). Returns the sharded
    parameters by name: they differ between processes, so data parallelism must leave them alone (each gets
    `average_expert_gradient` instead)."""
    from peft.tuners.lora.layer import ParamWrapper

    modules = expert_modules(model)
    if not modules:
        return {}
    shard = expert_parallel_groups(size, modules[0].num_experts)
    sharded = []
    for experts in modules:
        for name in STACKS:
            sharded.append(_keep(experts, name, shard, 0, 1))
        experts.num_experts = shard.local
        experts.expert_shard = shard
        route_experts(experts)  # the frozen path too (no LoRA, or adapters disabled) sends rows to their owners
    for wrapper in (m for m in model.modules() if isinstance(m, ParamWrapper)):
        experts = wrapper.get_base_layer()
        if getattr(experts, "expert_shard", None) is None:
            continue
        for adapter in wrapper.lora_A:
            a, b = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
            r = a.weight.shape[0] // shard.total
            sharded.append(_keep(a, "weight", shard, 0, r))
            sharded.append(_keep(b, "weight", shard, 1, r))
            a.out_features, b.in_features = a.weight.shape[0], b.weight.shape[1]
    ids = {id(p): p for p in sharded}
    names = {name: p for name, p in model.named_parameters() if id(p) in ids}
    for param in names.values():
        if param.requires_grad:
            watch_expert_gradients(param, shard)
    return names


def _expert_slice(tensor: torch.Tensor, shard: ExpertShard, dim: int, r: int) -> torch.Tensor:
    """This process's experts of a tensor laid out with `r` consecutive entries per expert along `dim`
    (stacks, lora_A: expert-major, r = 1 or rank) or `r` blocks of E along dim 1 (lora_B: expert-minor)."""
    if dim == 0:
        return tensor[shard.first * r:(shard.first + shard.local) * r]
    rows = tensor.shape[0]
    return tensor.reshape(rows, r, shard.total)[:, :, shard.first:shard.first + shard.local].reshape(rows, -1)


def _keep(module: nn.Module, name: str, shard: ExpertShard, dim: int, r: int) -> nn.Parameter:
    """Replace `module.name` by this process's slice of it, and let the module load whole tensors (a checkpoint
    or adapter saved whole) by slicing them the same way first."""
    old = getattr(module, name)
    param = nn.Parameter(_expert_slice(old.detach(), shard, dim, r).clone(), requires_grad=old.requires_grad)
    param.expert_shard, param.expert_layout = shard, (dim, r)
    setattr(module, name, param)
    if not getattr(module, "_loads_whole_experts", False):
        module.register_load_state_dict_pre_hook(_slice_whole_tensors)
        module._loads_whole_experts = True
    return param


def _slice_whole_tensors(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: an incoming tensor of the whole layer's shape becomes this process's slice."""
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        shard = getattr(param, "expert_shard", None)
        if shard is not None and key in state_dict and state_dict[key].shape != param.shape:
            state_dict[key] = _expert_slice(state_dict[key], shard, *param.expert_layout)


def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if getattr(p, "expert_shard", None) is not None}


@contextlib.contextmanager
def gathered_experts(model: nn.Module):
    """Within: every sharded tensor whole (all E experts, the one-process layout) on the first process of each
    EP group, and the experts modules saying E experts again; every process must enter (it gathers)."""
    params = sharded_parameters(model)
    if not params:
        yield
        return
    kept = []
    for param in params.values():
        whole = _gather(param.data.contiguous(), param.expert_shard, *param.expert_layout)
        if whole is not None:
            kept.append((param, param.data))
            param.data = whole
    modules = [m for m in expert_modules(model) if getattr(m, "expert_shard", None) is not None]
    for experts in modules:
        experts.num_experts = experts.expert_shard.total
    try:
        yield
    finally:
        for param, local in kept:
            param.data = local
        for experts in modules:
            experts.num_experts = experts.expert_shard.local


def _gather(local: torch.Tensor, shard: ExpertShard, dim: int, r: int) -> torch.Tensor | None:
    """The whole tensor on the EP group's first process (None elsewhere): the inverse of `_expert_slice`."""
    parts = [torch.empty_like(local) for _ in range(shard.size)] if shard.index == 0 else None
    dist.gather(local, parts, dst=dist.get_global_rank(shard.group, 0), group=shard.group)
    if parts is None:
        return None
    if dim == 0:
        return torch.cat(parts)
    rows = local.shape[0]
    return torch.cat([p.reshape(rows, r, shard.local) for p in parts], dim=2).reshape(rows, -1)
