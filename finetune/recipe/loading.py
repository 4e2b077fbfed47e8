"""From a YAML file and dotted overrides to a checked `Recipe`: every key, type and combination, before any
model loads.

    recipe = load_recipe("recipes/tiny/sft.yaml", ["train.max_steps=3"], expect_kind="sft")

Unknown keys, wrong types, secrets and impossible combinations raise `RecipeError` naming the recipe file
and the key (combinations: finetune/recipe/validation.py). Keys destined for PEFT's `LoraConfig` and TRL's
`SFTConfig` / `DPOConfig` are checked against those classes by name and type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.recipe.library_keys import check_library_keys
from finetune.recipe.schema import OWNED_LORA_KEYS, LoraSection, Recipe, RecipeError
from finetune.recipe.secrets import SECRET_FIX, redact, secret_values
from finetune.recipe.typed_yaml import build_dataclass, leaves, read_yaml_mapping
from finetune.recipe.validation import validate


def load_recipe(path: str | Path, overrides: list[str] = (), expect_kind: str | None = None) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides, build and validate the Recipe."""
    path = Path(path)
    raw = read_yaml_mapping(path, overrides, "recipe", RecipeError)
    if "source" in raw:
        raise RecipeError(f"{path}: unknown key 'source'")
    refuse_secret_values(raw, path, "", secret_values())
    raw["source"] = str(path)
    collect = {LoraSection: ("peft", lora_fields)}
    recipe = build_dataclass(Recipe, raw, str(path), "", RecipeError, collect)
    if expect_kind is not None and recipe.kind != expect_kind:
        raise RecipeError(
            f"{path}: this is a {recipe.kind!r} recipe (key 'kind'); run it with python -m finetune.{recipe.kind}"
        )
    validate(recipe)
    return recipe


def refuse_secret_values(node: Any, path: Path, key: str, secrets: list[str]) -> None:
    """A value that is (or holds) a token would be copied into every output: refuse it, naming the key."""
    for name, value in leaves(node, key):
        if isinstance(value, str) and redact(value, secrets) != value:
            raise RecipeError(f"{path}: {name} holds what looks like a secret (a Hub token, or the value of HF_TOKEN / "
                              f"WANDB_API_KEY); {SECRET_FIX}")


def lora_fields(extra: dict, source: str, prefix: str) -> dict:
    """The `lora` section's LoraConfig fields; null unsets a key (an override can drop `r` for full)."""
    from peft import LoraConfig

    extra = {k: v for k, v in extra.items() if v is not None}
    return check_library_keys(extra, LoraConfig, OWNED_LORA_KEYS, source, prefix)
