"""Tokens/s of tiny SFT on real (non-pad) tokens, packed (`data.packing=true`) vs padded, on an
UltraChat-like length mix, side by side in one run.

    python benchmarks/packing.py [--conversations 800] [--steps 30] [--rounds 2] [--hidden 64]

The data: conversations with one to three user turns of 10-200 tokens and replies of 5 to 2000 tokens,
both log-uniform (UltraChat's replies are mostly a few hundred tokens, with a long tail), written to a
temporary JSONL file. Both runs are `python -m finetune.sft recipes/tiny/sft.yaml` with `data.max_length`
4096, eval and saving off, the same seed; padded: micro-batch 4 samples (the collator pads each batch to
its longest sample); packed: micro-batch 1 row of up to 4096 tokens (TRL's best-fit-decreasing packing,
padding-free). Each run is a fresh process, the two alternate, and tokens/s is the mean of the logged
values (finetune/train/trainer.py counts non-pad tokens).
`--hidden 512` runs a wider tiny Mixtral (intermediate 3 x hidden, 8 heads): there the layers, which also
run on pad tokens, outweigh the LM head, which scores only trained positions in both runs, as in Mixtral
8x7B. The script also prints the share of pad tokens in padded batches of this mix.
Goal (issue #18): packed >= 1.5x padded.
"""

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the experts of each layer take two of every eight tokens while the router learns to keep them "
         "busy and the reply explains why in plain words with numbers like 12 and 340").split()


def text(tokens: int, rng: random.Random) -> str:
    # About 1.3 tokens per word with these words; the exact count does not matter, the spread does.
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / 1.3))))


def log_uniform(low: float, high: float, rng: random.Random) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        messages = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            messages.append({"role": "user", "content": text(log_uniform(10, 200, rng), rng)})
            messages.append({"role": "assistant", "content": text(log_uniform(5, 2000, rng), rng)})
        rows.append({"messages": messages})
    return rows


def tokens_per_second(stdout: str) -> float:
    values = [float(v) for v in re.findall(r"'tokens_per_second': '?([0-9.]+)", stdout)]
    if not values:
        raise SystemExit(f"no tokens_per_second in the log:\n{stdout[-2000:]}")
    return sum(values) / len(values)


def run(base: Path, data: Path, out: Path, steps: int, packed: bool) -> float:
    overrides = [f"model={base}", f"output_dir={out}", "resume=never", "launch=null",
                 f"data.train=[{{path: {data}}}]", "data.eval=[]", "data.eval_fraction=0", "data.max_length=4096",
                 f"data.packing={str(packed).lower()}", f"train.max_steps={steps}",
                 f"train.logging_steps={max(steps // 5, 1)}", f"train.per_device_train_batch_size={1 if packed else 4}",
                 "train.eval_strategy=no", "train.save_strategy=no", "train.report_to=none", "train.disable_tqdm=true"]
    proc = subprocess.run([sys.executable, "-m", "finetune.sft", "recipes/tiny/sft.yaml", *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"sft failed:\n{proc.stderr[-3000:]}")
    return tokens_per_second(proc.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=800)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()

    from finetune.data.chat_format import ChatEncoder, bundled_sentencepiece_path
    from finetune.model.tiny import make_tiny_mixtral

    rows = conversations(args.conversations)
    encoder = ChatEncoder(bundled_sentencepiece_path())
    lengths = sorted(len(encoder.encode(r["messages"]).input_ids) for r in rows)
    replies = sorted(len(encoder.sp.encode(m["content"])) for r in rows for m in r["messages"] if m["role"] == "assistant")
    speed = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = {} if args.hidden == 64 else {"hidden": args.hidden, "intermediate": 3 * args.hidden, "heads": 8}
        base = make_tiny_mixtral(work / "base", seed=0, max_positions=4096, **shape)
        data = work / "mix.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for _ in range(args.rounds):
            for packed in (False, True):
                speed[packed].append(run(base, data, work / f"out_{packed}", args.steps, packed))
                print(f"{'packed' if packed else 'padded'}: {speed[packed][-1]:,.0f} tokens/s", file=sys.stderr)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]

    padded, packed = (sum(speed[k]) / len(speed[k]) for k in (False, True))
    rng = random.Random(0)
    batches = [rng.sample(lengths, 4) for _ in range(2000)]  # what a shuffled padded micro-batch of 4 holds
    pads = 1 - sum(map(sum, batches)) / sum(4 * max(b) for b in batches)
    print(f"{len(rows)} conversations: sample tokens median {pct(lengths, 0.5)}, p90 {pct(lengths, 0.9)}, max "
          f"{lengths[-1]}; reply tokens min {replies[0]}, median {pct(replies, 0.5)}, max {replies[-1]}")
    print(f"padded micro-batches of 4 are {100 * pads:.0f}% pad tokens")
    print(f"tiny SFT (hidden {args.hidden}), {args.steps} steps x {args.rounds} interleaved rounds, real tokens/s: padded {padded:,.0f}, "
          f"packed {packed:,.0f}, packed / padded {packed / padded:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
