"""How far each GGUF type moves the logits, against the tolerance `finetune export --gguf` checks.

    python benchmarks/gguf_fidelity.py [--pretrain-steps 300] [--layers 2 4]

Builds pretrained tiny Mixtrals (pretrained so the logits are a trained model's, not random ones), runs
`python -m finetune.export MODEL --gguf TYPE --out OUT` for each type as a user runs it (verification on),
and prints what the verification measured: max |logit difference| / max |logit| on the export's three chat
prompts, and the worst weight error as a fraction of its type's bound. Also the file size against F16.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TYPES = ("f16", "bf16", "q8_0", "q4_0")
REPORT = re.compile(r"= ([0-9.e+-]+) \(tolerance ([0-9.e+-]+)\); .*worst ([0-9]+)% of it, in ([\w.]+)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    from finetune.model.tiny import make_tiny_mixtral

    print("| model | type | logits: max abs diff / max abs | tolerance | worst weight error / bound | file / F16 |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            base = make_tiny_mixtral(Path(tmp) / f"base{layers}", seed=0, layers=layers,
                                     pretrain_steps=args.pretrain_steps)
            sizes = {}
            for kind in TYPES:
                out = Path(tmp) / f"{layers}-{kind}"
                run = subprocess.run([sys.executable, "-m", "finetune.export", str(base), "--gguf", kind, "--out",
                                      str(out)], capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"export --gguf {kind} failed:\n{run.stderr[-2000:]}")
                difference, tolerance, worst, tensor = REPORT.search(run.stdout).groups()
                sizes[kind] = next(out.glob("*.gguf")).stat().st_size
                print(f"| {layers} layers, pretrained {args.pretrain_steps} steps | {kind} | {float(difference):.2e} "
                      f"| {float(tolerance):g} | {worst}% ({tensor}) | {sizes[kind] / sizes['f16']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
