"""Which adapters may be merged together onto which base: an export refuses, by name, a chain that would
silently give the wrong model.

- A DPO adapter trained from an SFT adapter already contains it (DPO loads the SFT adapter as its starting
  policy and trains that same adapter further), so `export SFT DPO` would add the SFT delta twice (measured:
  1.97x). Its `recipe.yaml` names the SFT adapter (`dpo.sft_adapter`): that adapter, listed beside it in
  either order, is refused.
- Every adapter records the base it was trained on (PEFT's `base_model_name_or_path`); one recorded on
  another base than the export's (the first adapter's) is refused. A base given explicitly (`--base`, a
  moved or copied base) is used as asked, and each adapter that records another is named.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.errors import InputError
from finetune.files.adapter_folder import ADAPTER_WEIGHTS, adapter_base
from finetune.files.hub_ids import same_model
from finetune.recipe.resolved import RECIPE_FILE
from finetune.recipe.typed_yaml import parse_yaml


class ChainError(InputError):
    """A chain of adapters that must not be merged as given; the message names them and the fix."""


def sft_parent(adapter: str | Path) -> str | None:
    """The SFT adapter a DPO adapter was trained from, as its recipe names it; None for any other adapter."""
    recipe_file = Path(adapter) / RECIPE_FILE
    if not recipe_file.is_file():
        return None
    recipe = parse_yaml(recipe_file.read_text()) or {}
    return (recipe.get("dpo") or {}).get("sft_adapter") if recipe.get("kind") == "dpo" else None


def weights_digest(adapter: str | Path) -> str | None:
    path = Path(adapter) / ADAPTER_WEIGHTS
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def is_same_adapter(a: str | Path, b: str | Path) -> bool:
    """The same folder, or a copy of it (the same weights)."""
    if same_model(str(a), str(b)):
        return True
    digests = weights_digest(a), weights_digest(b)
    return digests[0] is not None and digests[0] == digests[1]


def check_chain(adapters: list[str], base: str, base_given: bool = False) -> None:
    """Refuse a DPO adapter listed with the SFT adapter it contains, and adapters recorded on another base
    (with `base_given`, say so instead: the user named the base)."""
    for adapter in adapters:
        parent = sft_parent(adapter)
        if parent is None:
            continue
        for other in adapters:
            if other != adapter and is_same_adapter(other, parent):
                raise ChainError(f"{adapter} is a DPO adapter trained from the SFT adapter {other}, which it already "
                                 f"contains; merging both would add the SFT delta twice. Export {adapter} alone")
    for adapter in adapters:
        recorded = adapter_base(adapter)
        if recorded and same_model(recorded, base) is False:
            if base_given:
                print(f"note: {adapter} was trained on the base {recorded}; merging it onto {base} as --base asks")
                continue
            raise ChainError(f"{adapter} was trained on the base {recorded}, not on {base}: its deltas belong to that "
                             "base. Export it onto its own base (--base), or leave it out")
