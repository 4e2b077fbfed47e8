"""Evaluate a model or an adapter on a suite: held-out loss, preferences, generation checks, router balance.

    python -m finetune.evaluate runs/tiny/sft --suite eval/bundled.yaml --out runs/eval/sft
    python -m finetune.evaluate runs/tiny/sft --suite eval/bundled.yaml --out runs/eval/sft-vs-base \\
        --baseline runs/tiny-mixtral --reference runs/tiny-mixtral
    python -m finetune.evaluate runs/tiny/sft --suite eval/bundled.yaml --out /tmp/quick limit=20

MODEL_OR_ADAPTER is a model folder or Hub id, or a PEFT adapter folder (loaded on its recorded base, or
on --base). What a suite (eval/*.yaml) can hold, each part optional:

* chat: conversations in the training format. Held-out loss and perplexity over the assistant replies
  (the training masks), token accuracy, and the router load per layer x expert on the real tokens.
* preferences: preference pairs. Preference accuracy (how often the implicit DPO reward of the chosen
  reply beats the rejected one's) and the mean reward margin, against a reference model: --reference, or
  else an adapter's own base. Also the reference-free accuracy (chosen reply more likely than rejected).
* instructions: prompts with an `answer` and verifiable `rules` (finetune/evaluation/rules.py). Greedy replies
  scored by exact match and by the rules, per rule and per prompt (all rules followed).
* lm_eval_tasks: lm-evaluation-harness tasks on local data files, through its HF model interface, run
  when `lm-eval` is installed and reported as skipped otherwise.

Writes DIR/metrics.json (every figure), DIR/generations.jsonl, DIR/router_load.png (heatmaps; the
baseline beside the model) and DIR/report.md. With --baseline both models run on the same suite, and
the console and the report show the figures side by side with their differences. Trailing `key=value`
items override suite keys (e.g. `limit=20`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.cli import invoked_as
from finetune.errors import InputError
from finetune.evaluation.loading import check_loadable
from finetune.evaluation.report import comparison_rows, text_table, write_outputs
from finetune.evaluation.run import check_format, evaluate
from finetune.evaluation.suite import load_suite, suite_files
from finetune.files.output_folder import check_output, staged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("evaluate"), description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model folder, Hub id, or adapter folder")
    parser.add_argument("--suite", required=True, help="suite YAML, e.g. eval/bundled.yaml")
    parser.add_argument("--out", help="new folder for metrics.json, report.md and the plots (required but with --plan)")
    parser.add_argument("--plan", action="store_true", help="print what evaluation needs on one GPU, load nothing")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of the GPU --plan assumes (default 80)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out when done")
    parser.add_argument("--baseline", help="a second model or adapter, evaluated on the same suite for comparison")
    parser.add_argument("--reference", help="reference model for preference rewards (default: an adapter's base)")
    parser.add_argument("--base", help="base model for adapters (default: the one the adapter records)")
    parser.add_argument("overrides", nargs="*", help="suite overrides, e.g. limit=20")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options

    suite = load_suite(args.suite, args.overrides)
    if args.plan:
        return print_plan(args, suite)
    if args.out is None:
        parser.error("the following arguments are required: --out")
    out = Path(args.out)
    inputs = {"model": args.model, "baseline": args.baseline, "reference": args.reference, "base": args.base,
              "suite": args.suite, **{f"suite file {p}": p for p in suite_files(suite)}}
    check_output(out, inputs, args.overwrite)
    for option, path in (("model", args.model), ("--baseline", args.baseline), ("--reference", args.reference)):
        if path is not None:
            check_loadable(path, args.base, option)
            check_format(suite, path, args.base)
    columns, all_records = [], []
    for name, path in [("model", args.model)] + ([("baseline", args.baseline)] if args.baseline else []):
        print(f"evaluating {name} {path} on suite {suite.name}")
        results, records = evaluate(path, suite, args.base, args.reference)
        columns.append((name, results))
        all_records += [{"model": name, **r} for r in records]
    with staged(out) as folder:
        report = write_outputs(folder, suite, columns, all_records, args.baseline is not None)
    report = out / report.name


    header = ["figure"] + [name for name, _ in columns] + (["difference"] if args.baseline else [])
    print(text_table(header, comparison_rows(columns)))
    plot = out / "router_load.png"
    print(f"wrote {out / 'metrics.json'}, {report}" + (f", {plot}" if plot.is_file() else ""))
    return 0


def print_plan(args, suite) -> int:
    """`--plan`: the memory evaluation needs on one GPU (finetune/planning/evaluation.py), nothing loaded."""
    import math

    from finetune.planning.evaluation import evaluation_plan, render

    if not math.isfinite(args.gpu_memory) or args.gpu_memory <= 0:
        raise InputError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    plan = evaluation_plan(args.model, args.base, suite.batch_size, suite.max_length, args.gpu_memory)
    print(render(plan, suite.batch_size, suite.max_length))
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
