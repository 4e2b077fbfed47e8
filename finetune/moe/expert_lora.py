"""Expert LoRA on the routed tokens: PEFT's adapter, applied to activations instead of weights.

Why by hand: PEFT's LoRA on fused expert parameters (`target_parameters`) re-parametrises the whole
expert stack on every forward, building `W + s * B @ A` for every expert of the layer (and again on
every gradient-checkpoint recompute), although only the routed tokens need it and the LoRA arithmetic
is under 2% of the layer's FLOPs. Here, for the tokens routed to expert e only,

    gate_up(x) = x W_gu[e]^T + s * (x A_gu[e]^T) B_gu[e]^T
    down(h)    = h W_d[e]^T  + s * (h A_d[e]^T)  B_d[e]^T

with every product a grouped matmul over the tokens sorted by expert (finetune/moe/grouped_mm.py), so
no tensor the size of the expert stack is built for LoRA, and the frozen weights get no gradient. The
group ends stay on the device: a layer's forward and backward read nothing back to the host (on a GPU
each such read stalls the queue of kernels; tests/test_host_syncs.py runs the layer under FakeTensorMode,
where any read raises).

The parameters are PEFT's own: `use_routed_expert_lora(model)` only swaps the forward of each
`ParamWrapper` stack on an experts module, reading the wrappers' `lora_A`/`lora_B` in PEFT's layout
(finetune/files/adapter_folder.py). Saved adapters are plain
PEFT adapters, PEFT adapters load into it, and anything this path does not cover (adapters disabled or
merged, several active adapters, dropout) goes through PEFT's forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from finetune.files.adapter_folder import expert_factors
from finetune.moe.expert_parallel import run_on_owners
from finetune.moe.grouped_mm import group_ends, grouped_mm
from finetune.moe.nf4 import NF4ExpertStack


def _factors(wrapper, adapter: str, experts: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's factors as grouped-mm right operands: A_e^T as [E, in, r] and B_e^T as [E, r, out]."""
    a, b = expert_factors(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, experts)
    return a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(), wrapper.scaling[adapter]


class _RoutedExpertLinear(torch.autograd.Function):
    """One expert projection over the rows sorted by expert: x W_e^T (+ s (x A_e^T) B_e^T with LoRA).

    x is built from a tensor that exists anyway: the layer input gathered by `rows` (gate_up), or
    act(gate) * up of the gate_up output (down, `act_fn` given). Saved: that source tensor, the indices and
    the thin (rows, r) LoRA products, never x itself (k times the layer input, or the size of the expert
    hidden states) nor a dequantized weight: backward rebuilds x and (4-bit) the stack. Autograd over the
    same maths would keep x, and a 4-bit layer's whole dequantized stack per layer until backward."""

    @staticmethod
    def forward(ctx, source, stack, a_t, b_t, rows, offsets, scale, act_fn):
        ctx.scale, ctx.act_fn, ctx.stack = scale, act_fn, stack
        x = _input_rows(source, rows, act_fn)
        out = grouped_mm(x, frozen_weights(stack, x.dtype).transpose(1, 2), offsets)
        thin = None
        if a_t is not None:
            thin = grouped_mm(x, a_t, offsets)  # (rows, r) in x's dtype, whatever the factors' dtype
            grouped_mm(thin, b_t, offsets, into=out, alpha=scale)
        ctx.save_for_backward(source, a_t, b_t, rows, offsets, thin)
        return out

    @staticmethod
    def backward(ctx, grad):
        source, a_t, b_t, rows, offsets, thin = ctx.saved_tensors
        grad = grad.contiguous()  # an expanded gradient (of a sum) has strides the grouped kernel refuses
        lora = a_t is not None
        grad_x = grouped_mm(grad, frozen_weights(ctx.stack, grad.dtype), offsets)
        if lora:
            g_thin = grouped_mm(grad, b_t.transpose(1, 2), offsets, alpha=ctx.scale)  # (rows, r)
            grouped_mm(g_thin, a_t.transpose(1, 2), offsets, into=grad_x)
        grad_a = grad_b = None
        if lora:
            # Weight-gradient form: per expert, its rows' thin^T g (an expert with no rows: 0).
            grad_b = grouped_mm(thin.T, grad, offsets, alpha=ctx.scale).to(b_t.dtype)
        # A trainable stack (full fine-tuning under expert parallelism): per expert, its rows' grad^T x.
        grad_w = torch.zeros(ctx.stack.shape, dtype=torch.float32, device=grad.device) if ctx.needs_input_grad[1] else None
        if rows is not None:  # gate_up: x = source[rows]
            grad_source = torch.zeros_like(source).index_add_(0, rows, grad_x.to(source.dtype))
            if lora:
                grad_a = grouped_mm(source[rows].T, g_thin, offsets).to(a_t.dtype)
            if grad_w is not None:
                grouped_mm(grad.T, source[rows].to(grad.dtype), offsets, into=grad_w)
            return grad_source, _as(grad_w, ctx.stack), grad_a, grad_b, None, None, None, None
        # down: x = act(gate) * up, rebuilt and differentiated here a block of rows at a time, so neither x
        # nor the activation's intermediates exist for all routed rows at once (the block count is the expert
        # count, from shapes only: no host read). A block's share of grad_a uses the group ends shifted into it.
        grad_source = torch.empty_like(source)
        grad_a = torch.zeros_like(a_t, dtype=torch.float32) if lora else None
        total, size = source.shape[0], -(-source.shape[0] // max(1, a_t.shape[0] if lora else ctx.stack.shape[0]))
        for start in range(0, total, size):
            block = slice(start, min(start + size, total))
            grad_source[block], x = _through_activation(source[block], ctx.act_fn, grad_x[block])
            ends = (offsets - start).clamp_(0, block.stop - start)
            if lora:
                grouped_mm(x.T, g_thin[block], ends, into=grad_a)
            if grad_w is not None:
                grouped_mm(grad[block].T, x.to(grad.dtype), ends, into=grad_w)
        return (grad_source, _as(grad_w, ctx.stack), grad_a.to(a_t.dtype) if lora else None, grad_b,
                None, None, None, None)


def _as(grad_w, stack):
    return None if grad_w is None else grad_w.to(stack.dtype)


def _through_activation(source, act_fn, grad_x):
    """The gradient of x = act(gate) * up with respect to source = [gate, up], and x itself.

    A small graph built and used inside backward. Its saved tensors go through identity hooks on purpose:
    activation offloading (TRL's, or any `saved_tensors_hooks` around backward) would otherwise move them
    to the CPU and back within this one call, for nothing."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        part = source.detach().requires_grad_()
        x = _input_rows(part, None, act_fn)
    (grad_source,) = torch.autograd.grad(x, part, grad_x.to(x.dtype))
    return grad_source, x.detach()


def _keep(tensor):
    return tensor


def frozen_weights(stack: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen stack [E, out, in] in `dtype` (a 4-bit stack dequantized, transient: finetune/moe/nf4.py)."""
    if isinstance(stack, NF4ExpertStack):
        return stack.dequantize(dtype)
    return stack.to(dtype)


def _project(source, stack, lora, rows, offsets, act_fn) -> torch.Tensor:
    a_t, b_t, scale = lora if lora is not None else (None, None, 0.0)
    return _RoutedExpertLinear.apply(source, stack, a_t, b_t, rows, offsets, scale, act_fn)


def _input_rows(source, rows, act_fn):
    if rows is not None:
        return source[rows]
    gate, up = source.chunk(2, dim=-1)
    return act_fn(gate) * up


def routed_experts_forward(experts: nn.Module, hidden_states, top_k_index, top_k_weights,
                           gate_up_lora=None, down_lora=None) -> torch.Tensor:
    """The Mixtral experts with optional LoRA factors (A^T, B^T, scale) per projection (None = frozen).
    The stacks may be dense or 4-bit (finetune/moe/nf4.py)."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    rows = order // top_k

    def local_experts(source, rows, offsets):
        gate_up = _project(source, experts.gate_up_proj, gate_up_lora, rows, offsets, None)
        return _project(gate_up, experts.down_proj, down_lora, None, offsets, experts.act_fn)

    shard = getattr(experts, "expert_shard", None)  # expert parallel: finetune/moe/expert_shards.py
    if shard is None:
        out = local_experts(hidden_states, rows, group_ends(expert_ids, experts.num_experts))
    else:  # the rows travel to their experts' process and back (finetune/moe/expert_parallel.py)
        out = run_on_owners(hidden_states[rows], expert_ids, shard, local_experts)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    # Back to token order, then sum each token's k expert outputs (fp32 like transformers' reduction).
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return unsorted.view(num_tokens, top_k, hidden).float().sum(1).to(hidden_states.dtype)


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return routed_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def route_experts(experts: nn.Module) -> None:
    """Run an experts module (with no LoRA of its own) through `routed_experts_forward`: how 4-bit stacks
    run, and where PEFT's wrapper falls back to its base layer (adapters disabled, e.g. a reference pass)."""
    experts.forward = types.MethodType(_experts_forward, experts)


def _wrapper_stack(module: nn.Module) -> tuple[dict, nn.Module]:
    """{parameter name: ParamWrapper} of a nested ParamWrapper stack, and the experts module inside."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {}
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return wrappers, module


def _routed_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    wrappers, experts = _wrapper_stack(self)
    outer_forward = types.MethodType(type(self).forward, self)
    if args or kwargs:
        return outer_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    factors = {}
    for name, wrapper in wrappers.items():
        if wrapper.merged or wrapper.disable_adapters:
            if wrapper.merged and not wrapper.disable_adapters:
                continue  # the delta is inside the weight already: frozen path
            return outer_forward(hidden_states, top_k_index, top_k_weights)  # PEFT unmerges / skips as it does
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(active) > 1 or any(getattr(wrapper.lora_dropout[a], "p", 0) for a in active):
            return outer_forward(hidden_states, top_k_index, top_k_weights)
        if active:
            factors[name] = _factors(wrapper, active[0], experts.num_experts)
    return routed_experts_forward(experts, hidden_states, top_k_index, top_k_weights,
                                  factors.get("gate_up_proj"), factors.get("down_proj"))


def use_routed_expert_lora(model: nn.Module) -> int:
    """Route every PEFT expert-LoRA stack through `routed_experts_forward`; returns how many. Idempotent."""
    from peft.tuners.lora.layer import ParamWrapper

    stacks = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(m.base_layer) for m in stacks}
    swapped = 0
    for module in stacks:
        if id(module) in inner:
            continue  # only the outermost wrapper of a stack
        _, experts = _wrapper_stack(module)
        if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            module.forward = types.MethodType(_routed_forward, module)
            swapped += 1
    return swapped
