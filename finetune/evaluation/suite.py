"""An evaluation suite: a YAML file in eval/ naming data files and a few settings, typed like recipes, and the
suite's data read and encoded exactly as training encodes it (every bad row named)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.rows import BadRow, DataError, bad_rows_message, check_messages, encode_source, read_rows
from finetune.data.tool_rows import check_tool_conversation, uses_tools
from finetune.errors import InputError
from finetune.evaluation.loading import LoadedModel
from finetune.evaluation.rules import validate_rules
from finetune.recipe.schema import DataSource
from finetune.recipe.typed_yaml import build_dataclass, read_yaml_mapping


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
    """Prompt rows {messages (ending with a user turn), answer, rules} for generation checks. Rows may carry
    `tools` (v3 models: eval/tool_calls.jsonl, checked by the `tool_call` rule)."""
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
    check_lm_eval_tasks(suite, path)
    return suite


def check_lm_eval_tasks(suite: Suite, path: Path) -> None:
    """Every `lm_eval_tasks` name is a task lm-eval knows (with `lm_eval_include`'s), before any model loads.
    Without lm-eval installed the tasks are reported as skipped, so there is nothing to check."""
    local = set()
    for task_file in Path(suite.lm_eval_include).glob("*.yaml") if suite.lm_eval_include else ():
        name = re.search(r"^task: *(\S+)", task_file.read_text(errors="replace"), re.M)
        local |= {name.group(1)} if name else set()
    unknown = [task for task in suite.lm_eval_tasks if task not in local]
    if not unknown:
        return  # the suite's own tasks: known without indexing lm-eval's thousands (10 s here)
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return
    known = set(TaskManager(include_path=suite.lm_eval_include).all_tasks)
    unknown = [task for task in unknown if task not in known]
    if unknown:
        where = f" (with the tasks in {suite.lm_eval_include})" if suite.lm_eval_include else ""
        raise SuiteError(f"{path}: lm_eval_tasks: {', '.join(unknown)} is no lm-eval task{where}; check the name, "
                         "or set lm_eval_include to the folder of its YAML")


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
        prompt = row.get("messages")
        if uses_tools(row):
            conversation, reason = check_tool_conversation(prompt, row.get("tools"), ends_with="user")
            row = {**row, "prompt": conversation}
        else:
            reason, row = check_messages(prompt, ends_with="user"), {**row, "prompt": prompt}
        reason = reason or validate_rules(row["rules"], "rules")
        if reason:
            bad.append(BadRow(where, reason))
        else:
            rows.append(row)
    if bad:
        raise DataError(f"suite {suite.name}, {path}: " + bad_rows_message(bad, with_fix=False))
    return rows[: suite.limit]
