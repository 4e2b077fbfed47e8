"""What `finetune evaluate` needs on one GPU, before any weight loads (`finetune evaluate MODEL --suite S --plan`):
the weights in bf16, one batch's logits and activations, and where accelerate's `device_map="auto"` puts them
(finetune/evaluation/loading.py): on the GPU while they fit, the remaining layers on the CPU.

A reference that is the adapter's base (the adapter disabled) or another adapter of the same base (swapped in)
costs nothing more; a reference that is another model is loaded after the model is freed, one at a time."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.files.adapter_folder import adapter_base, is_adapter_folder
from finetune.model.config import ModelSourceError, read_model_config
from finetune.planning.memory import GIB, GPU_RUNTIME_BYTES

WEIGHT_BYTES = 2  # bf16 on a GPU
LOGIT_BYTES = 2 + 4 + 4  # the head's bf16 logits, their fp32 copy, cross-entropy's fp32 log-softmax


@dataclass
class EvaluationPlan:
    model: str
    base: str | None
    source: str
    parameters: int
    weights: float
    batch: float
    runtime: float
    gpu: float

    @property
    def on_gpu(self) -> float:
        """Bytes of weights the GPU holds: what is left after the runtime and one batch."""
        return max(0.0, min(self.weights, self.gpu - self.runtime - self.batch))

    @property
    def on_cpu(self) -> float:
        return self.weights - self.on_gpu


def evaluation_plan(path: str, base: str | None, batch_size: int, max_length: int, gpu_gib: float) -> EvaluationPlan:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    weights_of = (base or adapter_base(path)) if is_adapter_folder(path) else path
    if weights_of is None:
        raise ModelSourceError(f"model={path}: the adapter records no base model; give one with --base")
    config, source = read_model_config(weights_of, "model", builtin=True)
    with init_empty_weights():
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tokens = batch_size * max_length
    batch = tokens * config.vocab_size * LOGIT_BYTES + tokens * config.hidden_size * WEIGHT_BYTES * 8
    return EvaluationPlan(path, weights_of if weights_of != path else None, source, parameters,
                          parameters * WEIGHT_BYTES, batch, GPU_RUNTIME_BYTES, gpu_gib * GIB)


def render(plan: EvaluationPlan, batch_size: int, max_length: int) -> str:
    on = f" (base {plan.base}, {plan.source})" if plan.base else f" ({plan.source})"
    rows = [("weights (bf16)", plan.weights),
            (f"one batch ({batch_size} x {max_length} tokens): logits, activations", plan.batch),
            ("runtime (CUDA context, buffers)", plan.runtime)]
    lines = [f"evaluation plan for {plan.model}{on}: {plan.parameters / 1e9:.3f} B parameters"]
    lines += [f"  {label:<58}{value / GIB:8.2f} GiB" for label, value in rows]
    gpu = f"one {plan.gpu / GIB:.0f} GiB GPU"
    if plan.on_cpu == 0:
        lines.append(f"on {gpu}: fits ({(plan.weights + plan.batch + plan.runtime) / plan.gpu:.0%} used)")
    else:
        lines.append(f"on {gpu}: the weights do not all fit; device_map=auto keeps {plan.on_gpu / GIB:.2f} GiB of them "
                     f"on the GPU and {plan.on_cpu / GIB:.2f} GiB on the CPU (CPU memory needed; those layers are "
                     "copied to the GPU on every forward, so evaluation is slower)")
    lines.append("reference: the adapter's base (adapter disabled) or another adapter of the same base (swapped in) "
                 "adds nothing; another model is loaded after this one is freed")
    return "\n".join(lines)
