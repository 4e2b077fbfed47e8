"""`finetune.plan`'s per-process estimate against the peak resident memory of the training it plans: a
mid-size Mixtral on 2 CPU processes under DeepSpeed ZeRO-3, run as a user runs it.

    python benchmarks/plan_vs_measured.py [--layers 8] [--hidden 512] [--steps 3]

Builds a Mixtral of about 0.7 GB (fp32, 8 experts, hidden 512), plans recipes/tiny/sft.yaml on it for
2 processes (`--device cpu`: fp32 weights, no master copy), then runs `python -m finetune.sft` with
`launch: recipes/accelerate/cpu_zero3.yaml` (it relaunches itself under accelerate) for a few steps,
sampling every training process's resident memory every 10 ms, split at the line the pass prints once the
model is built (loading, then training).
Target: plan / measured peak within 1.5x either way, for the training total and for rank 0 while loading.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MIB, GIB = 1024**2, 1024**3
ROOT = Path(__file__).resolve().parent.parent


def training_memory(command: list[str]) -> tuple[list[dict], str]:
    """For each training process (LOCAL_RANK set, `finetune.sft` in its command line, parent not one of
    them), its peak RSS while loading (before the pass prints its batch line) and while training."""
    proc = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    samples: dict[int, list[tuple[float, int]]] = {}
    while proc.poll() is None:
        for child in proc.children(recursive=True):
            try:
                if ("LOCAL_RANK" in child.environ() and "finetune.sft" in " ".join(child.cmdline())
                        and "LOCAL_RANK" not in child.parent().environ()):
                    samples.setdefault(child.pid, []).append((time.monotonic(), child.memory_info().rss))
            except psutil.Error:
                continue
        time.sleep(0.01)
    reader.join()
    output = "".join(line for _, line in lines)
    if proc.returncode:
        raise SystemExit(f"training failed:\n{output[-4000:]}")
    loaded = next(t for t, line in lines if line.startswith("batch: "))
    return [{"loading": max(r for t, r in s if t <= loaded), "training": max(r for t, r in s if t > loaded)}
            for _, s in sorted(samples.items())], output


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--launch", default="recipes/accelerate/cpu_zero3.yaml", help="accelerate config (2 processes)")
    args = parser.parse_args()
    from finetune.model.tiny import make_tiny_mixtral

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_mixtral(work / "model", seed=0, max_shard_size="100MB", layers=args.layers, experts=8,
                                  hidden=args.hidden, intermediate=3 * args.hidden, heads=8, kv_heads=2)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        overrides = [f"model={model}", f"output_dir={work / 'run'}", f"launch={args.launch}",
                     "train.per_device_train_batch_size=4", f"data.cache_dir={work / 'cache'}"]
        plan = subprocess.run([sys.executable, "-m", "finetune.plan", "recipes/tiny/sft.yaml", *overrides,
                               "--gpus", "2", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, check=True)
        rows = re.findall(r"^  (\S.*?)\s+([0-9.]+)$", plan.stdout, re.MULTILINE)
        planned_loading = float(re.search(r"while loading, rank 0: ([0-9.]+) GiB", plan.stdout).group(1))
        peaks, output = training_memory([sys.executable, "-m", "finetune.sft", "recipes/tiny/sft.yaml", *overrides,
                                        f"train.max_steps={args.steps}", "train.eval_strategy=no",
                                        "train.save_strategy=no", "resume=never"])
    planned = float(dict(rows)["total"])
    training = max(p["training"] for p in peaks) / GIB
    loading = peaks[0]["loading"] / GIB
    print(f"model: {size / MIB:.0f} MiB fp32 ({args.layers} layers, hidden {args.hidden}, 8 experts); "
          f"2 CPU processes, ZeRO-3, micro-batch 4, {args.steps} steps")
    print("| per process | GiB |\n|---|---:|")
    for what, gib in rows:
        print(f"| plan: {what} | {float(gib):.2f} |")
    print(f"| plan: while loading, rank 0 | {planned_loading:.2f} |")
    for rank, peak in enumerate(peaks):
        print(f"| measured peak RSS, process {rank}: loading / training | {peak['loading'] / GIB:.2f} / "
              f"{peak['training'] / GIB:.2f} |")
    print(f"plan / measured, training: {planned / training:.2f}; loading (rank 0): {planned_loading / loading:.2f}"
          "   (target: between 0.67 and 1.5)")


if __name__ == "__main__":
    main()
