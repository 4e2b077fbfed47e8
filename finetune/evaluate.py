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
* instructions: prompts with an `answer` and verifiable `rules` (finetune/checkers.py). Greedy replies
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
import gc
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.checkers import check_rule, exact_match, validate_rules
from finetune.config import DataSource
from finetune.data import (
    BadRow,
    DataError,
    bad_rows_message,
    check_messages,
    encode_source,
    read_rows,
)
from finetune.errors import InputError
from finetune.eval_groups import GroupMeans, row_groups
from finetune.eval_report import comparison_rows, text_table, write_outputs
from finetune.output_folder import check_output, staged
from finetune.scoring import (
    LoadedModel,
    check_loadable,
    generate_replies,
    heldout_loss,
    load_for_eval,
    preference_logps,
)
from finetune.typed_yaml import build_dataclass, read_yaml_mapping


class SuiteError(InputError):
    """An evaluation suite that cannot run; the message names the suite file and the key."""


@dataclass
class Suite:
    """One evaluation suite: a YAML file in eval/. Paths are relative to the working directory, as in
    recipes."""

    name: str
    """Shown in reports."""
    chat: str | None = None
    """Conversations (.jsonl/.json/.parquet, training format) for held-out loss and router load."""
    preferences: str | None = None
    """Preference pairs (training format) for preference accuracy and reward margin."""
    instructions: str | None = None
    """Prompt rows {messages (ending with a user turn), answer, rules} for generation checks."""
    max_length: int = 2048
    """Longest sample in tokens; longer rows are reported as bad rows, never truncated."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_new_tokens: int = 64
    """Generation length limit per reply."""
    beta: float = 0.1
    """DPO beta for rewards: beta * log(policy / reference) of a reply."""
    limit: int | None = None
    """Use only the first N rows of each file (quick runs)."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names, run when lm-eval is installed."""
    lm_eval_include: str | None = None
    """Folder of lm-eval task YAMLs (local data files) registered before running `lm_eval_tasks`."""


def load_suite(path: str | Path, overrides: list[str] = ()) -> Suite:
    path = Path(path)
    suite = build_dataclass(Suite, read_yaml_mapping(path, overrides, "suite", SuiteError), str(path), "", SuiteError)
    for key in ("chat", "preferences", "instructions", "lm_eval_include"):
        value = getattr(suite, key)
        if value is not None and not Path(value).exists():
            raise SuiteError(f"{path}: {key}: {value} does not exist (paths are relative to the working directory)")
    if not (suite.chat or suite.preferences or suite.instructions or suite.lm_eval_tasks):
        raise SuiteError(f"{path}: nothing to evaluate: set chat, preferences, instructions or lm_eval_tasks")
    if suite.batch_size < 1 or suite.max_new_tokens < 1 or (suite.limit is not None and suite.limit < 1):
        raise SuiteError(f"{path}: batch_size, max_new_tokens and limit must be at least 1")
    return suite


# ----------------------------------------------------------------------------------------------
# Reading the suite's data


def suite_files(suite: Suite) -> list[str]:
    """The data files a suite reads (inputs an --out folder must keep clear of)."""
    return [p for p in (suite.chat, suite.preferences, suite.instructions, suite.lm_eval_include) if p]


def encoded(path: str, kind: str, loaded: LoadedModel, suite: Suite) -> list[dict]:
    samples, bad, _ = encode_source(DataSource(path), kind, loaded.encoder, suite.max_length, progress=False)
    if bad:
        raise DataError(f"suite {suite.name}, {path}: " + bad_rows_message(bad, with_fix=False))
    return samples[: suite.limit]


def instruction_rows(path: str, suite: Suite) -> list[dict]:
    rows, bad = [], []
    for where, row in read_rows(DataSource(path)):
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str) or "rules" not in row:
            bad.append(BadRow(where, "needs 'messages', 'answer' (text) and 'rules'"))
            continue
        reason = check_messages(row.get("messages"), ends_with="user") or validate_rules(row["rules"], "rules")
        if reason:
            bad.append(BadRow(where, reason))
        else:
            rows.append(row)
    if bad:
        raise DataError(f"suite {suite.name}, {path}: " + bad_rows_message(bad, with_fix=False))
    return rows[: suite.limit]


# ----------------------------------------------------------------------------------------------
# The parts of a suite


def reference_logps(loaded: LoadedModel, samples: list[dict], suite: Suite, reference: str | None,
                    progress: bool) -> tuple[str, tuple[list[float], list[float]] | None]:
    """(what the reference is, its (chosen, rejected) log-probabilities, or None when there is no reward to
    compute): --reference, else an adapter's own base."""
    if reference is None and loaded.base is not None:
        reference = loaded.base
    if reference is None:
        return "none (a full model without --reference)", None
    if _same(reference, loaded.path):
        return f"{reference} (the model itself: no reward)", None
    if loaded.base is not None and _same(reference, loaded.base):
        with loaded.without_adapter():  # the base is already loaded under the adapter
            return reference, preference_logps(loaded.model, samples, suite.batch_size, "reference", progress)
    other = load_for_eval(reference)
    logps = preference_logps(other.model, samples, suite.batch_size, "reference", progress)
    del other
    gc.collect()
    return reference, logps


def preference_figures(loaded: LoadedModel, samples: list[dict], suite: Suite, reference: str | None,
                       progress: bool) -> dict:
    chosen, rejected = preference_logps(loaded.model, samples, suite.batch_size, "preferences", progress)
    reference, ref_logps = reference_logps(loaded, samples, suite, reference, progress)
    margins = None
    if ref_logps is not None:
        margins = [suite.beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, *ref_logps)]
    by_group = GroupMeans()
    for i, sample in enumerate(samples):
        groups = row_groups(sample)
        by_group.add(groups, "logp_accuracy", chosen[i] > rejected[i])
        if margins is not None:
            by_group.add(groups, "accuracy", margins[i] > 0)
            by_group.add(groups, "margin", margins[i])
    return {
        "pairs": len(samples),
        "logp_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(samples),
        "reference": reference,
        "accuracy": sum(m > 0 for m in margins) / len(margins) if margins is not None else None,
        "margin": sum(margins) / len(margins) if margins is not None else None,
        "by_group": by_group.figures(size=("pairs", "logp_accuracy")),
    }


def generation_figures(loaded: LoadedModel, rows: list[dict], suite: Suite, progress: bool) -> tuple[dict, list[dict]]:
    replies = generate_replies(loaded.model, loaded.encoder, [r["messages"] for r in rows], suite.batch_size,
                               suite.max_new_tokens, progress)
    records, by_rule, by_group = [], defaultdict(list), GroupMeans()
    for row, reply in zip(rows, replies):
        followed = [check_rule(reply, rule) for rule in row["rules"]]
        record = {"prompt": row["messages"][-1]["content"], "reply": reply, "answer": row["answer"],
                  "exact_match": exact_match(reply, row["answer"]), "rules_followed": followed,
                  "task": row.get("task"), "lang": row.get("lang")}
        records.append(record)
        groups = row_groups(row)
        by_group.add(groups, "exact_match", record["exact_match"])
        by_group.add(groups, "rule_pass_rate", sum(followed), len(followed))
        by_group.add(groups, "prompt_rule_pass_rate", all(followed))
        for rule, ok in zip(row["rules"], followed):
            by_rule[rule["rule"]].append(ok)
    rule_results = [ok for r in records for ok in r["rules_followed"]]
    figures = {
        "prompts": len(records),
        "exact_match": _mean(r["exact_match"] for r in records),
        "rule_pass_rate": _mean(rule_results),
        "prompt_rule_pass_rate": _mean(all(r["rules_followed"]) for r in records),
        "rule_pass_rate_by_rule": {rule: _mean(v) for rule, v in sorted(by_rule.items())},
        "by_group": by_group.figures(size=("prompts", "exact_match")),
    }
    return figures, records


def lm_eval_figures(loaded: LoadedModel, suite: Suite) -> dict:
    """lm-evaluation-harness on the suite's tasks, through its HF model interface (not re-implemented)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return {"skipped": "lm-eval is not installed (pip install lm-eval)"}
    model = loaded.model.merge_and_unload() if loaded.base is not None else loaded.model
    lm = HFLM(pretrained=model, tokenizer=loaded.encoder.hf_tokenizer, batch_size=suite.batch_size,
              max_length=suite.max_length)
    manager = TaskManager(include_path=suite.lm_eval_include) if suite.lm_eval_include else TaskManager()
    output = lm_eval.simple_evaluate(model=lm, tasks=suite.lm_eval_tasks, task_manager=manager, limit=suite.limit)
    return {
        task: {metric.split(",")[0]: value for metric, value in values.items()
               if isinstance(value, (int, float)) and not metric.split(",")[0].endswith("_stderr")
               and metric != "sample_len"}
        for task, values in output["results"].items()
    }


def evaluate(path: str, suite: Suite, base: str | None = None, reference: str | None = None,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Every figure of the suite for one model or adapter: (results, generation records)."""
    loaded = load_for_eval(path, base)
    results: dict = {"model": path, "base": loaded.base, "suite": suite.name}
    records: list[dict] = []
    if suite.chat:
        results["heldout"] = heldout_loss(loaded.model, encoded(suite.chat, "sft", loaded, suite), suite.batch_size,
                                          progress)
    if suite.preferences:
        results["preferences"] = preference_figures(loaded, encoded(suite.preferences, "dpo", loaded, suite), suite,
                                                    reference, progress)
    if suite.instructions:
        results["generation"], records = generation_figures(loaded, instruction_rows(suite.instructions, suite),
                                                            suite, progress)
    if suite.lm_eval_tasks:
        results["lm_eval"] = lm_eval_figures(loaded, suite)
    del loaded
    gc.collect()
    return results, records


# ----------------------------------------------------------------------------------------------
# Reports

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model folder, Hub id, or adapter folder")
    parser.add_argument("--suite", required=True, help="suite YAML, e.g. eval/bundled.yaml")
    parser.add_argument("--out", required=True, help="new folder for metrics.json, report.md and the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out when done")
    parser.add_argument("--baseline", help="a second model or adapter, evaluated on the same suite for comparison")
    parser.add_argument("--reference", help="reference model for preference rewards (default: an adapter's base)")
    parser.add_argument("--base", help="base model for adapters (default: the one the adapter records)")
    parser.add_argument("overrides", nargs="*", help="suite overrides, e.g. limit=20")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options

    suite = load_suite(args.suite, args.overrides)
    out = Path(args.out)
    inputs = {"model": args.model, "baseline": args.baseline, "reference": args.reference, "base": args.base,
              "suite": args.suite, **{f"suite file {p}": p for p in suite_files(suite)}}
    check_output(out, inputs, args.overwrite)
    for option, path in (("model", args.model), ("--baseline", args.baseline), ("--reference", args.reference)):
        if path is not None:
            check_loadable(path, args.base, option)
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


def _same(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
