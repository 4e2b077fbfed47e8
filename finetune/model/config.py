"""A model's config, read before any weight loads: from a local folder, the Hub, or (for the plan, offline) a
built-in copy of Mixtral's public config. The one place configs are read, so every command agrees on what a
model name means (finetune/files/hub_ids.py) and names the option in its errors."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import InputError
from finetune.files.adapter_folder import is_adapter_folder
from finetune.files.hub_ids import is_hub_id

# Public configurations of Mixtral 8x7B and 8x22B, used by the plan when the Hub cannot be reached (it needs no weights).
KNOWN_CONFIGS = {
    "mistralai/Mixtral-8x7B-v0.1": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
    ),
}
KNOWN_CONFIGS["mistralai/Mixtral-8x7B-Instruct-v0.1"] = KNOWN_CONFIGS["mistralai/Mixtral-8x7B-v0.1"]
KNOWN_CONFIGS["mistralai/Mixtral-8x22B-v0.1"] = dict(
    vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
    num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=65536, rope_theta=1e6, tie_word_embeddings=False,
)
KNOWN_CONFIGS["mistralai/Mixtral-8x22B-Instruct-v0.1"] = KNOWN_CONFIGS["mistralai/Mixtral-8x22B-v0.1"]


class ModelSourceError(InputError):
    """A model folder or Hub id that cannot be loaded; the message names the option and the fix."""


def model_config(name: str, what: str = "model"):
    """The config of a model folder or Hub id (`what` names the option in errors)."""
    return read_model_config(name, what)[0]


def read_model_config(name: str, what: str = "model", builtin: bool = False):
    """(config, where it came from). With `builtin`, a Hub id with no cached config and no network falls back
    to the built-in copy of its public config, where there is one (the memory plan needs no weights)."""
    from transformers import AutoConfig, MixtralConfig

    path = Path(name)
    tiny_hint = f"for a tiny test model there: python -m finetune.tiny {name}"
    if path.exists():
        if not (path / "config.json").is_file():
            hint = "; it is a LoRA adapter, give its base model" if is_adapter_folder(path) else ""
            raise ModelSourceError(f"{what}={name}: not a model folder (no config.json){hint}")
    elif not is_hub_id(name):
        raise ModelSourceError(f"{what}={name}: no such folder, and not a Hub id (org/name); {tiny_hint}")
    if builtin and not path.exists():
        try:
            return AutoConfig.from_pretrained(name, local_files_only=True), "cached model config"
        except (OSError, ValueError):
            if name in KNOWN_CONFIGS:
                return MixtralConfig(**KNOWN_CONFIGS[name]), "built-in copy of its public config"
    try:
        return AutoConfig.from_pretrained(name), "model config" if path.exists() else "model config from the Hub"
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        if path.exists():
            raise ModelSourceError(f"{what}={name}: config.json does not describe a model transformers can load "
                                   f"({first})") from None
        raise ModelSourceError(f"{what}={name}: no such folder, and its config cannot be read from the Hub "
                               f"({first}); check the name, the network and `huggingface-cli login`, or {tiny_hint}"
                               ) from None
