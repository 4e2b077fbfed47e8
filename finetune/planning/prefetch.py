"""Whether ZeRO-3 can gather the next sparse MoE block while the current one computes.

Each Mixtral MoE block is one ZeRO-3 leaf (finetune/train/launch.py): its parameters are gathered all at
once, 1.42e9 of them in 8x7B (2.8 GB in bf16), 2.42e9 in 8x22B. DeepSpeed prefetches the parameters that
come next in the trace only within min(stage3_max_live_parameters - parameters in use,
stage3_prefetch_bucket_size) (`PartitionedParameterCoordinator`). With its defaults (max_live 1e9; the
bucket "auto", which transformers sets to 0.9 * hidden^2: 15e6 for 8x7B) that is at most zero for an
expert block, so every block's gather waits on the critical path. The shipped DeepSpeed configs set
both with room for the largest Mixtral here with LoRA up to rank 64 (tests/test_prefetch.py checks them
against 8x7B and 8x22B). They are caps, not reservations: 8x7B gathers at most two blocks, 5.6 GB.
"""

from __future__ import annotations

# DeepSpeed's defaults, for configs that leave a key out.
DEFAULT_MAX_LIVE = 1e9


def moe_block_parameters(config) -> int:
    """One sparse MoE block: every expert's gate, up and down matrices, and the router."""
    hidden, experts = config.hidden_size, config.num_local_experts
    return experts * 3 * config.intermediate_size * hidden + experts * hidden


def attention_parameters(config) -> int:
    """One layer's attention projections and its two norms."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_and_o = 2 * hidden * config.num_attention_heads * head_dim
    k_and_v = 2 * hidden * config.num_key_value_heads * head_dim
    return q_and_o + k_and_v + 2 * hidden


def bucket_size(value, config) -> float:
    """stage3_prefetch_bucket_size as DeepSpeed will see it: "auto" is what transformers fills in."""
    return 0.9 * config.hidden_size**2 if value in (None, "auto") else float(value)


def prefetch_problem(config, max_live: float, bucket: float, block: int | None = None) -> str | None:
    """Why the next layer (its attention and MoE block of `block` parameters, LoRA included; default: the
    config's) cannot be prefetched during a block's compute, with the values that would let it; None when
    it can."""
    block = block or moe_block_parameters(config)
    following = attention_parameters(config) + block
    need_live = block + following
    if max_live >= need_live and bucket >= following:
        return None
    room = max(0.0, min(max_live - block, bucket))
    left = f"only {room / 1e9:.3g}e9" if room else "no room"
    return (f"ZeRO-3 cannot prefetch the next MoE block ({block / 1e9:.3g}e9 parameters): "
            f"stage3_max_live_parameters={max_live:.3g} and stage3_prefetch_bucket_size={bucket:.3g} leave "
            f"{left} for it, so every block's gather waits on the critical path; set them to at least "
            f"{need_live / 1e9:.3g}e9 and {following / 1e9:.3g}e9 (recipes/accelerate/ds_zero3.json does)")
