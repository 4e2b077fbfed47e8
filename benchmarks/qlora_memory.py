"""Peak memory of `python -m finetune.sft` with a 4-bit base (`quantization=nf4`) vs the same pass on the
unquantized base, at three model sizes: loading and training both, as a user runs the command.

    python benchmarks/qlora_memory.py [--layers 4 9 19] [--hidden 512] [--experts 8] [--steps 2]

Builds fp32 Mixtrals of about 0.4, 0.8 and 1.6 GB (hidden 512, 8 experts, 100 MB shards, the original
checkpoint layout) and runs the tiny SFT recipe on each for a few steps, each run in a fresh process, the
defaults on (gradient checkpointing, eval off to keep it short). A thread samples the resident memory
every 2 ms: what counts is the peak during the pass minus the resident memory after the imports.
Expected: the unquantized pass grows by the model's fp32 bytes (4 per weight); the 4-bit pass by its
4-bit bytes (about 0.56 per weight), loading included: the loader never holds more than one expert's
matrix in 16/32 bits, so no layer-sized bump appears on top.
"""

import argparse
from pathlib import Path

from export_memory import MIB, each_size, peak_rss

IMPORTS = "import torch, transformers, peft, trl, bitsandbytes, finetune.sft"
RUN = ("finetune.sft.main(['recipes/tiny/sft.yaml', 'model={base}', 'output_dir={out}', 'resume=never', "
       "'launch=null', 'quantization={quantization}', 'train.max_steps={steps}', 'train.eval_strategy=no', "
       "'train.save_strategy=no', 'train.per_device_train_batch_size=4', 'data.max_length=256', "
       "'train.report_to=none', 'train.disable_tqdm=true'])")
ROOT = Path(__file__).resolve().parent.parent


def measure(work: Path, layers: int, args) -> dict:
    from finetune.model.tiny import make_tiny_mixtral

    base = make_tiny_mixtral(work / "base", seed=0, max_shard_size="100MB", layers=layers, experts=args.experts,
                             hidden=args.hidden, intermediate=3 * args.hidden, heads=8, kv_heads=2, pretrain_steps=0)
    size = sum(s.stat().st_size for s in base.glob("model-*.safetensors")) / MIB
    row = {"layers": layers, "size": size}
    for quantization in ("none", "nf4"):
        code = RUN.format(base=base, out=work / quantization, quantization=quantization, steps=args.steps)
        row["before"], row[quantization], _ = peak_rss(code, IMPORTS, cwd=ROOT)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 9, 19])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rows = each_size(measure, args)
    print(f"{rows[0]['before']:.0f} MiB resident after imports; peak resident memory added by the SFT pass "
          f"({args.steps} steps, loading included):")
    print("| layers | checkpoint fp32 (MiB) | unquantized (MiB) | 4-bit (MiB) | 4-bit / unquantized |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['size']:.0f} | {r['none']:.0f} | {r['nf4']:.0f} | {r['nf4'] / r['none']:.2f} |")
    first, last = rows[0], rows[-1]
    grown = last["size"] - first["size"]
    print(f"growth per MiB of fp32 checkpoint, {first['size']:.0f} -> {last['size']:.0f} MiB: unquantized "
          f"{(last['none'] - first['none']) / grown:.2f}, 4-bit {(last['nf4'] - first['nf4']) / grown:.2f} "
          f"(4-bit weights: {0.5625 / 4:.2f} of fp32)")


if __name__ == "__main__":
    main()
