"""What a PEFT adapter folder is, in one place: its two files, the base it records, its LoRA scale, and
PEFT's layout of LoRA factors on fused expert stacks, both ways.

Read by the passes (DPO's start adapter), evaluation and chat (an adapter on its base), the export (merge
and verification), and the routed expert kernel (finetune/moe/expert_lora.py), which all agree on it here.

PEFT's `target_parameters` LoRA on a fused stack of E experts ([E, out, in]) keeps one pair of factors for
the whole stack: `lora_A.weight` [r*E, in], which is (E, r, in) expert-major, and `lora_B.weight` [out, r*E],
which is (out, r, E) expert-minor. Expert e's delta is then `scale * B_e @ A_e` with A_e [r, in], B_e [out, r].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the model's own parameter names in a saved adapter."""


class AdapterError(InputError):
    """A folder that is not a usable PEFT adapter; the message names it and what is missing."""


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict:
    """The adapter's `adapter_config.json`, or an AdapterError naming the folder."""
    config_file = Path(folder) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_file}: not readable JSON ({err}); the adapter folder is damaged") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: not a JSON object; the adapter folder is damaged")
    return config


def check_adapter_complete(folder: str | Path, what: str = "adapter") -> None:
    """Both files present: a finished adapter, not an interrupted save."""
    read_adapter_config(folder)
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{what}={folder}: an adapter folder without {ADAPTER_WEIGHTS} (unfinished?)")


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter records (PEFT's `base_model_name_or_path`), None if it records none."""
    return read_adapter_config(folder).get("base_model_name_or_path")


def lora_scale(config: dict) -> float:
    """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stack factors -> per expert: A [r*E, in] -> [E, r, in]; B [out, r*E] -> [E, out, r] (views)."""
    return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)


def stack_factors(a_per_expert: torch.Tensor, b_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `expert_factors`: A [E, r, in] -> [r*E, in]; B [E, out, r] -> [out, r*E]."""
    a = a_per_expert.reshape(-1, a_per_expert.shape[-1])
    b = b_per_expert.permute(1, 2, 0).reshape(b_per_expert.shape[1], -1)
    return a, b
