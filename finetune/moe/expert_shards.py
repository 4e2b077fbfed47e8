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
(or a full model) on disk is exactly what one process would save.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from finetune.moe.expert_lora import route_experts
from finetune.moe.expert_parallel import ExpertShard, expert_parallel_groups, watch_expert_gradients

STACKS = ("gate_up_proj", "down_proj")


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The fused experts modules (transformers 5's MixtralExperts), in model order."""
    return [m for m in model.modules()
            if all(isinstance(getattr(m, name, None), torch.Tensor) and getattr(m, name).dim() == 3 for name in STACKS)
            and hasattr(m, "num_experts")]


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
            sharded.append(_keep(experts, name, _expert_slice(getattr(experts, name), shard, 0, 1)))
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
            sharded.append(_keep(a, "weight", _expert_slice(a.weight, shard, 0, r)))
            sharded.append(_keep(b, "weight", _expert_slice(b.weight, shard, 1, r)))
            a.out_features, b.in_features = a.weight.shape[0], b.weight.shape[1]
    ids = {id(p): p for p in sharded}
    names = {name: p for name, p in model.named_parameters() if id(p) in ids}
    for param in names.values():
        param.expert_shard = shard
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


def _keep(module: nn.Module, name: str, part: torch.Tensor) -> nn.Parameter:
    old = getattr(module, name)
    param = nn.Parameter(part.detach().clone(), requires_grad=old.requires_grad)
    setattr(module, name, param)
    return param


def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if getattr(p, "expert_shard", None) is not None}


@contextlib.contextmanager
def gathered_experts(model: nn.Module):
    """Within: every sharded tensor whole (all E experts, the one-process layout) on the first process of each
    EP group, and the experts modules saying E experts again; every process must enter (it gathers)."""
    from peft.tuners.lora.layer import ParamWrapper

    params = sharded_parameters(model)
    if not params:
        yield
        return
    kept = {}
    lora_b = {id(w.lora_B[a].weight) for w in model.modules() if isinstance(w, ParamWrapper) for a in w.lora_B}
    for name, param in params.items():
        shard = param.expert_shard
        whole = _gather(param.data.contiguous(), shard, id(param) in lora_b)
        if whole is not None:
            kept[name] = (param, param.data)
            param.data = whole
    modules = [m for m in expert_modules(model) if getattr(m, "expert_shard", None) is not None]
    for experts in modules:
        experts.num_experts = experts.expert_shard.total
    try:
        yield
    finally:
        for param, local in kept.values():
            param.data = local
        for experts in modules:
            experts.num_experts = experts.expert_shard.local


def _gather(local: torch.Tensor, shard: ExpertShard, expert_minor: bool) -> torch.Tensor | None:
    """The whole tensor on the EP group's first process (None elsewhere), in the layout the shards came from."""
    first = dist.get_global_rank(shard.group, 0)
    parts = [torch.empty_like(local) for _ in range(shard.size)] if shard.index == 0 else None
    dist.gather(local, parts, dst=first, group=shard.group)
    if parts is None:
        return None
    if not expert_minor:
        return torch.cat(parts)
    rows = local.shape[0]
    r = local.shape[1] // shard.local
    return torch.cat([p.reshape(rows, r, shard.local) for p in parts], dim=2).reshape(rows, -1)
