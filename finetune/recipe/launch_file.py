"""The accelerate config a recipe names in `launch` (recipes/accelerate/*.yaml), and the DeepSpeed JSON it
points to: read here, for the parse-time checks, the relaunch and the memory plan."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.recipe.schema import RecipeError
from finetune.recipe.typed_yaml import read_yaml_file


def read_launch_file(launch: str | Path) -> dict:
    """An accelerate config as a mapping; a RecipeError naming the file when it is not one."""
    config = read_yaml_file(Path(launch), "launch", RecipeError)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RecipeError(f"{launch}: an accelerate config must be a mapping of keys, got {type(config).__name__}")
    return config


def uses_deepspeed(launch: str | Path) -> bool:
    """Whether an accelerate config runs DeepSpeed."""
    config = read_launch_file(launch)
    return str(config.get("distributed_type", "")).upper() == "DEEPSPEED" or bool(config.get("deepspeed_config"))


def launch_processes(launch: str | Path) -> int:
    """The processes an accelerate config starts (its `num_processes`, 1 when unset)."""
    processes = read_launch_file(launch).get("num_processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise RecipeError(f"{launch}: num_processes must be a whole number >= 1, got {processes!r}")
    return processes


def deepspeed_settings(launch: str | Path) -> dict:
    """The `zero_optimization` section of the DeepSpeed JSON an accelerate config names ({} without one)."""
    section = read_launch_file(launch).get("deepspeed_config") or {}
    json_file = section.get("deepspeed_config_file") if isinstance(section, dict) else None
    if not json_file:
        return {}
    return json.loads(Path(json_file).read_text()).get("zero_optimization", {})
