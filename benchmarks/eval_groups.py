"""What the per-language and per-task figures cost `python -m finetune.evaluate`: time and peak memory of the
command as a user runs it (the whole bundled suite: held-out loss, preferences, generation, report and
heatmaps), in this tree and in a git commit's from before them, on the bundled rows and on 4x as many.

    python benchmarks/eval_groups.py --against 38b1ba6 [--rounds 2] [--hidden 128] [--scale 4]

Both trees read the same suite files (this tree's five-language data, by absolute path), so the difference
is the grouping: per-row routed-token counts and per-group sums from the forwards evaluation runs anyway.
Each run is a fresh process, the trees alternating (this machine is noisy); peak memory is measured as in
export_memory.py. Targets: on the larger suite, time within 5% of the commit's (on the smaller one the two
more heatmaps, about 0.7 s, are a visible fixed cost); memory not growing with the rows beyond what the
commit's grows (the groups hold layers x experts counts per group, not per row).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export_memory import peak_rss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = "import time, torch, transformers, peft, finetune.evaluate"
EVALUATE = ("start = time.perf_counter()\n"
            "finetune.evaluate.main([{model!r}, '--suite', {suite!r}, '--out', {out!r}, '--overwrite'])\n"
            "print('SECONDS', time.perf_counter() - start)")


def suite(work: Path, scale: int) -> Path:
    """The bundled suite's files repeated `scale` times, with its other keys (lm-eval left out)."""
    folder = work / f"suite-x{scale}"
    folder.mkdir()
    files = {"chat": "data/chat/eval.jsonl", "preferences": "data/preferences/eval.jsonl",
             "instructions": "eval/instructions.jsonl"}
    lines = [f"name: bundled-x{scale}", "max_length: 256", "batch_size: 16", "max_new_tokens: 24"]
    for key, path in files.items():
        (folder / f"{key}.jsonl").write_text((ROOT / path).read_text() * scale)
        lines.append(f"{key}: {folder / f'{key}.jsonl'}")
    (folder / "suite.yaml").write_text("\n".join(lines) + "\n")
    return folder / "suite.yaml"


def measure(tree: Path, model: Path, suite_file: Path, out: Path) -> tuple[float, float]:
    _, added, stdout = peak_rss(EVALUATE.format(model=str(model), suite=str(suite_file), out=str(out)), IMPORTS,
                                cwd=tree)
    seconds = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("SECONDS")))
    return seconds, added


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="a git commit from before the per-group figures")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="tiny model width (the demo's)")
    parser.add_argument("--scale", type=int, default=4, help="the larger suite is the bundled rows this many times")
    args = parser.parse_args()

    from finetune.model.tiny import make_tiny_mixtral

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_mixtral(work / "model", seed=0, hidden=args.hidden, intermediate=2 * args.hidden)
        suites = {1: suite(work, 1), args.scale: suite(work, args.scale)}
        tree = work / "against"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.against], cwd=ROOT, check=True)
        results: dict = {}
        try:
            for _ in range(args.rounds):
                for scale, suite_file in suites.items():
                    for name, where in (("this tree", ROOT), (args.against, tree)):
                        results.setdefault((name, scale), []).append(
                            measure(where, model, suite_file, work / "out"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)

    print(f"finetune.evaluate on the bundled suite (tiny Mixtral, hidden {args.hidden}), median of {args.rounds}")
    print(f"{'tree':<12} {'rows':>5} {'seconds':>8} {'peak MiB added':>15}")
    median = {key: (statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs))
              for key, runs in results.items()}
    for (name, scale), (seconds, added) in median.items():
        print(f"{name:<12} {200 * scale:>5} {seconds:>8.1f} {added:>15.0f}")
    for scale in suites:
        (ours, ours_mem), (theirs, theirs_mem) = median["this tree", scale], median[args.against, scale]
        target = " (target <= 1.05)" if scale == args.scale else ""
        print(f"{200 * scale} rows: time ratio {ours / theirs:.3f}{target}, memory ratio "
              f"{ours_mem / theirs_mem:.3f}")
    growth = {name: median[name, args.scale][1] - median[name, 1][1] for name in ("this tree", args.against)}
    print(f"peak memory growth from 200 to {200 * args.scale} rows: this tree {growth['this tree']:+.0f} MiB, "
          f"{args.against} {growth[args.against]:+.0f} MiB")


if __name__ == "__main__":
    main()
