"""Where LoRA targets are chosen: the recipe's `trainable` groups as PEFT targets (or, with `method: full`,
as the parameters that train), and back from a saved adapter's config to its groups.

Groups: `attention` (q/k/v/o projections), `experts` (fused `experts.gate_up_proj` / `experts.down_proj`,
reached with PEFT's `target_parameters`: the old `w1/w2/w3` module targets no longer exist in
transformers 5), `router` (`mlp.gate`, trained in full through `modules_to_save`: it is E x H per layer).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from finetune.recipe.schema import Recipe, RecipeError

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
ROUTER_MODULE = "gate"
GROUPS = ("attention", "experts", "router", "other")
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # LoraConfig fields a recipe leaves out


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    targets = recipe.trainable
    options = {**LORA_DEFAULTS, **recipe.lora.peft}
    return LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=ATTENTION_MODULES if "attention" in targets else [],
        target_parameters=EXPERT_PARAMETERS if "experts" in targets else None,
        modules_to_save=[ROUTER_MODULE] if "router" in targets else None,
        **options,
    )


def make_trainable(model: nn.Module, recipe: Recipe) -> nn.Module:
    """LoRA adapters on the `trainable` groups (base frozen), or, with `method: full`, those groups' own
    weights trainable and everything else frozen."""
    if recipe.method == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(group_of(name) in recipe.trainable)
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(recipe))
    check_adapters_applied(peft_model, recipe)
    return select_expert_kernel(peft_model, recipe)


def select_expert_kernel(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Expert LoRA on the routed tokens (finetune/moe/expert_lora.py), unless `lora.expert_kernel: peft` keeps
    PEFT's own path."""
    if recipe.lora.expert_kernel == "routed":
        from finetune.moe.expert_lora import use_routed_expert_lora

        use_routed_expert_lora(model)
    return model


def group_of(name: str) -> str:
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name:
        return "experts"
    if f".mlp.{ROUTER_MODULE}." in name:
        return "router"
    return "other"


def trainable_counts(model: nn.Module) -> tuple[Counter, Counter]:
    """(trainable, total) parameter counts per group."""
    trainable, total = Counter(), Counter()
    for name, param in model.named_parameters():
        if ".original_module." in name:  # PEFT's frozen copy of a module it trains in full
            continue
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        group = group_of(name)
        total[group] += n
        if param.requires_grad:
            trainable[group] += n
    return trainable, total


def check_adapters_applied(model: nn.Module, recipe: Recipe) -> None:
    """Fail if a chosen group got no trainable parameter (e.g. targets that silently matched nothing)."""
    trainable, _ = trainable_counts(model)
    missing = [g for g in recipe.trainable if trainable[g] == 0]
    if missing:
        raise RecipeError(f"{recipe.source}: trainable {missing} matched no parameter of {recipe.model}")


def adapter_groups(adapter_config: dict) -> list[str]:
    """The groups a saved adapter trains, read from its `adapter_config.json` (the inverse of `lora_config`)."""
    groups = []
    if set(adapter_config.get("target_modules") or []) & set(ATTENTION_MODULES):
        groups.append("attention")
    if set(adapter_config.get("target_parameters") or []) & set(EXPERT_PARAMETERS):
        groups.append("experts")
    if ROUTER_MODULE in (adapter_config.get("modules_to_save") or []):
        groups.append("router")
    return groups
