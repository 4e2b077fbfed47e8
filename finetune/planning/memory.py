"""Memory plan: what a recipe needs per GPU, before any weight is loaded (`finetune plan`).

Parameter counts come from the model built on the meta device with the recipe's own LoRA (or full)
setup, so they are exact. ZeRO stage and offload come from the recipe's `launch` config (its DeepSpeed
JSON) unless given here. The model states follow DeepSpeed's accounting (16-bit weights; per trained
parameter 16 more bytes: fp32 master weights, gradients, Adam moments), split into trainable and frozen
parameters, which DeepSpeed's own estimators (printed alongside) do not: they assume every parameter
trains. Added on top: the ZeRO-3 gather of one whole sparse MoE block (a leaf unit) with its prefetch,
activations under gradient checkpointing (an estimate), and runtime overhead. Under expert parallelism
(no ZeRO) each device holds the whole model but 1/N of the experts. What each device sends per micro-step:
finetune/planning/traffic.py.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.model.attention import packed_rows_need_a_mask
from finetune.model.lora_targets import group_of, make_trainable, trainable_counts
from finetune.moe.nf4 import EXPERT_BYTES_PER_WEIGHT, LINEAR_BYTES_PER_WEIGHT
from finetune.moe.router import moe_blocks
from finetune.planning.prefetch import DEFAULT_MAX_LIVE, prefetch_problem
from finetune.recipe.launch_file import deepspeed_settings
from finetune.recipe.schema import Recipe

GIB = 1024**3
GPU_RUNTIME_BYTES = 1.5 * GIB  # CUDA context, NCCL buffers, allocator slack
ONE_GPU_SIZES = (80, 48)  # GiB: the verdicts a 4-bit recipe gets without --gpu-memory (an 80 and a 48 GB GPU)


@dataclass
class Counts:
    total: int
    trainable: int
    largest_block: int  # parameters of the largest sparse MoE block (gathered as one ZeRO-3 leaf)
    quantizable: int = 0  # frozen weights `quantization: nf4` stores in 4 bits (attention projections, experts)
    quantized_bytes: float = 0.0  # what those take in 4 bits, with their block scales
    experts: int = 0  # parameters of the expert stacks and their LoRA factors: what expert parallelism splits
    trainable_experts: int = 0  # of those, the trained ones


@dataclass(frozen=True)
class Setup:
    """Everything the plan varies: where the recipe runs and the recipe values that set its memory."""

    gpus: int
    """GPUs (or CPU processes) per node."""
    nodes: int
    stage: int
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""
    offload_optimizer: bool
    offload_parameters: bool
    max_length: int
    """data.max_length: the longest micro-batch row the activations must hold."""
    micro_batch: int
    """train.per_device_train_batch_size"""
    accumulation: int
    """train.gradient_accumulation_steps"""
    max_live_parameters: float = DEFAULT_MAX_LIVE
    """DeepSpeed's stage3_max_live_parameters (its default 1e9)."""
    max_reuse_distance: float = 1e9
    """DeepSpeed's stage3_max_reuse_distance: a gathered parameter used again within this many parameters is
    kept gathered. Under gradient checkpointing a model smaller than this keeps every parameter gathered."""
    quantization: str = "none"
    """The recipe's `quantization`: `nf4` stores attention and expert weights in 4 bits (no DeepSpeed)."""
    prefetch_bucket_size: float = 0.0
    """DeepSpeed's stage3_prefetch_bucket_size ("auto" resolved: finetune/planning/prefetch.py); 0 = not read."""
    expert_parallel: int = 1
    """The recipe's `expert_parallel`: each device holds 1/N of the experts (and their trained states), no ZeRO."""

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Plan:
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes per device)
    cpu_bytes_per_node: float = 0.0
    checkpoint_bytes: float = 0.0
    """ZeRO-3 only: transformers reads every checkpoint value on rank 0 while loading (the other ranks get
    shapes), so rank 0 maps the whole checkpoint: CPU page cache, released once the model is built."""
    loading_bytes: float = 0.0
    """--device cpu with ZeRO-3: rank 0's resident memory while loading (runtime + its shard + the checkpoint)."""
    notes: list[str] = field(default_factory=list)
    """What the plan found wrong with the setup that costs time rather than memory (printed under the rows)."""

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)


def count_parameters(recipe: Recipe, config) -> Counts:
    """Exact counts from the model on the meta device, with the recipe's LoRA / full setup applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config)
    attention = sum(p.numel() for n, p in base.named_parameters() if group_of(n) == "attention")  # q/k/v/o
    experts = sum(p.numel() for n, p in base.named_parameters() if group_of(n) == "experts")
    model = make_trainable(base, recipe)
    trainable, total = trainable_counts(model)
    blocks = moe_blocks(model)
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks) if blocks else 0
    return Counts(sum(total.values()), sum(trainable.values()), largest, attention + experts,
                  attention * LINEAR_BYTES_PER_WEIGHT + experts * EXPERT_BYTES_PER_WEIGHT,
                  total["experts"], trainable["experts"])


def zero_settings(recipe: Recipe, zero: int | None, offload: bool | None) -> tuple[int, bool, bool, dict]:
    """(stage, offload optimizer, offload parameters, the rest of `zero_optimization`) from the flags, else
    the recipe's launch config."""
    ds = deepspeed_settings(recipe.launch) if recipe.launch else {}
    stage = int(ds.get("stage", 0))
    off_opt = ds.get("offload_optimizer", {}).get("device") == "cpu"
    off_param = ds.get("offload_param", {}).get("device") == "cpu"
    if zero is not None:
        stage = zero
    if offload is not None:  # DeepSpeed offloads optimizer state from ZeRO-1 on, parameters only with ZeRO-3
        off_opt, off_param = offload and stage >= 1, offload and stage == 3
    return stage, off_opt, off_param, ds


def runtime_bytes() -> float:
    """A CPU training process before any weight: this process's resident memory with the training libraries
    imported. (Not ru_maxrss: Linux keeps it across exec, so a plan started from a large process would
    report its parent's peak.)"""
    import datasets  # noqa: F401  the libraries a training process holds
    import deepspeed  # noqa: F401
    import trl  # noqa: F401

    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate(recipe: Recipe, config, counts: Counts, setup: Setup, device: str) -> Plan:
    gpu = device == "gpu"
    world, nodes, stage = setup.world, setup.nodes, setup.stage
    off_opt, off_param = setup.offload_optimizer, setup.offload_parameters
    weight_bytes = 2 if gpu else 4  # bf16 on GPUs; the CPU trains in fp32
    state_bytes = 16 if gpu else 12  # per trained parameter: fp32 master, fp32 grads, Adam m and v (CPU: no master)
    plan = Plan()
    dtype_name = "bf16" if gpu else "fp32"
    if setup.quantization != "none":
        rest = counts.total - counts.quantizable
        weights = counts.quantized_bytes + rest * weight_bytes
        plan.rows.append((f"weights ({counts.quantizable / 1e9:.2f} B in 4-bit NF4, {rest / 1e9:.2f} B {dtype_name})",
                          weights))
        plan.rows.append(("4-bit: one layer's expert stack dequantized for its matmul",
                          config.num_local_experts * 2 * config.intermediate_size * config.hidden_size
                          * weight_bytes))  # gate_up, the larger (finetune/moe/nf4.py)
    elif setup.expert_parallel > 1:  # no ZeRO: everything whole but the experts, 1/N of them per device
        ep = setup.expert_parallel
        weights = (counts.total - counts.experts * (ep - 1) / ep) * weight_bytes
        experts = config.num_local_experts // ep
        plan.rows.append((f"weights ({dtype_name}, experts /{ep}: {experts} of {config.num_local_experts} per layer)",
                          weights))
    else:
        weights = 0 if off_param else counts.total * weight_bytes / (world if stage == 3 else 1)
        how = dtype_name + (f", sharded /{world}" if stage == 3 else "") + (", offloaded" if off_param else "")
        plan.rows.append((f"weights ({how})", weights))
    if setup.expert_parallel > 1:
        ep = setup.expert_parallel
        held = counts.trainable - counts.trainable_experts * (ep - 1) / ep
        states = held * state_bytes
        how = f"{held:,.0f} params, experts' /{ep}"
    else:
        states = 0 if off_opt else counts.trainable * state_bytes / (world if stage >= 1 else 1)
        how = f"{counts.trainable:,} params" + (f", sharded /{world}" if stage >= 1 else "") + (", offloaded" if off_opt else "")
    plan.rows.append((f"trained: grads, master, Adam ({how})", states))
    if stage == 3 and not off_param and setup.max_reuse_distance >= counts.total:
        kept = min(counts.total, max(setup.max_live_parameters, 2 * counts.largest_block))
        plan.rows.append((f"ZeRO-3 gathered, kept for reuse ({kept / 1e6:,.0f} M params)", kept * weight_bytes))
    elif stage == 3:
        values = f"max_live {setup.max_live_parameters / 1e9:.3g}e9, bucket {setup.prefetch_bucket_size / 1e9:.3g}e9"
        problem = prefetch_problem(config, setup.max_live_parameters, setup.prefetch_bucket_size, counts.largest_block)
        if problem is None:
            plan.rows.append((f"ZeRO-3 gather: block + next ({values})",
                              2 * counts.largest_block * weight_bytes))
        else:
            plan.rows.append((f"ZeRO-3 gather: one block, no prefetch ({values})",
                              counts.largest_block * weight_bytes))
            plan.notes.append(problem)
    layers, lm_head, packed_mask = activation_bytes(recipe, config, setup, weight_bytes)
    plan.rows.append(("activations (estimate, checkpointed)", layers))
    plan.rows.append(("LM head: one tile of logits, trained positions' hidden states", lm_head))
    if packed_mask:
        plan.rows.append((f"packed row's attention mask ({recipe.attn_implementation}, block-diagonal)", packed_mask))
    runtime = GPU_RUNTIME_BYTES if gpu else runtime_bytes()
    plan.rows.append(("runtime (CUDA context, buffers)" if gpu else "runtime (interpreter and libraries)", runtime))
    plan.cpu_bytes_per_node = ((counts.total * weight_bytes if off_param else 0)
                               + (counts.trainable * state_bytes if off_opt else 0)) / nodes
    if stage == 3:
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        plan.checkpoint_bytes = counts.total * dtype.itemsize
        if not gpu:
            plan.loading_bytes = runtime + weights + plan.checkpoint_bytes
    return plan


def activation_bytes(recipe: Recipe, config, setup: Setup, weight_bytes: int) -> tuple[float, float, float]:
    """Per device, one micro-batch of max_length tokens under gradient checkpointing: the saved input of
    every layer, one layer recomputed (attention and the routed expert MLPs); the LM head's tile and rows; a
    packed row's attention mask. Bytes of each; all grow linearly with max_length but the mask."""
    batch = setup.micro_batch * (2 if recipe.kind == "dpo" else 1)
    tokens = batch * setup.max_length / recipe.sequence_parallel  # Ulysses: each process holds its share of a row
    hidden, layers = config.hidden_size, config.num_hidden_layers
    checkpoints = layers * tokens * hidden * weight_bytes
    attention = tokens * hidden * 8 * weight_bytes
    experts = tokens * config.num_experts_per_tok * (3 * config.intermediate_size + hidden) * weight_bytes
    router = tokens * config.num_local_experts * 4 * layers
    # The LM head scores trained positions (about half) one tile at a time: TRL's fused kernel on GPUs (4096
    # positions x 32768 entries), finetune/model/lm_head.py elsewhere (1024 positions, about 4 fp32 copies); either
    # way about 4096 x vocab fp32 numbers, plus each trained position's hidden state and its fp32 gradient.
    trained = tokens * 0.5
    lm_head = min(trained, 4096) * config.vocab_size * 4 + trained * hidden * (weight_bytes + 4)
    # A packed row under sdpa attends through a block-diagonal boolean mask, one byte per query x key pair;
    # flash attention takes the rows' boundaries instead (finetune/model/attention.py).
    packed_mask = setup.micro_batch * setup.max_length**2 if packed_rows_need_a_mask(recipe) else 0
    return checkpoints + attention + experts + router, lm_head, packed_mask


def deepspeed_estimate(counts: Counts, gpus_per_node: int, nodes: int, stage: int, off_opt: bool, off_param: bool):
    """DeepSpeed's own model-state estimate (all parameters trained), (cpu, gpu) bytes, or None."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.total, counts.largest_block, gpus_per_node, nodes, cpu_offload=off_opt,
            cpu_offload_params=off_param, zero_init=True,
        )
        return cpu, gpu
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
        )

        return estimate_zero2_model_states_mem_needs(counts.total, gpus_per_node, nodes, cpu_offload=off_opt)
    return None
