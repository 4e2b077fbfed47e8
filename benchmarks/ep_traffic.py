"""Bytes each process sends per micro-step, ZeRO-3 against expert parallelism, measured and planned.

    python benchmarks/ep_traffic.py             # 2 CPU processes (gloo), 4 optimizer steps each
    python benchmarks/ep_traffic.py --steps 6

The same tiny Mixtral (seeded; 4 experts), the same packed rows of the bundled chat data (2 rows of 256 tokens
per process per micro-step, gradient checkpointing on), LoRA on attention and experts with the router in full,
trained by `finetune sft` twice as a user launches it: under recipes/accelerate/cpu_zero3.yaml (DeepSpeed
ZeRO-3) and under recipes/accelerate/cpu_ep.yaml with `expert_parallel=2`. In each process, torch.distributed's
collectives are wrapped before anything uses them, and every call between the start and the end of training is
counted as the bytes this process sends (DDP's gradient all-reduce through torch's default comm hook, which
calls the same `all_reduce`; ring algorithms: an all-gather sends its input to each of the N-1
others, a reduce-scatter (N-1)/N of its input, an all-reduce twice that, an all-to-all every split but its own).

Printed: bytes per micro-step by collective for both runs, the measured ZeRO-3 / EP ratio, and the ratio
`finetune plan` states for the same recipe (finetune/planning/traffic.py). The two ratios must agree within
1.5x; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MICRO_BATCH, MAX_LENGTH = 2, 256
LAUNCHES = {"zero3": ("recipes/accelerate/cpu_zero3.yaml", []),
            "ep": ("recipes/accelerate/cpu_ep.yaml", ["expert_parallel=2"])}


def overrides(model_dir: Path, out: Path, steps: int) -> list[str]:
    return [f"model={model_dir}", f"output_dir={out}", "resume=never", "launch=null", "data.eval=[]",
            "data.eval_fraction=0", "data.packing=true", f"data.max_length={MAX_LENGTH}",
            f"train.per_device_train_batch_size={MICRO_BATCH}", "train.gradient_accumulation_steps=1",
            f"train.max_steps={steps}", "train.save_strategy=no", "train.eval_strategy=no", "train.logging_steps=1",
            "train.gradient_checkpointing=true"]


# ---------------------------------------------------------------------------------------------------------
# Inside each launched process


class Meter:
    """Bytes this process sends, by collective, while `counting`."""

    def __init__(self):
        self.sent: Counter = Counter()
        self.counting = False

    def wrap(self, dist) -> None:
        import inspect

        def size(t):
            return t.numel() * t.element_size()

        def share(a):  # (N-1)/N of the group
            n = dist.get_world_size(a.get("group"))
            return (n - 1) / n

        def all_to_all_single(a):
            inp, n = a["input"], dist.get_world_size(a.get("group"))
            splits = a.get("input_split_sizes") or [inp.shape[0] // n] * n
            return size(inp) / max(inp.shape[0], 1) * (sum(splits) - splits[dist.get_rank(a.get("group"))])

        counts = {  # bytes this process sends, from the call's arguments by name
            "all_gather_into_tensor": lambda a: size(a["input_tensor"]) * share(a) * dist.get_world_size(a.get("group")),
            "all_gather": lambda a: size(a["tensor"]) * share(a) * dist.get_world_size(a.get("group")),
            "reduce_scatter_tensor": lambda a: size(a["input"]) * share(a),
            "reduce_scatter": lambda a: sum(map(size, a["input_list"])) * share(a),
            "all_reduce": lambda a: 2 * size(a["tensor"]) * share(a),
            "all_to_all_single": all_to_all_single,
            "broadcast": lambda a: size(a["tensor"]) * (dist.get_world_size(a.get("group")) - 1)
            if dist.get_rank() == a.get("src") else 0,
            "gather": lambda a: 0 if dist.get_rank() == a.get("dst", 0) else size(a["tensor"]),
        }
        for name, count in counts.items():
            original = getattr(dist, name)
            signature = inspect.signature(original)

            def counted(*args, _original=original, _count=count, _name=name, _signature=signature, **kwargs):
                if self.counting:
                    self.sent[_name] += _count(_signature.bind(*args, **kwargs).arguments)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def run(kind: str, model_dir: Path, out: Path, steps: int) -> None:
    import torch.distributed as dist

    meter = Meter()
    meter.wrap(dist)  # before DeepSpeed or accelerate keep a reference to any collective
    from transformers import TrainerCallback

    from finetune.recipe.loading import load_recipe
    from finetune.sft import build

    class Count(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            meter.counting = True
            if hasattr(trainer.model_wrapped, "register_comm_hook"):  # DDP: its all-reduce through dist.all_reduce
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                trainer.model_wrapped.register_comm_hook(None, allreduce_hook)

        def on_train_end(self, *args, **kwargs):
            meter.counting = False

    recipe = load_recipe("recipes/tiny/sft.yaml", overrides(model_dir, out, steps) + LAUNCHES[kind][1],
                         expect_kind="sft")
    trainer, _ = build(recipe)
    trainer.add_callback(Count())
    trainer.train()
    micro_steps = trainer.state.global_step  # no accumulation: one micro-step per optimizer step
    report = {"bytes_per_micro_step": {k: v / micro_steps for k, v in meter.sent.items()}, "micro_steps": micro_steps}
    (out / f"traffic_rank{dist.get_rank()}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------------------
# The comparison


def launch(kind: str, model_dir: Path, work: Path, steps: int) -> dict:
    out = work / kind
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["accelerate", "launch", "--config_file", LAUNCHES[kind][0], __file__, "--run", kind,
               "--model", str(model_dir), "--out", str(out), "--steps", str(steps)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the {kind} run failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    reports = [json.loads((out / f"traffic_rank{r}.json").read_text()) for r in (0, 1)]
    kinds = sorted({k for r in reports for k in r["bytes_per_micro_step"]})
    return {k: sum(r["bytes_per_micro_step"].get(k, 0) for r in reports) / len(reports) for k in kinds}


def planned_ratio(model_dir: Path) -> tuple[float, str]:
    """`finetune plan`'s ZeRO-3 / EP ratio for the EP recipe on 2 CPU processes, and its traffic lines."""
    command = [sys.executable, "-m", "finetune.plan", "recipes/tiny/sft.yaml", f"model={model_dir}",
               "expert_parallel=2", "launch=recipes/accelerate/cpu_ep.yaml", f"data.max_length={MAX_LENGTH}",
               f"train.per_device_train_batch_size={MICRO_BATCH}", "--gpus", "2", "--device", "cpu"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: finetune plan failed:\n{proc.stderr[-2000:]}")
    lines = proc.stdout[proc.stdout.index("sent per device"):].rstrip()
    zero3 = float(re.search(r"ZeRO-3 on the same devices instead: ([0-9.]+) ", lines)[1])  # the same unit
    ep = float(re.search(r"  total +([0-9.]+) += ", lines)[1])
    return zero3 / ep, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--run", choices=sorted(LAUNCHES), help=argparse.SUPPRESS)  # inside a launched process
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run(args.run, args.model, args.out, args.steps)
        return 0
    from finetune.model.tiny import make_tiny_mixtral

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny_mixtral(work / "base", seed=0)
        measured = {kind: launch(kind, model_dir, work, args.steps) for kind in LAUNCHES}
        planned, lines = planned_ratio(model_dir)
    print(f"bytes sent per process per micro-step ({MICRO_BATCH} packed rows x {MAX_LENGTH} tokens, 2 processes)")
    print(f"  {'collective':<26} {'ZeRO-3':>14} {'EP=2':>14}")
    for name in sorted(set(measured["zero3"]) | set(measured["ep"])):
        print(f"  {name:<26} {measured['zero3'].get(name, 0):>14,.0f} {measured['ep'].get(name, 0):>14,.0f}")
    totals = {kind: sum(values.values()) for kind, values in measured.items()}
    print(f"  {'total':<26} {totals['zero3']:>14,.0f} {totals['ep']:>14,.0f}")
    ratio = totals["zero3"] / totals["ep"]
    print(f"measured ZeRO-3 / EP: {ratio:.2f}x; planned: {planned:.2f}x; measured / planned: {ratio / planned:.2f}")
    print("finetune plan says:\n" + lines)
    if not 1 / 1.5 <= ratio / planned <= 1.5:
        print("error: the measured ratio is not within 1.5x of the plan's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
