"""The memory plan as `finetune plan` prints it: the rows per device, the verdict for each GPU size, what
loading needs, and DeepSpeed's own estimate beside ours."""

from __future__ import annotations

from finetune.planning.memory import GIB, ONE_GPU_SIZES, Setup


def render(recipe, source, counts, plan, args, setup: Setup, ds) -> str:
    device_word = "GPU" if args.device == "gpu" else "process"
    lines = [
        f"memory plan for {recipe.source} ({recipe.model}; {source})",
        f"parameters: {(counts.total - counts.trainable) / 1e9:.3f} B frozen, {counts.trainable / 1e6:.2f} M trainable "
        f"({recipe.method} on {', '.join(recipe.trainable)})",
        f"setup: {describe(setup, device_word)}",
        "",
        f"per {device_word:<60} GiB",
    ]
    lines += [f"  {what:<60} {size / GIB:8.2f}" for what, size in plan.rows]
    lines.append(f"  {'total':<60} {plan.total / GIB:8.2f}")
    sizes = [args.gpu_memory] if args.gpu_memory else ONE_GPU_SIZES if setup.quantization != "none" else []
    for size in sizes:
        verdict = "fits" if plan.total <= size * GIB else "DOES NOT FIT"
        lines.append(f"  of {size:g} GiB per {device_word}: {verdict} ({100 * plan.total / (size * GIB):.0f}% used)")
    lines += [f"note: {note}" for note in plan.notes]
    if plan.cpu_bytes_per_node:
        lines.append(f"CPU memory per node for offloaded states: {plan.cpu_bytes_per_node / GIB:.2f} GiB")
    if plan.loading_bytes:
        lines.append(f"while loading, rank 0: {plan.loading_bytes / GIB:.2f} GiB per process (it maps the whole "
                     f"{plan.checkpoint_bytes / GIB:.2f} GiB checkpoint: transformers reads every value on rank 0 under ZeRO-3)")
    elif plan.checkpoint_bytes:
        lines.append(f"while loading: rank 0 maps the whole checkpoint, {plan.checkpoint_bytes / GIB:.2f} GiB of CPU page "
                     "cache on the first node (transformers reads every value on rank 0 under ZeRO-3)")
    if ds is not None:
        model_states = sum(b for what, b in plan.rows if what.startswith(("weights", "trained", "ZeRO")))
        lines.append(
            f"DeepSpeed's estimator (every parameter trained): {ds[1] / GIB:.2f} GiB per GPU, {ds[0] / GIB:.2f} GiB "
            f"CPU; ours for these model states: {model_states / GIB:.2f} GiB"
            + (" (LoRA trains a small fraction, which DeepSpeed's estimator does not model)"
               if recipe.method == "lora" else "")
        )
    return "\n".join(lines)


def describe(setup: Setup, device_word: str = "GPU") -> str:
    return (f"{setup.nodes} node(s) x {setup.gpus} {device_word}(s), "
            + (f"DeepSpeed ZeRO-{setup.stage}" if setup.stage else "no ZeRO")
            + (f", expert parallel {setup.expert_parallel}" if setup.expert_parallel > 1 else "")
            + (", optimizer offloaded" if setup.offload_optimizer else "")
            + (", parameters offloaded" if setup.offload_parameters else "")
            + f", micro-batch {setup.micro_batch} x {setup.max_length} tokens"
            + (f", {setup.accumulation} accumulation steps" if setup.accumulation > 1 else ""))
