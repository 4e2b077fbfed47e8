"""Memory and time of data preparation as `python -m finetune.check` runs it: bundled data vs 5000 and 20000
long conversations, first run (tokenize into the cache) vs second run (cache hit), side by side.

    python benchmarks/data_memory.py [--conversations 5000 20000] [--words 900]

Generates UltraChat-like conversations (3 user/assistant exchanges, long replies; about 1,700 tokens each,
8.4 M tokens for 5000) from the bundled chat text, builds a tiny model for the recipe's pre-flight, then runs
the check command in fresh processes. Resident memory is sampled every 5 ms from /proc: the check process
itself (RSS), and the sum over it and the processes it started, datasets' tokenizing workers (PSS: forked
workers share pages, which RSS would count once per process).
Targets: the 5000-conversation run's peak over the bundled-data run's <= 60 MB; the second run's data
preparation <= 0.3 x the first run's; the check process's peak flat as the data grows 4x.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MIB = 1024**2
ROOT = Path(__file__).resolve().parent.parent


def conversations(path: Path, count: int, words: int, seed: int = 0) -> None:
    """`count` conversations of 3 exchanges, ~`words` words each, from the bundled chat text's vocabulary."""
    vocabulary = []
    for line in (ROOT / "data" / "chat" / "train.jsonl").read_text().splitlines():
        for message in json.loads(line)["messages"]:
            vocabulary += message["content"].split()
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choices(vocabulary, k=n))

    with path.open("w") as f:
        for _ in range(count):
            messages = []
            for _ in range(3):
                messages.append({"role": "user", "content": text(words // 12)})
                messages.append({"role": "assistant", "content": text(words // 4)})
            f.write(json.dumps({"messages": messages}) + "\n")


def run(command: list[str]) -> dict:
    """Wall time, peak RSS of the process and of its whole tree, and its output."""
    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    main_peak = tree_peak = 0
    while proc.poll() is None:
        try:
            main = proc.memory_info().rss
            # Proportional set size: the workers are forked, and RSS would count the pages they share N times.
            tree = sum(p.memory_full_info().pss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
        main_peak, tree_peak = max(main_peak, main), max(tree_peak, tree)
        time.sleep(0.005)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    prep = re.search(r"data cache \S+ \((?:opened|tokenized and saved) in ([\d.]+) s\)", output)
    return {"wall": time.perf_counter() - start, "main": main_peak / MIB, "tree": tree_peak / MIB,
            "prep": float(prep.group(1)), "output": output}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, nargs="+", default=[5000, 20000],
                        help="dataset sizes; the targets are read at the first")
    parser.add_argument("--words", type=int, default=900, help="words per conversation")
    args = parser.parse_args()
    from finetune.model.tiny import make_tiny_mixtral

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_mixtral(work / "model", seed=0)
        check = [sys.executable, "-m", "finetune.check", "recipes/tiny/sft.yaml", f"model={model}",
                 f"output_dir={work / 'run'}"]
        bundled = run([*check, f"data.cache_dir={work / 'cache-bundled'}"])
        rows = []
        for count in args.conversations:
            big = work / f"ultrachat-like-{count}.jsonl"
            conversations(big, count, args.words)
            large = [*check, f"data.train=[{{path: {big}}}]", "data.max_length=4096",
                     f"data.cache_dir={work / f'cache-{count}'}"]
            first, second = run(large), run(large)
            tokens = int(re.search(r"tokens\s+(\d+) per epoch", first["output"]).group(1))
            rows.append((count, tokens, big.stat().st_size / MIB, first, second))
    print("| run | tokens | data prep (s) | wall (s) | peak RSS, check process (MiB) | peak PSS, with workers (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| bundled data (2,200 rows) | | {bundled['prep']:.2f} | {bundled['wall']:.1f} | {bundled['main']:.0f} | "
          f"{bundled['tree']:.0f} |")
    for count, tokens, mib, first, second in rows:
        for name, r in ((f"{count} conversations ({mib:.0f} MiB), first run", first),
                        (f"{count} conversations, cache hit", second)):
            print(f"| {name} | {tokens / 1e6:.1f} M | {r['prep']:.2f} | {r['wall']:.1f} | {r['main']:.0f} | {r['tree']:.0f} |")
    count, tokens, _, first, second = rows[0]
    print(f"at {count} conversations: peak RSS over the bundled-data run {first['main'] - bundled['main']:+.0f} MiB "
          f"(target <= 60 MB), cache hit {second['main'] - bundled['main']:+.0f} MiB; cache hit / first run, data "
          f"preparation {second['prep'] / first['prep']:.3f} (target <= 0.3), whole command "
          f"{second['wall'] / first['wall']:.2f}")
    if len(rows) > 1:
        (c0, t0, _, f0, _), (c1, t1, _, f1, _) = rows[0], rows[-1]
        print(f"from {c0} to {c1} conversations ({t1 / t0:.1f}x the tokens): check process peak "
              f"{f1['main'] - f0['main']:+.0f} MiB, first-run preparation {f1['prep'] / f0['prep']:.1f}x")


if __name__ == "__main__":
    main()
