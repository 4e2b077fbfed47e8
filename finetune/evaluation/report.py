"""What an evaluation writes: metrics.json, generations.jsonl, the router-load heatmaps and report.md, with
the side-by-side table of the headline figures (also printed, and used by the demo's report)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from finetune.data.groups import GROUP_FIELDS
from finetune.evaluation.plots import router_heatmaps
from finetune.evaluation.suite import Suite

SUMMARY = [  # (label, path into the results, higher is better)
    ("held-out loss", ("heldout", "loss"), False),
    ("perplexity", ("heldout", "perplexity"), False),
    ("token accuracy", ("heldout", "token_accuracy"), True),
    ("exact match", ("generation", "exact_match"), True),
    ("instruction rules followed", ("generation", "rule_pass_rate"), True),
    ("prompts with every rule followed", ("generation", "prompt_rule_pass_rate"), True),
    ("tool calls well-formed ([TOOL_CALLS] + JSON)", ("generation", "tool_call_well_formed"), True),
    ("tool calls to the right function", ("generation", "tool_call_right_function"), True),
    ("tool calls right (function and arguments)", ("generation", "tool_call_accuracy"), True),
    ("preference accuracy (vs reference)", ("preferences", "accuracy"), True),
    ("reward margin (vs reference)", ("preferences", "margin"), True),
    ("preference accuracy (log-prob, no reference)", ("preferences", "logp_accuracy"), True),
    ("router MaxVio (mean over layers)", ("heldout", "router", "maxvio_mean"), False),
    ("router CV (mean over layers)", ("heldout", "router", "cv_mean"), False),
    ("router entropy (mean, nats)", ("heldout", "router", "entropy_mean"), None),
    ("dead experts (< 1% share)", ("heldout", "router", "dead_experts"), False),
    ("routing gap between languages", ("heldout", "routing_by_group", "lang", "gap"), None),
    ("routing gap between task families", ("heldout", "routing_by_group", "task", "gap"), None),
]
GROUP_SUMMARY = [  # (label, part, figure): the columns of the per-language and per-task tables
    ("held-out loss", "heldout", "loss"),
    ("exact match", "generation", "exact_match"),
    ("rules followed", "generation", "rule_pass_rate"),
    ("preference accuracy", "preferences", "accuracy"),
    ("preference accuracy (log-prob)", "preferences", "logp_accuracy"),
]


def figure(results: dict, keys: tuple) -> float | None:
    node = results
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def summary(results: dict) -> dict[str, float]:
    """The headline figures of one evaluation, by label (missing parts left out)."""
    flat = {label: figure(results, keys) for label, keys, _ in SUMMARY}
    for task, metrics in (results.get("lm_eval") or {}).items():
        if isinstance(metrics, dict):
            flat.update({f"lm-eval {task} {metric}": value for metric, value in metrics.items()})
    return {label: value for label, value in flat.items() if value is not None}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def comparison_rows(columns: list[tuple[str, dict]]) -> list[list[str]]:
    """Rows [figure, value per column..., (difference of the first two)] over the union of figures."""
    summaries = [summary(results) for _, results in columns]
    labels = [label for label in dict.fromkeys(k for s in summaries for k in s)]
    rows = []
    for label in labels:
        values = [s.get(label) for s in summaries]
        row = [label] + [_fmt(v) for v in values]
        if len(columns) == 2:
            row.append(_fmt(values[0] - values[1]) if None not in values else "n/a")
        rows.append(row)
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def heatmap_panels(columns: list[tuple[str, dict]]) -> list[tuple[str, list[list[float]]]]:
    panels = []
    for name, results in columns:
        router = figure(results, ("heldout", "router"))
        if router:
            title = f"{name}: {Path(results['model']).name}\nMaxVio {router['maxvio_mean']:.2f}, CV {router['cv_mean']:.2f}"
            panels.append((title, router["share"]))
    return panels


def group_rows(columns: list[tuple[str, dict]], field: str) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the GROUP_SUMMARY figures per group of `field` (e.g. per language), then the totals,
    one row per group and model; None when no model has figures for that field."""
    parts = {part for _, part, _ in GROUP_SUMMARY}
    groups = sorted({g for _, results in columns for part in parts
                     for g in (figure(results, (part, "by_group", field)) or {})})
    if not groups:
        return None
    labels = [label for label, part, name in GROUP_SUMMARY
              if any(figure(results, (part, name)) is not None for _, results in columns)]
    rows = []
    for group in groups + ["all"]:
        for model, results in columns:
            keys = {label: (part, "by_group", field, group, name) if group != "all" else (part, name)
                    for label, part, name in GROUP_SUMMARY}
            rows.append([group] + ([model] if len(columns) > 1 else []) + [_fmt(figure(results, keys[label]))
                                                                            for label in labels])
    header = [GROUP_FIELDS[field][0]] + (["model"] if len(columns) > 1 else []) + labels
    return header, rows


def group_heatmaps(columns: list[tuple[str, dict]], field: str, path: Path) -> Path | None:
    """Router load per group of `field` (one panel per language, say), one row of panels per model."""
    rows = []
    for name, results in columns:
        routing = figure(results, ("heldout", "routing_by_group", field))
        if routing:
            rows.append([(f"{name}: {group}" if len(columns) > 1 else group, share)
                         for group, share in routing["share"].items()])
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return router_heatmaps([panel for row in rows for panel in row], path, per_row=len(rows[0]))


def group_sections(out: Path, columns: list[tuple[str, dict]], routing_columns: list[tuple[str, dict]] | None = None
                   ) -> list[str]:
    """Report lines with, per group field, the figures table of `columns` and the router heatmaps of
    `routing_columns` (default: the same), written to `out`."""
    lines = []
    routing_columns = routing_columns or columns
    for field, (what, whats) in GROUP_FIELDS.items():
        table = group_rows(columns, field)
        if table is None:
            continue
        lines += [f"## By {what}", "", markdown_table(*table), ""]
        plot = group_heatmaps(routing_columns, field, out / f"router_by_{field}.png")
        if plot is not None:
            gaps = ", ".join(f"{name} {figure(results, ('heldout', 'routing_by_group', field, 'gap')):.3f}"
                             for name, results in routing_columns
                             if figure(results, ("heldout", "routing_by_group", field)))
            lines += [f"Share of routed tokens per layer (rows) and expert (columns) for each {what}. Routing gap "
                      f"between {whats} (mean over layers of the largest difference in "
                      f"one expert's share between two of them): {gaps}.", "", f"![router load by {what}]({plot.name})", ""]
    return lines


def write_report(out: Path, suite: Suite, columns: list[tuple[str, dict]], records: list[dict]) -> Path:
    """report.md with the figures table, the router heatmaps and a few generations."""
    header = ["figure"] + [name for name, _ in columns] + (["difference"] if len(columns) == 2 else [])
    lines = [f"# Evaluation on suite `{suite.name}`", ""]
    for name, results in columns:
        reference = figure(results, ("preferences", "reference"))
        lines.append(f"- **{name}**: `{results['model']}`" + (f" (adapter on `{results['base']}`)" if results["base"] else "")
                     + (f"; preference reference: `{reference}`" if reference else ""))
    lines += ["", markdown_table(header, comparison_rows(columns)), ""]
    lines += group_sections(out, columns)
    if (out / "router_load.png").is_file():
        lines += ["## Router load on the held-out conversations", "",
                  "Share of routed tokens per layer (rows) and expert (columns); balanced is 1/experts (red mark).",
                  "", "![router load](router_load.png)", ""]
    if records:
        lines += [f"## Generations (first 8 of {len(records)}, all in generations.jsonl)", ""]
        rows = [[r["prompt"].replace("|", "\\|"), r["reply"].replace("|", "\\|").replace("\n", " "),
                 "yes" if r["exact_match"] else "no", f"{sum(r['rules_followed'])}/{len(r['rules_followed'])}"]
                for r in records[:8]]
        lines += [markdown_table(["prompt", "reply", "exact", "rules"], rows), ""]
    for name, results in columns:
        skipped = figure(results, ("lm_eval", "skipped"))
        if skipped:
            lines += [f"lm-eval tasks for {name}: skipped ({skipped})."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_outputs(folder: Path, suite: Suite, columns: list[tuple[str, dict]], all_records: list[dict],
                  with_difference: bool) -> Path:
    """metrics.json, generations.jsonl, router_load.png and report.md into `folder`; the report's path."""
    payload = {name: results for name, results in columns}
    if with_difference:
        first, second = summary(columns[0][1]), summary(columns[1][1])
        payload["difference"] = {k: first[k] - second[k] for k in first if k in second}
    payload["suite"] = dataclasses.asdict(suite)
    (folder / "metrics.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    with open(folder / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in all_records)
    panels = heatmap_panels(columns)
    if panels:
        router_heatmaps(panels, folder / "router_load.png")
    return write_report(folder, suite, columns, [r for r in all_records if r["model"] == "model"])
