"""Checkers for generated replies that need no network and no judge model.

Exact match compares the reply with the expected answer after trimming surrounding whitespace. The
instruction rules follow IFEval's idea (verifiable instructions, checked by code): each rule is a small
mapping in an eval row, e.g. `{"rule": "case", "value": "upper"}`, and `check_rule` says whether a
reply follows it. Rules:

    case           "upper" | "lower"       every cased letter is upper / lower case (and there is one)
    max_words      N                       at most N whitespace-separated words
    min_words      N                       at least N words
    keywords       [w, ...]                every keyword appears (case-insensitive, whole word)
    forbidden      [w, ...]                no forbidden word appears (case-insensitive, whole word)
    format         "integer" | "comma_list" | "single_line"
    starts_with    text                    the reply (trimmed) starts with it
    ends_with      text                    the reply (trimmed) ends with it
    tool_call      {name, arguments}       the reply is a v3 tool call (`[TOOL_CALLS]` then a JSON list) whose
                                           first call names that function with exactly those arguments (the
                                           call id, which the model makes up, is not compared)
"""

from __future__ import annotations

import json
import re

TOOL_CALLS = "[TOOL_CALLS]"

FORMATS = {
    "integer": re.compile(r"-?\d+"),
    # One-character or one-word items separated by ", " (as in "a, b, c").
    "comma_list": re.compile(r"[^,\s]+(, [^,\s]+)+"),
}


def exact_match(reply: str, answer: str) -> bool:
    return reply.strip() == answer.strip()


def _words(text: str) -> list[str]:
    return text.split()


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def check_rule(reply: str, rule: dict) -> bool:
    """Whether `reply` follows `rule`; an unknown rule name is a ValueError (a broken suite, not a fail)."""
    name, value = rule.get("rule"), rule.get("value")
    text = reply.strip()
    if name == "case":
        letters = [c for c in text if c.isalpha() and c.lower() != c.upper()]
        if value not in ("upper", "lower"):
            raise ValueError(f"case rule needs value 'upper' or 'lower', got {value!r}")
        return bool(letters) and all(c.isupper() if value == "upper" else c.islower() for c in letters)
    if name == "max_words":
        return len(_words(text)) <= int(value)
    if name == "min_words":
        return len(_words(text)) >= int(value)
    if name == "keywords":
        return all(_has_word(text, word) for word in value)
    if name == "forbidden":
        return not any(_has_word(text, word) for word in value)
    if name == "format":
        if value == "single_line":
            return bool(text) and "\n" not in text
        if value not in FORMATS:
            raise ValueError(f"format rule value must be one of single_line, {', '.join(FORMATS)}; got {value!r}")
        return FORMATS[value].fullmatch(text) is not None
    if name == "starts_with":
        return text.startswith(str(value))
    if name == "ends_with":
        return text.endswith(str(value))
    if name == "tool_call":
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) \
                or not isinstance(value.get("arguments"), dict):
            raise ValueError(f"tool_call rule needs value {{name: ..., arguments: {{...}}}}, got {value!r}")
        return first_tool_call(text) == (value["name"], value["arguments"])
    raise ValueError(f"unknown rule {name!r} (known: case, max_words, min_words, keywords, forbidden, format, "
                     f"starts_with, ends_with, tool_call)")


def first_tool_call(reply: str) -> tuple[str, dict] | None:
    """(name, arguments) of the first call in a v3 tool-calling reply, None when the reply is not one (no
    `[TOOL_CALLS]`, JSON that does not parse, or calls not of the form [{"name", "arguments"}, ...])."""
    text = reply.strip()
    if not text.startswith(TOOL_CALLS):
        return None
    try:
        calls = json.loads(text[len(TOOL_CALLS):])
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
        return None
    name, arguments = calls[0].get("name"), calls[0].get("arguments")
    return (name, arguments) if isinstance(name, str) and isinstance(arguments, dict) else None


def validate_rules(rules, where: str) -> str | None:
    """A reason the rules of one eval row are malformed, or None."""
    if not isinstance(rules, list) or not all(isinstance(r, dict) and "rule" in r for r in rules):
        return f"{where}: 'rules' must be a list of {{rule: ..., value: ...}} mappings"
    for rule in rules:
        try:
            check_rule("probe", rule)
        except (ValueError, TypeError) as err:
            return f"{where}: {err}"
    return None
