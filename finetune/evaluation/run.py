"""One model or adapter evaluated on a suite: each part of the suite (held-out loss with router load,
preferences against a reference, generation checks, lm-evaluation-harness tasks) as figures, also per
language and task family."""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from pathlib import Path

from finetune.data.groups import row_groups
from finetune.data.rows import read_rows
from finetune.data.tool_rows import uses_tools
from finetune.evaluation.groups import GroupMeans
from finetune.evaluation.loading import LoadedModel, encoder_of, load_for_eval
from finetune.evaluation.rules import check_rule, exact_match, first_tool_call
from finetune.evaluation.scoring import generate_replies, heldout_loss, preference_logps
from finetune.evaluation.suite import Suite, SuiteError, encoded, instruction_rows
from finetune.files.adapter_folder import adapter_base, is_adapter_folder
from finetune.recipe.schema import DataSource


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
    if loaded.base is not None and is_adapter_folder(reference) and _same(adapter_base(reference), loaded.base):
        with loaded.with_adapter(reference) as model:  # e.g. the SFT adapter as a DPO adapter's reference
            return reference, preference_logps(model, samples, suite.batch_size, "reference", progress)
    other = load_for_eval(reference)  # another model: its own weights
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
    replies = generate_replies(loaded.model, loaded.encoder, [r["prompt"] for r in rows], suite.batch_size,
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
        **tool_call_figures(rows, replies),
        "by_group": by_group.figures(size=("prompts", "exact_match")),
    }
    return figures, records


def tool_call_figures(rows: list[dict], replies: list[str]) -> dict:
    """For rows with a `tool_call` rule, the share of replies that are a well-formed call, that call the right
    function, and that call it with exactly the right arguments (`tool_call_accuracy`, what the rule checks)."""
    expected = [(next(r["value"] for r in row["rules"] if r["rule"] == "tool_call"), reply)
                for row, reply in zip(rows, replies) if any(r["rule"] == "tool_call" for r in row["rules"])]
    if not expected:
        return {}
    calls = [(value, first_tool_call(reply)) for value, reply in expected]
    return {
        "tool_call_well_formed": _mean(call is not None for _, call in calls),
        "tool_call_right_function": _mean(call is not None and call[0] == value["name"] for value, call in calls),
        "tool_call_accuracy": _mean(call == (value["name"], value["arguments"]) for value, call in calls),
    }


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


def check_format(suite: Suite, path: str, base: str | None = None) -> None:
    """A suite with tool rows and a v1 model: one error naming both before the model loads, not a bad-row report
    per row."""
    if encoder_of(path, base).format != "v1":
        return
    for data in (suite.chat, suite.preferences, suite.instructions):
        if data and any(uses_tools(row) for _, row in read_rows(DataSource(data))):
            raise SuiteError(f"suite {suite.name}: {data} has rows with tools, and {path} speaks the v1 chat "
                             "format (Mixtral 8x7B's tokenizer), which has no tool calls; evaluate a v3 model "
                             "(Mixtral 8x22B) with it, or drop those rows")


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


def _same(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
