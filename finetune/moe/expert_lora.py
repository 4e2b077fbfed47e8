"""Expert LoRA on the routed tokens: PEFT's adapter, applied to activations instead of weights.

Why by hand: PEFT's LoRA on fused expert parameters (`target_parameters`) re-parametrises the whole
expert stack on every forward, building `W + s * B @ A` for every expert of the layer (and again on
every gradient-checkpoint recompute), although only the routed tokens need it and the LoRA arithmetic
is under 2% of the layer's FLOPs. Here, for the tokens routed to expert e only,

    gate_up(x) = x W_gu[e]^T + s * (x A_gu[e]^T) B_gu[e]^T
    down(h)    = h W_d[e]^T  + s * (h A_d[e]^T)  B_d[e]^T

with every product a grouped matmul over the tokens sorted by expert (transformers' `_grouped_mm`:
`torch.nn.functional.grouped_mm` / `torch._grouped_mm`, or a per-expert loop), so no tensor the size
of the expert stack is ever built, and the frozen weights get no gradient.

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
from finetune.moe.nf4 import NF4ExpertStack
from finetune.private_apis import transformers_grouped_mm

# transformers' dispatcher: the grouped-mm kernels where they exist, its own fallback elsewhere.
_transformers_grouped_mm = transformers_grouped_mm()


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` (sorted by group; group g ends at offsets[g]) times weight[g] ([E, in, out])."""
    if _transformers_grouped_mm is not None:
        return _transformers_grouped_mm(x, weight, offs=offsets)
    out, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ weight[group].to(x.dtype))
        start = end
    return torch.cat(out)


def _factors(wrapper, adapter: str, experts: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's factors as grouped-mm right operands: A_e^T as [E, in, r] and B_e^T as [E, r, out]."""
    a, b = expert_factors(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, experts)
    return a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(), wrapper.scaling[adapter]


class _RoutedExpertLinear(torch.autograd.Function):
    """One expert projection over the rows sorted by expert: x W_e^T (+ s (x A_e^T) B_e^T with LoRA).

    x is built from a tensor that exists anyway: the layer input gathered by `rows` (gate_up), or
    act(gate) * up of the gate_up output (down, `act_fn` given). Forward: the frozen part as one grouped
    matmul (a 4-bit stack: expert by expert, each dequantized just before its matmul), LoRA added in place
    per expert. Saved: that source tensor, the indices and the thin (rows, r) products, never x itself nor
    a dequantized weight. Backward: per expert, x and (4-bit) W_e are rebuilt and the input gradient of the
    frozen and the LoRA part accumulated in one buffer, so LoRA adds no tensor of the size of the routed
    tokens or of the expert hidden states, and a 4-bit stack adds at most one expert's weight in the
    compute dtype, forward or backward (autograd over the same maths keeps x, every dequantized W_e, and
    builds a separate input gradient for each part)."""

    @staticmethod
    def forward(ctx, source, stack, a_t, b_t, rows, offsets, bounds, scale, act_fn):
        ctx.bounds, ctx.scale, ctx.act_fn, ctx.stack = bounds, scale, act_fn, stack
        x = _input_rows(source, rows, act_fn)
        out = _frozen_product(x, stack, offsets, bounds)
        thin = None
        if a_t is not None:
            thin = out.new_empty(out.shape[0], a_t.shape[-1])
            for expert, (start, end) in enumerate(ctx.bounds):
                if end > start:
                    torch.mm(x[start:end], a_t[expert].to(x.dtype), out=thin[start:end])
                    out[start:end].addmm_(thin[start:end], b_t[expert].to(out.dtype), alpha=scale)
        ctx.gather = rows is not None
        ctx.save_for_backward(source, a_t, b_t, rows if ctx.gather else offsets, thin)
        return out

    @staticmethod
    def backward(ctx, grad):
        source, a_t, b_t, rows, thin = ctx.saved_tensors
        scale, act_fn, lora = ctx.scale, ctx.act_fn, a_t is not None
        grad_a, grad_b = (torch.zeros_like(a_t), torch.zeros_like(b_t)) if lora else (None, None)
        grad_source = torch.zeros_like(source)
        for expert, (start, end) in enumerate(ctx.bounds):
            if end == start:
                continue  # an expert with no tokens: zero LoRA gradient, as with PEFT
            g = grad[start:end]
            grad_x = g @ expert_matrix(ctx.stack, expert, g.dtype)
            if lora:
                grad_b[expert] = (thin[start:end].T @ g).to(grad_b.dtype) * scale
                g_thin = (g @ b_t[expert].to(g.dtype).T) * scale  # (rows, r)
                grad_x.addmm_(g_thin, a_t[expert].to(g.dtype).T)
            if ctx.gather:
                x = source[rows[start:end]] if lora else None
                grad_source.index_add_(0, rows[start:end], grad_x.to(grad_source.dtype))
            else:  # through act(gate) * up, for this expert's rows only
                with torch.enable_grad():
                    part = source[start:end].detach().requires_grad_()
                    x = _input_rows(part, None, act_fn)
                grad_source[start:end] = torch.autograd.grad(x, part, grad_x)[0]
                x = x.detach()
            if lora:
                grad_a[expert] = (x.T @ g_thin).to(grad_a.dtype)
        return grad_source, None, grad_a, grad_b, None, None, None, None, None


def expert_matrix(stack: torch.Tensor, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert`'s frozen matrix [out, in] in `dtype` (a 4-bit stack dequantizes it, alone)."""
    if isinstance(stack, NF4ExpertStack):
        return stack.expert(expert, dtype)
    return stack[expert].to(dtype)


def _frozen_product(x, stack, offsets, bounds) -> torch.Tensor:
    """x_e W_e^T for the rows of every expert e."""
    if not isinstance(stack, NF4ExpertStack):
        return grouped_mm(x, stack.transpose(1, 2), offsets)
    out = x.new_empty(x.shape[0], stack.shape[1])
    for expert, (start, end) in enumerate(bounds):
        if end > start:
            torch.mm(x[start:end], expert_matrix(stack, expert, x.dtype).T, out=out[start:end])
    return out


def _project(source, stack, lora, rows, offsets, bounds, act_fn) -> torch.Tensor:
    a_t, b_t, scale = lora if lora is not None else (None, None, 0.0)
    return _RoutedExpertLinear.apply(source, stack, a_t, b_t, rows, offsets, bounds, scale, act_fn)


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
    offsets = torch.cumsum(torch.bincount(expert_ids, minlength=experts.num_experts), 0).to(torch.int32)
    counts = offsets.tolist()  # one host sync per layer, shared by both projections
    bounds = list(zip([0] + counts[:-1], counts))
    gate_up_stack, down_stack = experts.gate_up_proj, experts.down_proj
    if gate_up_lora is None and not isinstance(gate_up_stack, NF4ExpertStack):
        gate_up = grouped_mm(hidden_states[rows], gate_up_stack.transpose(1, 2), offsets)
    else:
        gate_up = _project(hidden_states, gate_up_stack, gate_up_lora, rows, offsets, bounds, None)
    if down_lora is None and not isinstance(down_stack, NF4ExpertStack):
        gate, up = gate_up.chunk(2, dim=-1)
        out = grouped_mm(experts.act_fn(gate) * up, down_stack.transpose(1, 2), offsets)
    else:
        out = _project(gate_up, down_stack, down_lora, None, offsets, bounds, experts.act_fn)
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
