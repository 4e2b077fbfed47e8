"""The resolved recipe as it is written next to every output (`recipe.yaml`): plain data, secrets redacted;
and what changed between a written one and a recipe (a resume continues only the same run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from finetune.recipe.schema import CONTINUABLE_KEYS, RUN_CONTROL_KEYS, Recipe
from finetune.recipe.secrets import redact
from finetune.recipe.typed_yaml import parse_yaml

RECIPE_FILE = "recipe.yaml"


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (what gets written next to the adapter)."""
    out = dataclasses.asdict(recipe)
    peft_keys = out["lora"].pop("peft")
    out["lora"].update(peft_keys)
    out.pop("source")
    if recipe.kind == "sft":
        out.pop("dpo")
    return out


def dump_yaml(recipe: Recipe, path: str | Path) -> None:
    source = " ".join(recipe.source.split())  # a file name with a newline must not end the comment
    header = f"# Resolved {recipe.kind.upper()} recipe (from {source}, overrides applied).\n"
    Path(path).write_text(redact(header + yaml.safe_dump(to_dict(recipe), sort_keys=False)))


def changed_keys(saved_recipe: Path, recipe: Recipe) -> list[str]:
    """Dotted keys whose value differs between a saved recipe.yaml and `recipe` (run-control keys aside, and
    the lengths a finished run may be trained further by)."""
    before, now = _comparable(parse_yaml(saved_recipe.read_text())), _comparable(to_dict(recipe))
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in CONTINUABLE_KEYS)


def _comparable(recipe_dict: dict) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", {k: v for k, v in recipe_dict.items() if k not in RUN_CONTROL_KEYS})
    return flat
