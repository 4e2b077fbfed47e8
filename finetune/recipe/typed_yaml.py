"""YAML files and `a.b=value` overrides onto typed dataclasses, every key and type checked.

Recipes (finetune/recipe/loading.py), evaluation suites (finetune/evaluation/suite.py) and launch files are
read this way. Scalars follow YAML 1.2: only true/false are booleans (YAML 1.1 reads `eval_strategy: no` as
False), and `1e-3` is a float (YAML 1.1 wants `1.0e-3`). Aliases (`*name`) are refused: a config needs
none, and nested ones expand exponentially (a "billion laughs") or refer to themselves. Every float must be
finite: `.nan` or `.inf` would train a model of NaNs.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import InputError


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (YAML 1.1 reads `eval_strategy: no` as False), and
    `1e-3` is a float (YAML 1.1 wants `1.0e-3`). No aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) is not allowed here: write the "
                                              "value out (aliases can expand without bound)", event.start_mark)
        return super().compose_node(parent, index)


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=Yaml12Loader)


def read_yaml_file(path: Path, what: str, error: type[InputError] = InputError):
    """A YAML file's content; `error` naming the file when it is missing, not UTF-8 or not valid YAML."""
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}); save the {what} file "
                    "as UTF-8") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
        raise error(f"{where}: not valid YAML: {problem}") from None


def read_yaml_mapping(path: Path, overrides: list[str], what: str, error: type[InputError] = InputError) -> dict:
    """A YAML file's top-level mapping with `a.b=value` overrides applied; `error` naming the file."""
    raw = read_yaml_file(path, what, error) or {}
    if not isinstance(raw, dict):
        raise error(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, path, error)
    refuse_non_finite(raw, str(path), "", error)
    return raw


def leaves(node, key: str = ""):
    """(dotted key, value) for every scalar of parsed YAML, e.g. ("data.train[0].weight", 0.5)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, f"{key}[{i}]")
    else:
        yield key, node


def refuse_non_finite(node, source: str, key: str, error: type[InputError] = InputError) -> None:
    """Every float in a parsed mapping is finite, or `error` names the key."""
    for name, value in leaves(node, key):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{source}: {name} must be a finite number, got {value}")


def apply_override(raw: dict, item: str, path: Path, error: type[InputError] = InputError) -> None:
    """`train.max_steps=5` sets raw["train"]["max_steps"] = 5 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise error(f"{path}: override {item!r} must look like key.sub=value")
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise error(f"{path}: override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(value) if value != "" else None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise error(f"{path}: override {item!r}: the value is not valid YAML ({problem}); "
                          "quote it, e.g. key='[1, 2]'") from None


def build_dataclass(cls, data: Any, source: str, prefix: str = "", error: type[InputError] = InputError,
                    collect: dict | None = None):
    """Make dataclass `cls` from a mapping, checking every key and type, recursing into dataclass fields.
    `collect` maps a dataclass to (field, check): its unknown keys go, checked, into that dict field
    (a recipe's `lora` section collects LoraConfig fields into `peft`); elsewhere they are errors."""
    if not isinstance(data, dict):
        raise error(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    collector = (collect or {}).get(cls)
    kwargs, extra = {}, {}
    for key, value in data.items():
        if key not in names or (collector and key == collector[0]):
            extra[key] = value
            continue
        kwargs[key] = _convert(hints[key], value, source, prefix + key, error, collect)
    if collector:
        kwargs[collector[0]] = collector[1](extra, source, prefix)
    elif extra:
        key = next(iter(extra))
        known = sorted(n for n in names if n != "source")  # filled by the parser, never by a file
        raise error(f"{source}: unknown key {prefix + key!r} (known: {', '.join(known)})")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{source}: missing required key {prefix + missing[0]!r}")
    return cls(**kwargs)


def _convert(annotation, value, source: str, key: str, error, collect):
    """Dataclass fields are built; everything else is type-checked as it is."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, source, key + ".", error, collect)
    if origin is list and dataclasses.is_dataclass(typing.get_args(annotation)[0]):
        if not isinstance(value, list):
            raise error(f"{source}: {key} must be a list, got {value!r}")
        return [_convert(typing.get_args(annotation)[0], v, source, f"{key}[{i}]", error, collect)
                for i, v in enumerate(value)]
    if not type_matches(value, annotation):
        raise error(f"{source}: {key} must be {describe(annotation)}, got {value!r}")
    return value


def enum_choices(annotation) -> list[str]:
    """The values of an Enum in `annotation` (e.g. `SchedulerType | str` accepts only its values)."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(m.value) for m in arg]
    return []


def safe_type_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # some library annotations name types that are not importable; skip those
        return {}


def type_matches(value, annotation) -> bool:
    """A small structural check of YAML values against a type annotation."""
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in [m.value for m in annotation] or value in annotation.__members__
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(type_matches(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(type_matches(v, args[1]) for v in value.values())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is dict or annotation is dict:
        return "a mapping"
    if origin is list and typing.get_args(annotation):
        return f"a list, each item {describe(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))
