"""The stages of benchmarks/gpu_check.sh, one per call: `python benchmarks/gpu_check.py STAGE WORKDIR`.

Each stage prints what it measured and ends with one line `summary: ...`; it exits non-zero when a check fails.
DEVICE=cuda (default) or cpu; SMALL=1 shrinks every shape so the whole script runs on a CPU in minutes (the
slow-tier smoke test, tests/test_gpu_check.py). The stages are listed in STAGES, in order.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

DEVICE = torch.device(os.environ.get("DEVICE", "cuda"))
SMALL = bool(os.environ.get("SMALL"))
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, the MFU denominator
MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000}
SMALL_WIDTH = {"hidden_size": 256, "intermediate_size": 896, "num_local_experts": 8, "num_attention_heads": 8,
               "num_key_value_heads": 2, "vocab_size": 32000}


def summary(text: str) -> None:
    print(f"summary: {text}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        summary(f"FAILED: {message}")
        sys.exit(1)


def device_override() -> str:
    return f"device={DEVICE.type}"


# ---------------------------------------------------------------------------------------------------------
# 1. environment


def stage_env(work: Path) -> None:
    import importlib.metadata as metadata

    from finetune.private_apis import problems

    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes",
                 "mistral_common"):
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} missing")
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, CUDA {torch.version.cuda}")
    found = problems()
    for problem in found:
        print(f"private API: {problem}")
    summary(f"torch {torch.__version__}, {DEVICE.type}; private APIs: {len(found)} problem(s)")
    check(not found, "private APIs changed (see above)")


# ---------------------------------------------------------------------------------------------------------
# 3. routed expert LoRA against PEFT's, 4. NF4 against its dequantized weights


def layer_shape():
    from moe_lora import SHAPES

    hidden, intermediate, experts, _ = SHAPES["small" if SMALL else "mixtral"]
    return hidden, intermediate, experts, 256 if SMALL else 4096


def forward_backward(layer, x, grad):
    out = layer(x)
    out.backward(grad)
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    input_grad = x.grad.float().clone()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return out.detach().float(), input_grad, grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def stage_expert_lora(work: Path) -> None:
    from moe_lora import build_layer, with_lora

    hidden, intermediate, experts, tokens = layer_shape()
    tolerances = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    worst = {}
    for dtype, tolerance in tolerances.items():
        frozen = build_layer(hidden, intermediate, experts, "grouped_mm", dtype, DEVICE)
        results = {}
        for kind in ("peft", "ours"):
            torch.manual_seed(1)
            x = torch.randn(1, tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
            grad = torch.randn(1, tokens, hidden, device=DEVICE, dtype=dtype)
            results[kind] = forward_backward(with_lora(frozen, kind, 16), x, grad)
        (out, dx, grads), (ref_out, ref_dx, ref_grads) = results["ours"], results["peft"]
        errors = {"output": relative_error(out, ref_out), "input grad": relative_error(dx, ref_dx)}
        errors.update({name: relative_error(grads[name], ref_grads[name]) for name in ref_grads})
        name, error = max(errors.items(), key=lambda item: item[1])
        worst[str(dtype).removeprefix("torch.")] = error
        print(f"{dtype}: largest relative error {error:.2e} ({name}), tolerance {tolerance:g}")
        check(set(grads) == set(ref_grads), f"{dtype}: different trained tensors {set(grads) ^ set(ref_grads)}")
        check(error <= tolerance, f"{dtype}: routed LoRA differs from PEFT's by {error:.2e} at {name}")
        del frozen, results
    summary(f"routed = PEFT at H{hidden} I{intermediate} E{experts}, {tokens} tokens: "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def stage_nf4(work: Path) -> None:
    from moe_lora import build_layer, with_lora, with_nf4_experts

    from finetune.moe.nf4 import bitsandbytes

    try:
        bitsandbytes("gpu_check")
    except Exception as err:  # noqa: BLE001  reported, not hidden: the wheel may not have travelled
        summary(f"skipped: {err}")
        return
    hidden, intermediate, experts, tokens = layer_shape()
    frozen = build_layer(hidden, intermediate, experts, "grouped_mm", torch.bfloat16, DEVICE)
    dequantized = with_lora(frozen, "ours", 16)
    quantized = with_nf4_experts(copy.deepcopy(dequantized))  # the same LoRA factors in both
    stacks = dict(quantized.named_parameters())
    with torch.no_grad():
        for name, param in dequantized.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                param.copy_(stacks[name].dequantize())
    torch.manual_seed(1)
    x = torch.randn(1, tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    out, dx, grads = forward_backward(quantized, x, grad)
    ref_out, ref_dx, ref_grads = forward_backward(dequantized, x, grad)
    errors = {"output": relative_error(out, ref_out), "input grad": relative_error(dx, ref_dx)}
    errors.update({name: relative_error(grads[name], ref_grads[name]) for name in ref_grads})
    name, error = max(errors.items(), key=lambda item: item[1])
    print(f"largest relative error {error:.2e} ({name})")
    check(error <= 2e-2, f"NF4 layer differs from its dequantized twin by {error:.2e} at {name}")
    summary(f"NF4 = dequantized (bf16) within {error:.1e}")


# ---------------------------------------------------------------------------------------------------------
# 5. host syncs, 6. tiny SFT then DPO, 9. throughput at Mixtral width


def tiny_model(work: Path) -> Path:
    from finetune.model.tiny import make_tiny_mixtral

    folder = work / "tiny-mixtral"
    return folder if (folder / "config.json").is_file() else make_tiny_mixtral(folder, seed=0)


def tiny_run(work: Path, name: str, *extra: str) -> list[str]:
    return [f"model={tiny_model(work)}", f"output_dir={work / name}", "resume=restart", "launch=null",
            device_override(), "attn_implementation=sdpa", "train.report_to=none", "train.save_strategy=no",
            "train.eval_strategy=no", *extra]


class CountSyncs:
    """Host syncs per optimizer step, from torch.cuda.set_sync_debug_mode("warn"), grouped by the Python line
    that asked for them; only on steps that write no log line."""

    def __init__(self):
        from transformers import TrainerCallback

        self.by_line: dict[str, int] = {}
        self.steps = 0
        counter = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                counter.begin()

            def on_step_end(self, args, state, control, **kwargs):
                counter.end(state.global_step)

        self.callback = Callback()
        self.caught = None

    def begin(self):
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")

    def end(self, step: int):
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        self.caught.__exit__(None, None, None)
        if step in (1,):  # the first step logs (logging_first_step)
            return
        self.steps += 1
        for record in self.records:
            if "synchroniz" in str(record.message):
                line = f"{Path(record.filename).name}:{record.lineno}"
                self.by_line[line] = self.by_line.get(line, 0) + 1


def stage_syncs(work: Path) -> None:
    from finetune.recipe.loading import load_recipe
    from finetune.sft import build

    overrides = tiny_run(work, "syncs", "train.max_steps=6", "train.logging_steps=100", "train.bf16=true",
                         "data.packing=true", "train.per_device_train_batch_size=4")
    trainer, _ = build(load_recipe("recipes/tiny/sft.yaml", overrides, expect_kind="sft"))
    counter = CountSyncs()
    trainer.add_callback(counter.callback)
    trainer.train()
    per_step = sum(counter.by_line.values()) / max(counter.steps, 1)
    ours = {line: n for line, n in counter.by_line.items() if not _is_library_line(line)}
    for line, count in sorted(counter.by_line.items(), key=lambda item: -item[1]):
        print(f"{count / counter.steps:6.1f} per step  {line}{'' if line in ours else '  (library)'}")
    how = "torch.cuda.set_sync_debug_mode" if DEVICE.type == "cuda" else "not observable on the CPU"
    summary(f"{per_step:.1f} host syncs per non-logging optimizer step, {sum(ours.values()) / max(counter.steps, 1):.1f} "
            f"in finetune/ ({how})")
    check(not ours, f"host syncs in finetune/: {ours}")


OUR_MODULES = {path.name for path in (ROOT / "finetune").rglob("*.py")}


def _is_library_line(line: str) -> bool:
    """A warning's `file:line`: a library's unless the file is one of finetune/'s modules."""
    return line.split(":")[0] not in OUR_MODULES


def logged(folder: Path, key: str) -> list[float]:
    import json

    return [line[key] for line in json.loads((folder / "trainer_state.json").read_text())["log_history"] if key in line]


def stage_sft_dpo(work: Path) -> None:
    from finetune.dpo import main as dpo_main
    from finetune.sft import main as sft_main

    steps = 2 if SMALL else 8
    sft = tiny_run(work, "sft", f"train.max_steps={steps}", "train.bf16=true", "data.packing=true",
                   "train.logging_steps=1", "train.per_device_train_batch_size=4")
    check(sft_main(["recipes/tiny/sft.yaml", *sft]) == 0, "tiny SFT failed")
    dpo = tiny_run(work, "dpo", f"dpo.sft_adapter={work / 'sft'}", "train.max_steps=1", "train.bf16=true",
                   "train.logging_steps=1")
    check(dpo_main(["recipes/tiny/dpo.yaml", *dpo]) == 0, "tiny DPO failed")
    first = logged(work / "dpo", "dpo_loss")[0]
    print(f"SFT losses {logged(work / 'sft', 'loss')}; first dpo_loss {first:.5f} (ln 2 = {math.log(2):.5f})")
    check(abs(first - math.log(2)) <= 2e-3, f"first dpo_loss {first} is not ln 2 within 2e-3")
    summary(f"packed bf16 SFT then DPO: first dpo_loss {first:.4f}, ln 2 within 2e-3")


def stage_throughput(work: Path) -> None:
    """SFT steps through our trainer on a 4-layer model at Mixtral's width, built on the device in bf16."""
    from transformers import AutoModelForCausalLM, MixtralConfig, set_seed

    from finetune.data.encoders import encoder_for
    from finetune.model.lora_targets import make_trainable
    from finetune.recipe.loading import load_recipe
    from finetune.sft import MoESFTTrainer
    from finetune.train.arguments import trainer_args
    from finetune.train.steps import load_data, trainer_inputs

    layers, length, steps = (4, 512, 4) if SMALL else (4, 4096, 12)
    width = SMALL_WIDTH if SMALL else MIXTRAL
    overrides = tiny_run(work, "throughput", f"train.max_steps={steps}", "train.bf16=true", "data.packing=true",
                         f"data.max_length={length}", "train.per_device_train_batch_size=1", "train.logging_steps=1",
                         "train.gradient_accumulation_steps=1", "lora.r=16", "lora.lora_alpha=32")
    recipe = load_recipe("recipes/tiny/sft.yaml", overrides, expect_kind="sft")
    args = trainer_args(recipe)
    encoder = encoder_for(recipe)
    data = load_data(recipe, args, encoder)
    config = MixtralConfig(num_hidden_layers=layers, max_position_embeddings=32768, use_cache=False, **width)
    config.head_dim = config.hidden_size // config.num_attention_heads
    set_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = MoESFTTrainer(model=make_trainable(model, recipe), args=args, **trainer_inputs(recipe, data, encoder))
    trainer.train()
    rates = [line["tokens_per_second"] for line in trainer.state.log_history if "tokens_per_second" in line][2:]
    check(bool(rates), "no tokens/s logged after the warm-up steps")
    tokens_per_second = sorted(rates)[len(rates) // 2]
    active = layers * active_parameters_per_layer(config) + config.vocab_size * config.hidden_size
    flops_per_token = 6 * active  # forward, checkpoint recompute, input gradients (LoRA: no frozen-weight grads)
    mfu = tokens_per_second * flops_per_token / PEAK_BF16_FLOPS
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    projected = tokens_per_second * layers / 32  # 8x7B: 32 such layers; the LM head counted 8 times (conservative)
    print(f"{layers} layers at hidden {config.hidden_size}, rows of {length} tokens: {tokens_per_second:,.0f} tokens/s "
          f"(median of {len(rates)} steps), {flops_per_token / 1e9:.1f} GFLOP/token, MFU {mfu:.1%}, peak {peak:.1f} GiB")
    summary(f"{tokens_per_second:,.0f} tokens/s, MFU {mfu:.1%}, peak {peak:.1f} GiB; projected 8x7B on one GPU "
            f"{projected:,.0f} tokens/s")


def active_parameters_per_layer(config) -> int:
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    return attention + config.num_experts_per_tok * 3 * hidden * config.intermediate_size


STAGES = {"env": stage_env, "expert_lora": stage_expert_lora, "nf4": stage_nf4, "syncs": stage_syncs,
          "sft_dpo": stage_sft_dpo, "throughput": stage_throughput}


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in STAGES or not sys.argv[2]:
        print(f"usage: python benchmarks/gpu_check.py {{{','.join(STAGES)}}} WORKDIR", file=sys.stderr)
        return 2
    stage, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    start = time.perf_counter()
    STAGES[stage](work)
    print(f"{stage}: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
