"""Model cards (README.md) for adapters and merged models: what a user needs to trust and reuse them."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.config import Recipe, to_dict


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


def adapter_card(recipe: Recipe, log_history: list[dict]) -> str:
    metrics = final_metrics(log_history)
    datasets = [s.path for s in recipe.data.train + recipe.data.eval]
    peft = recipe.lora.peft
    lines = [
        "---",
        f"base_model: {recipe.model}",
        "library_name: peft",
        f"tags: [mixtral, moe, lora, {recipe.kind}, mixtral-finetune]",
        "---",
        "",
        f"# {Path(recipe.output_dir).name}",
        "",
        f"A {recipe.kind.upper()} LoRA adapter for `{recipe.model}`, trained with mixtral-finetune"
        + (f", continuing from the SFT adapter `{recipe.dpo.sft_adapter}`" if recipe.kind == "dpo" and recipe.dpo.sft_adapter else "")
        + ".",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{recipe.model}` |",
        f"| datasets | {', '.join(f'`{d}`' for d in datasets)} |",
        f"| method | {recipe.lora.method} on {', '.join(recipe.lora.targets)}"
        + (f" (r={peft.get('r', 16)}, alpha={peft.get('lora_alpha', 32)})" if recipe.lora.method == "lora" else "") + " |",
        f"| router | {'trainable' if 'router' in recipe.lora.targets else 'frozen'} |",
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
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"base = AutoModelForCausalLM.from_pretrained({recipe.model!r})",
        "model = PeftModel.from_pretrained(base, 'THIS_FOLDER_OR_REPO')",
        "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER_OR_REPO')  # Mixtral-Instruct chat template",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(recipe), sort_keys=False).strip(),
        "```",
    ]
    return "\n".join(lines) + "\n"
