"""Expert LoRA speed and memory: the frozen MoE layer vs PEFT's expert LoRA vs ours (finetune/moe/expert_lora.py).

    python benchmarks/moe_lora.py                       # the default CPU shape "h1024" (H 1024, I 3584, 8 experts, 2048 tokens)
    python benchmarks/moe_lora.py --shape small         # a quick run
    python benchmarks/moe_lora.py --shape mixtral --dtype bf16     # on a GPU: Mixtral's layer, 8192 tokens
    python benchmarks/moe_lora.py --shape small --sft-steps 20     # plus the tiny SFT recipe's tokens/s, ours vs PEFT's
    python benchmarks/moe_lora.py --nf4                 # plus ours on 4-bit (NF4) experts (needs bitsandbytes)

One Mixtral MoE layer (router + experts, top-2), forward + backward with a gradient for the input, LoRA
r=16 on gate_up and down of every expert. All variants run in this one process on the same weights and
inputs, interleaved round by round, so the ratios compare like with like on a noisy machine. Time: the
median over rounds. Peak memory: on CUDA the allocator's peak over the step minus what was allocated
before it; on CPU the peak resident memory (sampled every 0.5 ms) over the step minus the resident
memory before it, with freed memory handed back to the OS first (malloc_trim).
Targets: CPU step <= 1.15 x frozen and extra memory <= 0.1 x PEFT's extra; GPU >= 1.5 x faster
than grouped_mm + PEFT. With --nf4, "nf4" is "ours" with the experts stored in 4 bits (finetune/moe/nf4.py):
targets expert weight memory <= 0.30 x bf16 and step time <= 1.5 x ours on CPU.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # hidden, intermediate, experts, tokens
    "small": (256, 896, 8, 512),
    "h1024": (1024, 3584, 8, 2048),
    "mixtral": (4096, 14336, 8, 8192),
}
MIB = 1024**2


def build_layer(hidden, intermediate, experts, implementation, dtype, device):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                           num_experts_per_tok=2)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    layer = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.02)
    return layer.to(device=device, dtype=dtype).requires_grad_(False)


def with_lora(layer, kind: str, rank: int):
    from peft import LoraConfig, inject_adapter_in_model

    layer = copy.deepcopy(layer)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        target_modules=[])
    layer = inject_adapter_in_model(config, layer)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_B" in name:  # non-zero, as after some training
                param.normal_(0, 0.01)
    if kind == "ours":
        from finetune.moe.expert_lora import use_routed_expert_lora

        assert use_routed_expert_lora(layer) == 1
    return layer


class PeakMemory:
    """Peak memory added during a block: CUDA allocator peak, or sampled resident memory on CPU."""

    def __init__(self, device):
        self.device = device
        self.added = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        _trim()
        self.before = self.peak = _rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() - self.before
        else:
            self.done.set()
            self.thread.join()
            self.added = max(self.peak, _rss()) - self.before


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def step(layer, x, grad):
    out = layer(x)
    out.backward(grad)
    x.grad = None
    for param in layer.parameters():
        param.grad = None


def with_nf4_experts(layer):
    """The layer with its expert stacks replaced by NF4 ones, quantized from the same weights."""
    from finetune.moe.nf4 import NF4ExpertStack

    experts = next(m for m in layer.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts"))
    for name in ("gate_up_proj", "down_proj"):
        dense = getattr(experts, name).detach()
        stack = NF4ExpertStack.from_experts(iter(dense), tuple(dense.shape), dense.dtype, dense.device)
        setattr(experts, name, torch.nn.Parameter(stack, requires_grad=False))
    return layer


def expert_bytes(layer) -> tuple[int, int]:
    """(bytes the expert stacks take, bytes they would take in bf16)."""
    from finetune.moe.nf4 import NF4ExpertStack

    stacks = [p for n, p in layer.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    stored = sum(p.stored_bytes if isinstance(p, NF4ExpertStack) else p.nbytes for p in stacks)
    return stored, sum(2 * p.numel() for p in stacks)


def bench_layer(shape: str, dtype, device, rounds: int, rank: int, implementation: str, nf4: bool = False) -> dict:
    hidden, intermediate, experts, tokens = SHAPES[shape]
    frozen = build_layer(hidden, intermediate, experts, implementation, dtype, device)
    variants = {"frozen": frozen, "peft": with_lora(frozen, "peft", rank), "ours": with_lora(frozen, "ours", rank)}
    if nf4:
        variants["nf4"] = with_nf4_experts(with_lora(frozen, "ours", rank))
    torch.manual_seed(1)
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    times = {name: [] for name in variants}
    memory = {name: [] for name in variants}
    for name, layer in variants.items():  # warm-up (kernels, allocator)
        step(layer, x, grad)
    for _ in range(rounds):
        for name, layer in variants.items():
            with PeakMemory(device) as peak:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(layer, x, grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            memory[name].append(peak.added)
    return {name: (statistics.median(times[name]), statistics.median(memory[name]), expert_bytes(layer))
            for name, layer in variants.items()}


def report_layer(result: dict, shape: str, dtype, device, implementation: str) -> None:
    hidden, intermediate, experts, tokens = SHAPES[shape]
    print(f"\nMoE layer forward+backward: hidden {hidden}, intermediate {intermediate}, {experts} experts, top-2, "
          f"{tokens} tokens, {str(dtype).replace('torch.', '')}, {device.type}, frozen path {implementation}")
    print(f"{'variant':<8} {'step (ms)':>10} {'peak added (MiB)':>17} {'x frozen time':>14}")
    for name, (seconds, added, _) in result.items():
        print(f"{name:<8} {seconds * 1000:>10.1f} {added / MIB:>17.1f} {seconds / result['frozen'][0]:>14.2f}")
    frozen_t, frozen_m, _ = result["frozen"]
    peft_t, peft_m, _ = result["peft"]
    ours_t, ours_m, (ours_bytes, bf16_bytes) = result["ours"]
    extra_peft, extra_ours = peft_m - frozen_m, ours_m - frozen_m
    print(f"ours / frozen time: {ours_t / frozen_t:.3f}   (CPU target <= 1.15)")
    print(f"PEFT / ours time:   {peft_t / ours_t:.2f} x  (GPU target >= 1.5)")
    ratio = extra_ours / extra_peft if extra_peft > 0 else float("nan")
    print(f"extra memory over frozen: ours {extra_ours / MIB:.1f} MiB, PEFT {extra_peft / MIB:.1f} MiB, "
          f"ratio {ratio:.3f}   (target <= 0.1)")
    if "nf4" in result:
        nf4_t, nf4_m, (nf4_bytes, _) = result["nf4"]
        print(f"expert weights: bf16 {bf16_bytes / MIB:.1f} MiB, ours as held ({str(dtype).replace('torch.', '')}) "
              f"{ours_bytes / MIB:.1f} MiB, nf4 {nf4_bytes / MIB:.1f} MiB: nf4 / bf16 {nf4_bytes / bf16_bytes:.3f}"
              "   (target <= 0.30)")
        print(f"nf4 / ours time: {nf4_t / ours_t:.2f}   (CPU target <= 1.5); peak added during the step: "
              f"nf4 {nf4_m / MIB:.1f} MiB, ours {ours_m / MIB:.1f} MiB")


def bench_sft(steps: int) -> None:
    """Tokens/s of the tiny SFT recipe, ours vs PEFT's expert path, alternating runs in this process."""
    import tempfile

    from finetune.model.tiny import make_tiny_mixtral
    from finetune.recipe.loading import load_recipe
    from finetune.sft import build

    work = Path(tempfile.mkdtemp())
    base = make_tiny_mixtral(work / "base", seed=0, pretrain_steps=0)
    rates = {"peft": [], "routed": []}
    for _ in range(2):
        for kernel in rates:
            recipe = load_recipe("recipes/tiny/sft.yaml", [
                f"model={base}", f"output_dir={work / kernel}", "resume=never", "launch=null",
                f"train.max_steps={steps}", "train.eval_strategy=no", "train.save_strategy=no",
                "train.logging_steps=1000", "train.report_to=none", f"lora.expert_kernel={kernel}",
                "train.disable_tqdm=true"])
            trainer, _ = build(recipe)
            start = time.perf_counter()
            trainer.train()
            rates[kernel].append(trainer._total_train_tokens / (time.perf_counter() - start))
    peft, ours = max(rates["peft"]), max(rates["routed"])
    print(f"\ntiny SFT recipe, {steps} steps (best of 2 alternating runs): ours {ours:,.0f} tokens/s, "
          f"PEFT's path {peft:,.0f} tokens/s, ratio {ours / peft:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="default: h1024 on CPU, mixtral on CUDA")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--implementation", choices=["grouped_mm", "eager"], default="grouped_mm",
                        help="transformers' experts kernel for the frozen layer and PEFT's path")
    parser.add_argument("--sft-steps", type=int, default=0, help="also time the tiny SFT recipe for this many steps")
    parser.add_argument("--nf4", action="store_true", help="also ours with 4-bit NF4 expert weights")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("mixtral" if device.type == "cuda" else "h1024")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    result = bench_layer(shape, dtype, device, args.rounds, args.rank, args.implementation, args.nf4)
    report_layer(result, shape, dtype, device, args.implementation)
    if args.sft_steps:
        bench_sft(args.sft_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
