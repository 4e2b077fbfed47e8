"""Expert parallelism (EP): each process of a group of N keeps E/N experts of every layer, and the routed
tokens travel to the process that owns their expert and back (two all-to-alls per layer, forward and backward).

Under ZeRO-3 every process gathers every expert of a layer for every micro-step, forward and backward
(finetune.plan counts those bytes); a micro-step only needs the experts its tokens are routed to. Here the
experts stay put: per layer a process sends tokens x hidden x top-k activations, about 20 times less than
Mixtral 8x7B's expert weights, and holds E/N experts' weights instead of all of them.

Why by hand: DeepSpeed 0.19.8's AutoEP, the library path, does not meet this package's model.
- It replaces each MoE block at `deepspeed.initialize`, after the Trainer has wrapped the model in PEFT. Its
  Mixtral pattern (`model.layers.N.mlp`) then matches nothing under `base_model.model.`, and PEFT's expert
  LoRA lives on the experts it would replace, so LoRA on experts and AutoEP never meet.
- It fails at `deepspeed.initialize` on transformers 5.24 (`_CanRecordRegistry.get()` takes one argument).
- It retargets transformers' router-logit recorders, which are keyed by class name, so another Mixtral in the
  same process (evaluation, a DPO reference) then records no router logits.
- It renames the experts (`experts.w1/w2/w3`, `router.gate`), so its checkpoints are not Mixtral's layout.
Here the model keeps transformers' modules and PEFT's parameters, cut along the expert axis
(finetune/moe/expert_shards.py); the routed kernel of finetune/moe/expert_lora.py runs the local experts,
LoRA included, and `run_on_owners` below moves the rows. Plain data parallel (DDP) carries everything else.

Processes: EP groups are N consecutive ranks (one node's GPUs when N is the GPUs per node, so the all-to-all
stays on NVLink); the ranks at the same place in each EP group hold the same experts (a replica group) and
add their expert gradients, as DDP adds everything else's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from finetune.moe.grouped_mm import group_ends


@dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer this process owns, and whom it exchanges tokens with."""

    total: int
    """Experts in the layer (E)."""
    size: int
    """Processes in the EP group (N); each owns E/N consecutive experts."""
    index: int
    """This process's place in its EP group: it owns experts index*E/N .. (index+1)*E/N - 1."""
    group: object = None
    """The EP group (a torch.distributed process group)."""
    replicas: object = None
    """The processes that hold the same experts in the other EP groups; None when there are none."""
    world: int = 1
    """All data-parallel processes: expert gradients are divided by it, as DDP divides the others'."""

    @property
    def local(self) -> int:
        return self.total // self.size

    @property
    def first(self) -> int:
        return self.index * self.local


def expert_parallel_groups(size: int, total_experts: int) -> ExpertShard:
    """This process's shard for an EP size `size` over the launched processes. Every process must call this in
    the same order (it creates process groups)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group = replicas = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            ep_group = group
    for place in range(size):
        group = dist.new_group(list(range(place, world, size)))
        if rank % size == place and world > size:
            replicas = group
    return ExpertShard(total_experts, size, rank % size, ep_group, replicas, world)


def run_on_owners(rows: torch.Tensor, expert_ids: torch.Tensor, shard: ExpertShard, compute) -> torch.Tensor:
    """`compute` on the process that owns each row's expert, and the results back in `rows`' order.

    rows [R, hidden] are sorted by `expert_ids` (global ids). `compute(received, order, offsets)` gets the rows
    sent to this process, `order` sorting them by local expert and the local group ends, and returns one output
    row per sorted row. Differentiable: the gradients go back the way the rows came.

    Each layer reads 2N split sizes back to the host (all-to-all needs them as Python ints): one sync per layer
    per forward on a GPU, as DeepSpeed's own EP layers have; the rest stays on the device."""
    n, local = shard.size, shard.local
    counts = group_ends(expert_ids, shard.total).long()
    counts = torch.diff(counts, prepend=counts.new_zeros(1))  # rows per global expert
    received_counts = torch.empty_like(counts)
    dist.all_to_all_single(received_counts, counts, group=shard.group)  # [source, local expert]
    sizes = torch.cat([counts.view(n, local).sum(1), received_counts.view(n, local).sum(1)]).tolist()
    send, receive = sizes[:n], sizes[n:]
    received = _AllToAll.apply(rows, receive, send, shard.group)
    local_ids = torch.arange(local, device=rows.device).repeat(n)
    local_ids = local_ids.repeat_interleave(received_counts, output_size=sum(receive))
    local_ids, order = torch.sort(local_ids, stable=True)
    out = compute(received, order, group_ends(local_ids, local))
    out = torch.empty_like(out).index_copy_(0, order, out)  # back to the order the rows arrived in
    return _AllToAll.apply(out, send, receive, shard.group)


class _AllToAll(torch.autograd.Function):
    """torch.distributed's all-to-all with its gradient: the same exchange with the splits swapped.

    Why by hand: torch's differentiable one (`torch.distributed.nn.functional.all_to_all_single`) is deprecated,
    and its replacement lives in a private module of torch.distributed (functional collectives)."""

    @staticmethod
    def forward(ctx, rows, receive, send, group):
        ctx.receive, ctx.send, ctx.group = receive, send, group
        out = rows.new_empty(sum(receive), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


def average_expert_gradient(grad: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """An expert parameter's incoming gradient, made what DDP makes of a replicated one's.

    The all-to-all's backward already summed every EP-group process's tokens into the owner's gradient; the
    replicas add theirs, and dividing by all processes gives the mean over processes, as DDP's all-reduce gives
    for every other parameter. Applied to each micro-step's gradient before it accumulates, so gradient
    accumulation sums the same means."""
    grad = grad / shard.world
    if shard.replicas is not None:
        dist.all_reduce(grad, group=shard.replicas)
    return grad


def watch_expert_gradients(param: torch.nn.Parameter, shard: ExpertShard) -> None:
    param.register_hook(functools.partial(average_expert_gradient, shard=shard))


def clip_gradients(parameters, expert_parameters, max_norm: float, shard: ExpertShard) -> torch.Tensor:
    """Clip all gradients by one global norm, with each expert counted once: the replicated gradients' norm
    plus the sum over the EP group of its experts' squared norms. Each process's own norm would differ (its
    experts differ) and clip the replicated parameters differently, so they would drift apart."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    experts = {id(p) for p in expert_parameters}
    params = [p for p in parameters if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in experts]
    local = [p.grad for p in params if id(p) in experts]
    device = params[0].grad.device if params else torch.device("cpu")
    dense_norm = get_total_norm(dense).to(device) if dense else torch.zeros((), device=device)
    expert_square = (get_total_norm(local).to(device) ** 2 if local else torch.zeros((), device=device)).float()
    dist.all_reduce(expert_square, group=shard.group)
    total = torch.sqrt(dense_norm.float() ** 2 + expert_square)
    if max_norm != float("inf"):  # inf: the norm alone, for the log
        clip_grads_with_norm_(params, max_norm, total)
    return total
