"""Peak memory of one SFT step on one long sample, as `python -m finetune.sft` runs it, with the LM head
scored in chunks (the default) and in one piece, at several sample lengths; and, with `--against REF`, the
tiny recipe's tokens/s in this tree against a git commit's (e.g. the last one before the chunked head).

    python benchmarks/long_context.py [--lengths 1024 8192 16384 30720] [--one-piece-up-to 8192]
                                      [--against 8103b21 --throughput-steps 150 --rounds 3]

The tiny Mixtral (hidden 64, 2 layers, 4 experts, 32000-token vocabulary, positions up to 32768) trains one
step on a single conversation whose reply fills the sample, so nearly every position is trained: the
case where an LM head that builds all of its logits at once holds tokens x 32000 fp32 numbers several
times over. Each run is a fresh process; a thread samples its resident memory every 2 ms, and what
counts is the peak during the command minus the resident memory after the imports. "one piece" sets
`finetune.model.lm_head.CHUNK_ROWS` above the sample length, so the head scores every position at once: what
the head cost before it was chunked. It runs only up to `--one-piece-up-to` tokens (at 30k it needs
about 18 GB).

The throughput runs are the tiny recipe as it ships (micro-batch 16, max_length 256, eval and saving off),
this tree and REF's (checked out in a temporary git worktree) alternating, each a fresh process; tokens/s
is the mean of the logged values.

Targets (issue #18): 30k tokens adds <= 1.5 GB over 1k tokens, growth linear in the length; the tiny
recipe's tokens/s within 5% of REF's.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from export_memory import peak_rss
from packing import tokens_per_second

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = "import torch, transformers, peft, trl, finetune.sft, finetune.model.lm_head"
STEP = ("finetune.sft.main(['recipes/tiny/sft.yaml', 'model={base}', 'output_dir={out}', 'resume=never', "
        "'launch=null', 'data.train=[{{path: {data}}}]', 'data.eval=[]', 'data.eval_fraction=0', "
        "'data.max_length=32768', 'train.max_steps=1', 'train.per_device_train_batch_size=1', "
        "'train.eval_strategy=no', 'train.save_strategy=no', 'train.report_to=none', 'train.disable_tqdm=true'])")
THROUGHPUT = ("finetune.sft.main(['recipes/tiny/sft.yaml', 'model={base}', 'output_dir={out}', 'resume=never', "
              "'launch=null', 'train.max_steps={steps}', 'train.logging_steps={every}', 'train.eval_strategy=no', "
              "'train.save_strategy=no', 'train.report_to=none', 'train.disable_tqdm=true'])")
ONE_PIECE = "finetune.model.lm_head.CHUNK_ROWS = 10**9\n"


def run(code: str, tree: Path = ROOT) -> tuple[float, float, str]:
    return peak_rss(code, IMPORTS, cwd=tree)


def long_conversation(length: int, encoder) -> dict:
    """One conversation of exactly `length` tokens, almost all of them the assistant's reply."""
    words = ("the router sends each token to two of eight experts and the reply goes on").split()

    def conversation(n: int) -> dict:
        reply = " ".join(words[i % len(words)] for i in range(n))
        return {"messages": [{"role": "user", "content": "Write a long text."},
                             {"role": "assistant", "content": reply}]}

    n = length
    for _ in range(6):  # tokens per word is nearly constant: a few corrections land on the length
        got = len(encoder.encode(conversation(n)["messages"]).input_ids)
        if got == length:
            break
        n += length - got if abs(length - got) < 8 else round(n * length / got) - n
    return conversation(n)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 16384, 30720])
    parser.add_argument("--one-piece-up-to", type=int, default=8192)
    parser.add_argument("--against", help="a git commit whose tiny-recipe tokens/s to compare with this tree's")
    parser.add_argument("--throughput-steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from finetune.data.chat_format import ChatEncoder, bundled_sentencepiece_path
    from finetune.model.tiny import make_tiny_mixtral

    encoder = ChatEncoder(bundled_sentencepiece_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = make_tiny_mixtral(work / "base", seed=0, max_positions=32768)
        for length in args.lengths:
            data = work / f"long_{length}.jsonl"
            data.write_text(json.dumps(long_conversation(length, encoder)) + "\n")
            step = STEP.format(base=base, out=work / f"out_{length}", data=data)
            row = {"length": length}
            row["before"], row["chunked"], _ = run(step)
            row["one_piece"] = run(ONE_PIECE + step)[1] if length <= args.one_piece_up_to else None
            rows.append(row)
            print(f"{length} tokens: chunked {row['chunked']:.0f} MiB, one piece {row['one_piece'] or 0:.0f} MiB",
                  file=sys.stderr, flush=True)

        speed = throughput(base, work, args) if args.against else None

    print(f"{rows[0]['before']:.0f} MiB resident after imports; peak resident memory added by one SFT step on one "
          "sample (tiny Mixtral, reply-only sample):")
    print("| sample (tokens) | chunked head (MiB) | one-piece head (MiB) | chunked / one piece |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        one = "not run" if r["one_piece"] is None else f"{r['one_piece']:.0f}"
        ratio = "" if r["one_piece"] is None else f"{r['chunked'] / r['one_piece']:.2f}"
        print(f"| {r['length']:,} | {r['chunked']:.0f} | {one} | {ratio} |")
    first, last = rows[0], rows[-1]
    print(f"chunked: {last['length']:,} tokens adds {last['chunked'] - first['chunked']:.0f} MiB over "
          f"{first['length']:,} (target <= 1500 MB = 1431 MiB)")
    slopes = [(b["chunked"] - a["chunked"]) / (b["length"] - a["length"]) * 1024 for a, b in zip(rows, rows[1:])]
    print("chunked growth per 1k tokens between successive lengths: " + ", ".join(f"{s:.1f} MiB" for s in slopes))
    measured = [r for r in rows if r["one_piece"] is not None]
    if len(measured) > 1:
        a, b = measured[0], measured[-1]
        print(f"one piece growth per 1k tokens, {a['length']:,} -> {b['length']:,}: "
              f"{(b['one_piece'] - a['one_piece']) / (b['length'] - a['length']) * 1024:.1f} MiB")
    if speed:
        ours, theirs = (sum(v) / len(v) for v in speed)
        print(f"tiny recipe ({args.throughput_steps} steps, {args.rounds} interleaved rounds): this tree "
              f"{ours:,.0f} tokens/s, {args.against} {theirs:,.0f} tokens/s, ratio {ours / theirs:.3f} (target >= 0.95)")


def throughput(base: Path, work: Path, args) -> tuple[list[float], list[float]]:
    """Tokens/s of the tiny recipe in this tree and in `args.against`'s, alternating."""
    tree = work / "against"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.against], cwd=ROOT, check=True)
    ours, theirs = [], []
    steps = args.throughput_steps
    try:
        for _ in range(args.rounds):  # interleaved: the machine's noise hits both alike
            for where, values in ((ROOT, ours), (tree, theirs)):
                code = THROUGHPUT.format(base=base, out=work / "speed", steps=steps, every=max(steps // 5, 1))
                values.append(tokens_per_second(run(code, where)[2]))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    return ours, theirs


if __name__ == "__main__":
    main()
