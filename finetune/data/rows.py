"""Conversations and preference pairs -> token ids and labels, with every bad row named.

Chat rows hold `messages`: an optional system message, then user and assistant turns alternating,
ending with an assistant reply. Preference rows hold `prompt` (a string or messages ending with a user
turn) and `chosen` / `rejected` (strings, or assistant messages, optionally repeating the prompt
messages first as in UltraFeedback). Sources are local .jsonl / .json / .parquet files or Hub datasets.

Each bad row (malformed JSON, missing fields, roles that do not alternate, empty replies, non-text
content, too long for `data.max_length`) is reported as `file:line: reason`. By default the run stops
with the first rows and the counts per reason; `data.on_bad_rows: skip` drops them and says how many.
Nothing is ever truncated.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from finetune.data.chat_format import ChatEncoder
from finetune.data.groups import row_groups
from finetune.data.tool_rows import ToolConversation, check_tool_conversation, uses_tools
from finetune.errors import InputError
from finetune.recipe.schema import DataSource

LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet"}
ROLES = ("system", "user", "assistant")
MAX_BYTES_PER_TOKEN = 16 * 6
REQUIRED_FIELDS = {"sft": ("messages",), "dpo": ("prompt", "chosen", "rejected")}


class DataError(InputError):
    """Bad rows (or an unreadable source) with the default `on_bad_rows: error`."""


@dataclass
class BadRow:
    where: str
    """`file:line` for JSON lines, `file:row N` otherwise (1-based), `hub-name[split]:row N` (0-based)."""
    reason: str


# ----------------------------------------------------------------------------------------------
# Reading


def row_byte_limit(max_length: int) -> int:
    """The most bytes a JSON line can hold and still fit `max_length` tokens: a longer line is a bad row before
    it is parsed or tokenized (a 200 MB line otherwise takes a minute and gigabytes to be found too long). A
    Mixtral piece spans at most 16 bytes of text, and JSON escapes one byte into at most 6 (`\\u0001`), so
    MAX_BYTES_PER_TOKEN bytes per token, plus room for the keys and roles, is a bound no fitting row passes."""
    return max_length * MAX_BYTES_PER_TOKEN + 65536


def read_rows(source: DataSource, columns: tuple[str, ...] = (), max_bytes: int | None = None
              ) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for every row of a source; a JSON line that cannot be read yields a BadRow.
    `columns`: the fields every row needs, checked once for columnar sources (parquet, Hub). `max_bytes`: a JSON
    line longer than this is a BadRow, never read whole."""
    path = Path(source.path)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"data file not found: {source.path}")
        if not path.is_file():
            raise DataError(f"{source.path}: is a folder; give a .jsonl, .json or .parquet file")
        if path.suffix == ".jsonl":
            yield from _jsonl_rows(path, max_bytes)
        elif path.suffix == ".json":
            raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
            try:
                rows = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                line = raw.count(b"\n", 0, err.start) + 1
                line_start = raw.rfind(b"\n", 0, err.start) + 1
                raise DataError(f"{path}:{line}: {_utf8_problem(raw[line_start:], err.start - line_start)}") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
            for i, row in enumerate(rows, start=1):
                yield f"{path}:row {i}", row
        elif path.suffix == ".parquet":
            yield from _parquet_rows(path, columns)
        else:
            raise DataError(f"{path}: unsupported data file type (use .jsonl, .json or .parquet)")
        return
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as err:  # offline, missing, or a typo in the name: say which source
        raise DataError(f"cannot load Hub dataset {source.path!r} (split {source.split!r}): {err}") from None
    _check_columns(f"{source.path}[{source.split}]", dataset.column_names, columns)
    for i, row in enumerate(dataset):
        yield f"{source.path}[{source.split}]:row {i}", row


def _jsonl_rows(path: Path, max_bytes: int | None = None) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: one bad byte is that line's problem, not a traceback for the file.
    limit = max_bytes + 1 if max_bytes is not None else -1
    with path.open("rb") as f:
        line_no = 0
        while raw := f.readline(limit):
            line_no += 1
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors start files with one
            where = f"{path}:{line_no}"
            if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
                length = len(raw) + _skip_line(f)
                yield where, BadRow(where, f"too long: a line of {length:,} bytes, more than any sample of "
                                           f"data.max_length tokens holds ({max_bytes:,} bytes)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, BadRow(where, _utf8_problem(raw, err.start))
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, BadRow(where, f"malformed JSON ({err.msg})")


def _skip_line(f) -> int:
    """Read past the rest of the current line a MiB at a time, keeping none of it; how many bytes it had."""
    skipped = 0
    while chunk := f.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _utf8_problem(line: bytes, offset: int) -> str:
    """'not valid UTF-8 (byte 0x.. at column N)', N counted in characters from 1."""
    column = len(line[:offset].decode("utf-8", errors="replace")) + 1
    return f"not valid UTF-8 (byte 0x{line[offset]:02x} at column {column})"


def _parquet_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    _check_columns(str(path), parquet.schema_arrow.names, columns)
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):  # one batch in memory at a time
        for item in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", item


def _check_columns(where: str, present: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataError(f"{where}: has columns {', '.join(present) or '(none)'}; rows here need "
                        f"{', '.join(needed)} (missing: {', '.join(missing)})")


# ----------------------------------------------------------------------------------------------
# Validation (returns a reason string for a bad row)


def check_messages(messages: Any, *, ends_with: str) -> str | None:
    """None if `messages` is a well-formed conversation ending with `ends_with`, else the reason."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must have 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has unsupported role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} content is not text ({type(m['content']).__name__})"
        if not m["content"].strip():
            what = "reply" if m["role"] == "assistant" else f"{m['role']} message"
            return f"message {i} is an empty {what}"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + (len(messages) - len(turns))
            return f"roles do not alternate: message {index} is {m['role']!r}, expected {expected!r}"
    if not turns:
        return "no user message"
    if turns[-1]["role"] != ends_with:
        return f"conversation must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} turn"
    return None


NO_TOOLS_IN_V1 = ("has tools or tool calls, which the v1 chat format (Mixtral 8x7B's tokenizer) cannot encode; "
                  "function calling needs a model with the v3 tokenizer (Mixtral 8x22B)")


def chat_messages(row: Any, chat_format: str = "v1") -> tuple[list[dict] | ToolConversation | None, str | None]:
    """A training row's conversation: plain messages, or (v3, with tools) a ToolConversation."""
    if not isinstance(row, dict):
        return None, "row is not a JSON object"
    if "messages" not in row:
        return None, "missing field 'messages'"
    if uses_tools(row):
        if chat_format == "v1":
            return None, NO_TOOLS_IN_V1
        return check_tool_conversation(row["messages"], row.get("tools"), ends_with="assistant")
    reason = check_messages(row["messages"], ends_with="assistant")
    return (row["messages"], None) if reason is None else (None, reason)


def _as_prompt(prompt: Any) -> tuple[list[dict] | None, str | None]:
    if isinstance(prompt, str):
        if not prompt.strip():
            return None, "empty prompt"
        if "[INST]" in prompt or "[/INST]" in prompt:
            return None, "prompt already contains [INST] markers; give the raw user text, not a formatted prompt"
        return [{"role": "user", "content": prompt}], None
    reason = check_messages(prompt, ends_with="user")
    return (prompt, None) if reason is None else (None, f"prompt: {reason}")


def _as_reply(value: Any, prompt: list[dict], name: str) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, f"empty {name} response")
    if not isinstance(value, list):
        return None, f"{name} must be a string or a list of messages"
    if len(value) > len(prompt) and value[: len(prompt)] == prompt:
        value = value[len(prompt):]  # UltraFeedback style: the prompt messages are repeated
    if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        return None, f"{name} must be one assistant message after the prompt (does its prompt match 'prompt'?)"
    content = value[0].get("content")
    if not isinstance(content, str):
        return None, f"{name} content is not text"
    if not content.strip():
        return None, f"empty {name} response"
    return content, None


def _tool_preference_parts(row: dict) -> tuple[tuple[ToolConversation, Any, Any] | None, str | None]:
    """A preference row with tools: the prompt as a ToolConversation, each reply its text or its calls."""
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    conversation, reason = check_tool_conversation(messages, row.get("tools"), ends_with="user")
    if reason:
        return None, f"prompt: {reason}"
    replies = []
    for name in ("chosen", "rejected"):
        value = row[name]
        if isinstance(value, list) and len(value) > len(messages) and value[: len(messages)] == messages:
            value = value[len(messages):]
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict) \
                or value[0].get("role") != "assistant":
            return None, f"{name} must be one assistant message after the prompt (does its prompt match 'prompt'?)"
        whole, reason = check_tool_conversation(messages + value, row.get("tools"), ends_with="assistant")
        if reason:
            return None, f"{name}: {reason}"
        last = whole.messages[-1]
        replies.append(last.get("tool_calls") or last["content"])
    if replies[0] == replies[1]:
        return None, "chosen and rejected are identical"
    return (conversation, *replies), None


def preference_parts(row: Any, chat_format: str = "v1") -> tuple[tuple[Any, Any, Any] | None, str | None]:
    """(prompt, chosen, rejected): the prompt's messages (a ToolConversation for v3 rows with tools), each reply
    its text (or, with tools, its list of calls)."""
    if not isinstance(row, dict):
        return None, "row is not a JSON object"
    for key in ("prompt", "chosen", "rejected"):
        if key not in row or row[key] is None:
            return None, f"missing field '{key}'"
    if uses_tools(row):
        return (None, NO_TOOLS_IN_V1) if chat_format == "v1" else _tool_preference_parts(row)
    prompt, reason = _as_prompt(row["prompt"])
    if reason:
        return None, reason
    chosen, reason = _as_reply(row["chosen"], prompt, "chosen")
    if reason:
        return None, reason
    rejected, reason = _as_reply(row["rejected"], prompt, "rejected")
    if reason:
        return None, reason
    if chosen == rejected:
        return None, "chosen and rejected are identical"
    return (prompt, chosen, rejected), None


# ----------------------------------------------------------------------------------------------
# Encoding


def encode_chat_row(row: Any, encoder: ChatEncoder, max_length: int) -> tuple[dict | None, str | None]:
    messages, reason = chat_messages(row, encoder.format)
    if reason:
        return None, reason
    sample = encoder.encode(messages)
    if len(sample.input_ids) > max_length:
        return None, f"too long: {len(sample.input_ids)} tokens > data.max_length={max_length}"
    return {"input_ids": sample.input_ids, "labels": sample.labels}, None


def encode_preference_row(row: Any, encoder: ChatEncoder, max_length: int) -> tuple[dict | None, str | None]:
    parts, reason = preference_parts(row, encoder.format)
    if reason:
        return None, reason
    prompt, chosen, rejected = parts
    prompt_ids = encoder.encode_prompt(prompt)
    chosen_ids, rejected_ids = encoder.reply_ids(chosen), encoder.reply_ids(rejected)
    longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    if longest > max_length:
        return None, f"too long: {longest} tokens (prompt + longer reply) > data.max_length={max_length}"
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}, None


def encode_source(source: DataSource, kind: str, encoder: ChatEncoder, max_length: int, progress: bool = True):
    """(samples, bad rows, rows read) for one small source, as Python lists (evaluation sets; training data
    goes through finetune/data/cache.py, which never holds a dataset's tokens in lists). Each sample keeps its
    row's `lang` and `task`, when it has them, for figures per group (finetune/data/groups.py)."""
    from tqdm.auto import tqdm

    encode = encode_preference_row if kind == "dpo" else encode_chat_row
    samples, bad, read = [], [], 0
    rows = read_rows(source, REQUIRED_FIELDS[kind], row_byte_limit(max_length))
    for where, row in tqdm(rows, desc=f"encoding {source.path}", unit=" rows", disable=not progress, leave=False):
        read += 1
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        sample, reason = encode(row, encoder, max_length)
        if reason:
            bad.append(BadRow(where, reason))
        else:
            samples.append({**sample, **row_groups(row)})
    return samples, bad, read


def reason_kind(reason: str) -> str:
    """Group reasons for counting: 'too long: 812 tokens > ...' -> 'too long'."""
    return reason.split(":")[0].split(" (")[0]


def bad_rows_message(bad_rows: list[BadRow], limit: int = 10, with_fix: bool = True) -> str:
    """The first `limit` bad rows, the counts per reason and (`with_fix`) how to go on."""
    counts = Counter(reason_kind(b.reason) for b in bad_rows)
    lines = [f"{len(bad_rows)} bad row(s):"]
    lines += [f"  {b.where}: {b.reason}" for b in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more")
    lines.append("counts: " + ", ".join(f"{kind}: {n}" for kind, n in counts.most_common()))
    if with_fix:
        lines.append("Fix the rows, or set data.on_bad_rows=skip to drop them.")
    return "\n".join(lines)
