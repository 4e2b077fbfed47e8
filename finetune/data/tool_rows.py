"""Function-calling rows: checked, and put in the one shape the v3 encoder reads.

Rows take the shape of public function-calling sets (OpenAI's): a `tools` list of
`{"type": "function", "function": {"name", "description", "parameters"}}`, assistant messages with
`tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`, arguments a JSON string or
an object) and messages with role `tool` (`tool_call_id`, `content`) carrying each call's result. A result
answers the open call with its `tool_call_id`; without one, the first open call (of its `name`, if given).

What comes out (`ToolConversation`) is what `mistral_common`'s v3 tokenizer encodes:
* tools as `{"type": "function", "function": {"name", "description", "parameters"}}`, in that key order;
* a call as `{"name", "arguments", "id"}` with arguments parsed from JSON;
* a result as `{"content", "call_id"}`, its content parsed when it is JSON text, as v3 does.

Call ids: v3 takes 9 letters or digits (`mistral_common` refuses others when fine-tuning), and public sets
use `call_...` ids or none. An id already of that form is kept; any other becomes the first 9 hex digits
of its SHA-1 (a missing one: of its message and call position), the same for the call and its result, so a
row always encodes the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_KEYS = ("tools",)
V3_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


@dataclass
class ToolConversation:
    messages: list[dict]
    """system / user / assistant `{"role", "content"}`; assistant calls `{"role": "assistant", "tool_calls":
    [{"name", "arguments", "id"}]}`; results `{"role": "tool", "content", "call_id"}`."""
    tools: list[dict] | None


def uses_tools(row: Any) -> bool:
    """Whether a row (or a message list) needs the v3 format: declared tools, tool calls or tool results."""
    if isinstance(row, dict) and row.get("tools"):
        return True
    messages = row.get("messages") if isinstance(row, dict) else row
    if isinstance(row, dict) and "prompt" in row:
        messages = [m for key in ("prompt", "chosen", "rejected") if isinstance(row.get(key), list) for m in row[key]]
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def parse_json_content(content: str) -> Any:
    """v3's reading of result content and call arguments: JSON when it parses, else the text itself."""
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return content


def v3_call_id(original: Any, where: str) -> str:
    if isinstance(original, str) and V3_CALL_ID.match(original):
        return original
    source = original if isinstance(original, str) and original else f"call at {where}"
    return hashlib.sha1(source.encode()).hexdigest()[:9]


def check_tools(tools: Any) -> tuple[list[dict] | None, str | None]:
    """The row's `tools` in v3's shape, or the reason they cannot be read."""
    if tools is None:
        return None, None
    if not isinstance(tools, list):
        return None, "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}"
    out, names = [], set()
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            return None, f"tools[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}"
        name, description = function.get("name"), function.get("description", "")
        parameters = function.get("parameters", {})
        if not isinstance(name, str) or not name:
            return None, f"tools[{k}] has no function name"
        if name in names:
            return None, f"tools[{k}] declares '{name}' a second time"
        if not isinstance(description, str) or not isinstance(parameters, dict):
            return None, f"tools[{k}] ('{name}'): description must be text and parameters a JSON schema object"
        names.add(name)
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out or None, None


def _check_call(i: int, j: int, call: Any, declared: set[str]) -> tuple[dict | None, str | None]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None, f"message {i} tool_calls[{j}] must be {{\"id\", \"function\": {{\"name\", \"arguments\"}}}}"
    name, arguments = function["name"], function.get("arguments", {})
    if name not in declared:
        return None, f"message {i} calls tool '{name}', which the row's 'tools' does not declare"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            return None, f"message {i}: arguments of the call to '{name}' are not JSON ({err.msg})"
    if not isinstance(arguments, dict):
        return None, f"message {i}: arguments of the call to '{name}' must be a JSON object"
    return {"name": name, "arguments": arguments, "id": v3_call_id(call.get("id"), f"{i}.{j}")}, None


def _text(i: int, message: dict, what: str) -> tuple[str | None, str | None]:
    content = message.get("content")
    if not isinstance(content, str):
        return None, f"message {i} content is not text ({type(content).__name__})"
    if not content.strip():
        return None, f"message {i} is an empty {what}"
    return content, None


def check_tool_conversation(messages: Any, tools: Any, *, ends_with: str
                            ) -> tuple[ToolConversation | None, str | None]:
    """The conversation in v3's shape, or the reason it is a bad row. `ends_with`: `assistant` for training
    rows; `user` for prompts, which may also end with the results of the last calls."""
    tools, reason = check_tools(tools)
    if reason:
        return None, reason
    if not isinstance(messages, list) or not messages:
        return None, "messages must be a non-empty list"
    declared = {t["function"]["name"] for t in tools or []}
    out: list[dict] = []
    pending: list[tuple[Any, dict]] = []  # (id as the row wrote it, call) of calls still without a result
    previous = None  # what the last message was: system, user, reply, calls, result
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            return None, f"message {i} must have a 'role'"
        role = message["role"]
        if role in ("user", "assistant") and pending:
            return None, f"message {i}: {len(pending)} tool call(s) of message {_last_calls(out)} have no result before it"
        if role == "system":
            if i != 0:
                return None, f"roles out of order: message {i} is 'system'; only the first message may be"
            content, reason = _text(i, message, "system message")
            kind = "system"
        elif role == "user":
            if previous in ("user", "result"):
                return None, f"roles out of order: message {i} is 'user' after {_NAMES[previous]}"
            content, reason = _text(i, message, "user message")
            kind = "user"
        elif role == "assistant":
            if previous in (None, "system", "reply"):
                return None, f"roles out of order: message {i} is 'assistant' after {_NAMES[previous]}"
            calls = message.get("tool_calls")
            if calls:
                if message.get("content"):
                    return None, (f"message {i} has both content and tool_calls; the v3 format encodes one or "
                                  "the other, so split them into two assistant turns")
                if not isinstance(calls, list):
                    return None, f"message {i} tool_calls must be a list"
                checked = []
                for j, call in enumerate(calls):
                    call_out, reason = _check_call(i, j, call, declared)
                    if reason:
                        return None, reason
                    checked.append(call_out)
                    pending.append((call.get("id"), call_out))
                out.append({"role": "assistant", "tool_calls": checked})
                previous = "calls"
                continue
            content, reason = _text(i, message, "reply")
            kind = "reply"
        elif role == "tool":
            if not pending:
                return None, f"message {i} is a tool result with no call"
            wanted, name = message.get("tool_call_id"), message.get("name")
            match = next((k for k, (original, call) in enumerate(pending)
                          if (original == wanted if wanted is not None else name in (None, call["name"]))), None)
            if match is None:
                which = f"call id {wanted!r}" if wanted is not None else f"'{name}'"
                return None, f"message {i} is a tool result for {which}, which no open call has"
            _, call = pending.pop(match)
            content = message.get("content")
            if isinstance(content, str):
                content = parse_json_content(content)
            elif not isinstance(content, (dict, list)):
                return None, f"message {i}: a tool result's content must be text or JSON"
            out.append({"role": "tool", "content": content, "call_id": call["id"]})
            previous = "result"
            continue
        else:
            return None, f"message {i} has unsupported role {role!r} (expected system, user, assistant or tool)"
        if reason:
            return None, reason
        out.append({"role": role, "content": content})
        previous = kind
    if not any(m["role"] == "user" for m in out):
        return None, "no user message"
    if ends_with == "assistant" and previous not in ("reply", "calls"):
        return None, "conversation must end with an assistant turn"
    if ends_with == "user" and (previous not in ("user", "result") or pending):
        return None, "prompt must end with a user turn or with the results of every call"
    return ToolConversation(out, tools), None


_NAMES = {None: "nothing", "system": "the system message", "user": "a user message", "reply": "a reply",
          "result": "a tool result"}


def _last_calls(out: list[dict]) -> int:
    return max(k for k, m in enumerate(out) if "tool_calls" in m)
