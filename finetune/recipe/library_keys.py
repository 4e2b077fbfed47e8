"""Recipe keys that belong to a library's config class (PEFT's `LoraConfig`, TRL's `SFTConfig` / `DPOConfig`),
checked against that class by name and type instead of being declared again in finetune/recipe/schema.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune.recipe.schema import RecipeError
from finetune.recipe.secrets import SECRET_FIX, is_secret_key
from finetune.recipe.typed_yaml import describe, enum_choices, safe_type_hints, type_matches


def check_library_keys(values: dict, config_cls, owned: dict, source: str, prefix: str) -> dict:
    """Check keys destined for a library config class (LoraConfig, SFTConfig) by name and type."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = safe_type_hints(config_cls)
    for key, value in values.items():
        if key in owned:
            raise RecipeError(f"{source}: {prefix}{key} is set by the recipe itself; use {owned[key]}")
        if is_secret_key(key):
            raise RecipeError(f"{source}: {prefix}{key} holds a secret; {SECRET_FIX}")
        if key not in fields or not fields[key].init:
            raise RecipeError(
                f"{source}: unknown key {prefix + key!r} (not a recipe field and not a "
                f"{config_cls.__name__} field)"
            )
        annotation = hints.get(key, Any)
        if not type_matches(value, annotation):
            raise RecipeError(f"{source}: {prefix}{key} must be {describe(annotation)}, got {value!r}")
        choices = enum_choices(annotation)
        if choices and isinstance(value, str) and value not in choices:
            raise RecipeError(f"{source}: {prefix}{key} must be one of {', '.join(choices)}, got {value!r}")
    return dict(values)


def trainer_config_class(kind: str):
    """TRL's config class for a recipe kind: the `train` section's fields are its fields."""
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import SFTConfig

    return SFTConfig
