"""Whole SFT steps on the CPU: `finetune sft` as built by finetune/sft.py against plain TRL + PEFT.

    python benchmarks/sft_step.py                  # 5 interleaved rounds of 10 optimizer steps each
    python benchmarks/sft_step.py --rounds 3 --steps 6

The same hidden-512, 8-expert, 4-layer Mixtral (seeded), the same tokenized rows of the bundled chat data
(labels on the assistant replies only), the same batch (8 rows), optimizer, learning rate and gradient
checkpointing, and the same trained groups: LoRA r=16 on attention q/k/v/o and the fused experts, the router
in full (`modules_to_save`), Mixtral's load-balancing loss at 0.02. Plain TRL + PEFT is what a user would
write without this toolkit: `SFTTrainer` on a `get_peft_model` model with `output_router_logits`.

Each round trains a fresh trainer of each kind for the same steps, each in its own process as a user runs
one command, one after the other (which one first alternates by round), so the ratio compares like with like
on a noisy machine; tokens/s is the trained tokens (TRL's `num_tokens`, the same batches in both) over the
wall time of `trainer.train()`. It prints both first-step losses, which must be equal (the same batch, the same
weights), and the median over rounds of each round's tokens/s ratio (a round's two runs share the machine's
state, so their ratio is steadier than the ratio of two medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTH = {"layers": 4, "experts": 8, "hidden": 512, "intermediate": 1792, "heads": 8, "kv_heads": 2}
BATCH, LR, SEED, MAX_LENGTH, AUX = 8, 1e-4, 0, 512, 0.02
COMMON = {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR,
          "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": SEED, "logging_steps": 1,
          "logging_first_step": True, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
          "disable_tqdm": True, "gradient_checkpointing": True, "bf16": False,  # TRL turns bf16 on by default
          "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def ours(model_dir: Path, out: Path, steps: int):
    from finetune.recipe.loading import load_recipe
    from finetune.sft import build

    train = {**COMMON, "max_steps": steps}
    overrides = [f"model={model_dir}", f"output_dir={out}", "resume=never", "launch=null", "data.eval=[]",
                 "data.eval_fraction=0", f"data.max_length={MAX_LENGTH}", "lora.r=16", "lora.lora_alpha=32",
                 f"moe.aux_loss_coef={AUX}", "trainable=[attention,experts,router]"]
    overrides += [f"train.{key}={json.dumps(value)}" for key, value in train.items()]
    trainer, encoder = build(load_recipe("recipes/tiny/sft.yaml", overrides, expect_kind="sft"))
    return trainer, encoder, trainer.train_dataset


def plain_trl(model_dir: Path, out: Path, steps: int, dataset, tokenizer):
    """What a user writes with TRL and PEFT alone, on the rows our data step produced."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = AUX
    set_seed(SEED)
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"], modules_to_save=["gate"])
    args = SFTConfig(output_dir=str(out), max_steps=steps, max_length=MAX_LENGTH, router_aux_loss_coef=AUX,
                     dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, **COMMON)
    return SFTTrainer(model=get_peft_model(model, lora), args=args, train_dataset=dataset, processing_class=tokenizer)


def timed(trainer) -> tuple[float, float]:
    """(tokens/s, first logged loss) of one `trainer.train()`."""
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    lines = [line for line in trainer.state.log_history if "loss" in line and "num_tokens" in line]
    return lines[-1]["num_tokens"] / seconds, lines[0]["loss"]


def run_one(kind: str, model_dir: Path, out: Path, steps: int, rows: Path) -> dict:
    """One trainer, in this process: ours writes the tokenized rows for plain TRL to read."""
    if kind == "ours":
        trainer, encoder, dataset = ours(model_dir, out, steps)
        if not (rows / "rows").exists():
            dataset.save_to_disk(rows / "rows")
            encoder.hf_tokenizer.save_pretrained(rows / "tokenizer")
    else:
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        trainer = plain_trl(model_dir, out, steps, load_from_disk(rows / "rows"),
                            AutoTokenizer.from_pretrained(rows / "tokenizer"))
    rate, loss = timed(trainer)
    return {"rate": rate, "loss": loss}


def in_own_process(kind: str, model_dir: Path, out: Path, steps: int, rows: Path) -> dict:
    """`run_one` in a fresh Python, as a user runs one training command: what one trainer leaves behind in
    the allocator and thread pools (measured: 10-15% on the next one's speed) never reaches the other."""
    proc = subprocess.run([sys.executable, __file__, "--run", kind, "--model", str(model_dir), "--out", str(out),
                           "--steps", str(steps), "--rows", str(rows)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: the {kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--run", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one run, for in_own_process
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.chdir(ROOT)
    if options.run:
        print(json.dumps(run_one(options.run, options.model, options.out, options.steps, options.rows)))
        return 0
    from finetune.model.tiny import make_tiny_mixtral

    work = Path(tempfile.mkdtemp(prefix="sft-step-"))
    model_dir = make_tiny_mixtral(work / "base", seed=0, **WIDTH)
    rates = {"ours": [], "trl": []}
    ratios, first = [], {}
    for round_index in range(options.rounds):
        # The order alternates by round (ours first in round 1, which writes the rows plain TRL reads).
        order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
        for kind in order:
            result = in_own_process(kind, model_dir, work / f"{kind}-{round_index}", options.steps, work)
            rates[kind].append(result["rate"])
            first.setdefault(kind, result["loss"])
        ratios.append(rates["ours"][-1] / rates["trl"][-1])
        print(f"round {round_index + 1}: ours {rates['ours'][-1]:,.0f} tokens/s, plain TRL + PEFT "
              f"{rates['trl'][-1]:,.0f} tokens/s", flush=True)
    ours_rate, trl_rate = statistics.median(rates["ours"]), statistics.median(rates["trl"])
    print(f"\nhidden {WIDTH['hidden']}, {WIDTH['experts']} experts, {WIDTH['layers']} layers, batch {BATCH}, "
          f"{options.steps} steps x {options.rounds} rounds (median)")
    print(f"first-step loss: ours {first['ours']:.6f}, plain TRL + PEFT {first['trl']:.6f}")
    print(f"tokens/s: ours {ours_rate:,.0f}, plain TRL + PEFT {trl_rate:,.0f}; ratio, median of the rounds' own "
          f"ratios: {statistics.median(ratios):.2f} (each round: {', '.join(f'{r:.2f}' for r in ratios)})")
    same = abs(first["ours"] - first["trl"]) <= 1e-4 * abs(first["trl"])
    if not same:
        print("error: the first-step losses differ on the same batch", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
