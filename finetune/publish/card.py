"""Model cards (README.md) for adapters, fully fine-tuned models and merged exports: what a user needs to
trust and reuse them. Cards are published, so bases and data are named by Hub id or by folder / file
name, never by this machine's paths, and every card goes through `redact` (finetune/recipe/secrets.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.files.hub_ids import public_name
from finetune.model.lora_targets import LORA_DEFAULTS
from finetune.recipe.resolved import RECIPE_FILE, to_dict
from finetune.recipe.schema import Recipe
from finetune.recipe.secrets import redact
from finetune.recipe.typed_yaml import parse_yaml


def public_recipe(recipe):
    """A resolved recipe (as written to recipe.yaml) with every value that names a path replaced by its public
    name (finetune/files/hub_ids.py), whichever key holds it (model, data files, cache_dir, resume, run_name,
    ...): a value with a path separator is a path unless it is a Hub id."""
    if isinstance(recipe, dict):
        return {key: public_recipe(value) for key, value in recipe.items()}
    if isinstance(recipe, list):
        return [public_recipe(value) for value in recipe]
    if isinstance(recipe, str) and ("/" in recipe or "\\" in recipe or recipe.startswith("~")):
        return public_name(recipe)
    return recipe


def front_matter(fields: dict) -> list[str]:
    """The card's YAML header, written by the YAML library so no value (a folder name with a newline, a colon)
    can add or change a key."""
    return ["---", *yaml.safe_dump(fields, sort_keys=False, default_flow_style=None).strip().splitlines(), "---"]


def title(name: str) -> str:
    return "# " + " ".join(str(name).split())  # one line, whatever the folder is called


def final_metrics(log_history: list[dict]) -> dict:
    """The last value of each interesting metric in a Trainer log history."""
    wanted = ("loss", "dpo_loss", "aux_loss", "z_loss", "eval_loss", "eval_aux_loss", "eval_mean_token_accuracy",
              "eval_rewards/accuracies", "eval_rewards/margins", "rewards/accuracies", "rewards/margins")
    found = {}
    for entry in log_history:
        for key in wanted:
            if key in entry:
                found[key] = entry[key]
    return found


QLORA_NOTE = ("Trained on a 4-bit NF4 copy of the base (QLoRA), but it is a plain adapter of the unquantized base: "
              "load it on that base as above, and merge it into that base (`python -m finetune.export`), never into "
              "dequantized 4-bit weights.")


def usage_lines(base: str, lora: bool) -> list[str]:
    """The card's "Use" snippet: the adapter loaded on its base, or the full model."""
    loading = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        "model = PeftModel.from_pretrained(base, 'THIS_FOLDER_OR_REPO')",
    ] if lora else [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER_OR_REPO')",
    ]
    tokenizer = "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER_OR_REPO')  # Mixtral-Instruct chat template"
    return ["```python", *loading, tokenizer, "```"]


def adapter_card(recipe: Recipe, log_history: list[dict]) -> str:
    """The card of a training pass's output: a LoRA adapter, or full fine-tuned weights."""
    metrics = final_metrics(log_history)
    base = public_name(recipe.model)
    datasets = [public_name(s.path) for s in recipe.data.train + recipe.data.eval]
    lora = recipe.method == "lora"
    peft = {**LORA_DEFAULTS, **recipe.lora.peft}
    what = (f"A {recipe.kind.upper()} LoRA adapter for `{base}`" if lora
            else f"`{base}` fully fine-tuned ({recipe.kind.upper()}) on {', '.join(recipe.trainable)}")
    start = public_name(recipe.dpo.sft_adapter) if recipe.kind == "dpo" else None
    lines = [
        *front_matter({"base_model": base, "library_name": "peft" if lora else "transformers",
                       "tags": ["mixtral", "moe", "lora" if lora else "full-fine-tune", recipe.kind, "mixtral-finetune"]}),
        "",
        title(Path(recipe.output_dir).name),
        "",
        what + ", trained with mixtral-finetune" + (f", continuing from the SFT adapter `{start}`" if start else "") + ".",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| datasets | {', '.join(f'`{d}`' for d in datasets)} |",
        f"| method | {recipe.method} on {', '.join(recipe.trainable)}"
        + (f" (r={peft['r']}, alpha={peft['lora_alpha']})" if lora else "") + " |",
        f"| router | {'trainable' if 'router' in recipe.trainable else 'frozen'} |",
        *([f"| base weights while training | 4-bit NF4 (QLoRA); the adapter belongs to the unquantized `{base}` |"]
          if recipe.quantization != "none" else []),
        f"| load-balancing loss coefficient | {recipe.moe.aux_loss_coef} |",
        f"| router z-loss coefficient | {recipe.moe.z_loss_coef} |",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in metrics.items()],
        "",
        "## Use",
        "",
        *usage_lines(base, lora),
        *(["", QLORA_NOTE] if recipe.quantization != "none" else []),
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(public_recipe(to_dict(recipe)), sort_keys=False).strip(),
        "```",
    ]
    return redact("\n".join(lines) + "\n")


def merged_card(name: str, base: str, adapters: list[str]) -> str:
    """The card of a merged export: the base, the adapters merged in order, and their recipes."""
    base = public_name(base)
    lines = [*front_matter({"base_model": base, "library_name": "transformers", "tags": ["mixtral", "moe", "merged-lora"]}),
             "", title(name), "", f"`{base}` with these LoRA adapters merged in, in order:", ""]
    files = {adapter: Path(adapter) / RECIPE_FILE for adapter in adapters}
    recipes = {adapter: parse_yaml(f.read_text()) or {} for adapter, f in files.items() if f.is_file()}
    for adapter in adapters:
        lines.append(f"- `{Path(adapter).name}`" + (" (recipe below)" if adapter in recipes else ""))
    for adapter, recipe in recipes.items():
        shown = yaml.safe_dump(public_recipe(recipe), sort_keys=False).strip()
        lines += ["", f"## {Path(adapter).name}", "", "```yaml", shown, "```"]
    if any(recipe.get("quantization", "none") != "none" for recipe in recipes.values()):
        lines += ["", "The adapters were trained on a 4-bit NF4 copy of the base (QLoRA) and are merged into the "
                  "original unquantized base, never into dequantized 4-bit weights."]
    lines += ["", "Weights are in the original Mixtral layout (`block_sparse_moe.experts.K.w1/w2/w3`)."]
    return redact("\n".join(lines) + "\n")
