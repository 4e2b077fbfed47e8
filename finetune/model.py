"""Load the base model and make the recipe's parameter groups trainable (LoRA or full).

Groups: `attention` (q/k/v/o projections), `experts` (fused `experts.gate_up_proj` / `experts.down_proj`,
reached with PEFT's `target_parameters`: the old `w1/w2/w3` module targets no longer exist in
transformers 5), `router` (`mlp.gate`, trained in full through `modules_to_save`: it is E x H per layer).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from finetune.config import Recipe, RecipeError
from finetune.errors import InputError
from finetune.moe import moe_blocks, reachability

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
ROUTER_MODULE = "gate"
GROUPS = ("attention", "experts", "router", "other")
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # LoraConfig fields a recipe leaves out


def training_dtype(recipe: Recipe) -> torch.dtype:
    return torch.bfloat16 if use_bf16(recipe) else torch.float32


def use_bf16(recipe: Recipe) -> bool:
    """The recipe's `train.bf16` if set, else bf16 exactly when the GPU supports it."""
    if "bf16" in recipe.train:
        return bool(recipe.train["bf16"])
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> bool:
    """Under ZeRO-3, gather each sparse MoE block's parameters as one unit. Ranks route their tokens to
    different experts, so per-expert gathers would stop matching across ranks and hang (DeepSpeed#4808)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted({type(block) for block in moe_blocks(model)}, key=lambda c: c.__name__))
    return True


class ModelSourceError(InputError):
    """A model folder or Hub id that cannot be loaded; the message names the option and the fix."""


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter folder records (PEFT's `base_model_name_or_path`), None if it records none."""
    return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")


def model_config(name: str, what: str = "model"):
    """The config of a model folder or Hub id, read before any weight loads (`what` names the option)."""
    from transformers import AutoConfig

    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            hint = "; it is a LoRA adapter, give its base model" if (path / "adapter_config.json").is_file() else ""
            raise ModelSourceError(f"{what}={name}: not a model folder (no config.json){hint}")
    elif name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelSourceError(f"{what}={name}: no such folder, and not a Hub id (org/name); for a tiny test "
                               f"model there: python -m finetune.tiny {name}")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        if path.exists():
            raise ModelSourceError(f"{what}={name}: config.json does not describe a model transformers can load "
                                   f"({first})") from None
        raise ModelSourceError(f"{what}={name}: no such folder, and its config cannot be read from the Hub "
                               f"({first}); check the name, the network and `huggingface-cli login`, or for a "
                               f"tiny test model: python -m finetune.tiny {name}") from None


def check_sft_adapter(recipe: Recipe) -> None:
    """DPO: `dpo.sft_adapter` is a PEFT adapter whose groups and rank the recipe's lora section matches."""
    sft = recipe.dpo.sft_adapter
    if recipe.kind != "dpo" or sft is None:
        return
    config_file = Path(sft) / "adapter_config.json"
    if not config_file.is_file():
        raise RecipeError(f"{recipe.source}: dpo.sft_adapter={sft!r} holds no adapter_config.json (run SFT first)")
    adapter = json.loads(config_file.read_text())
    groups = []
    if set(adapter.get("target_modules") or []) & set(ATTENTION_MODULES):
        groups.append("attention")
    if set(adapter.get("target_parameters") or []) & set(EXPERT_PARAMETERS):
        groups.append("experts")
    if ROUTER_MODULE in (adapter.get("modules_to_save") or []):
        groups.append("router")
    src = recipe.source
    if sorted(groups) != sorted(recipe.lora.targets):
        raise RecipeError(f"{src}: lora.targets {recipe.lora.targets} differ from the SFT adapter's {groups} ({sft})")
    for key in ("r", "lora_alpha"):
        if key in recipe.lora.peft and recipe.lora.peft[key] != adapter.get(key):
            raise RecipeError(f"{src}: lora.{key}={recipe.lora.peft[key]} differs from the SFT adapter's {adapter.get(key)}")


def load_base_model(recipe: Recipe, dtype: torch.dtype | None = None):
    """The recipe's base model, frozen parts in 4-bit when `quantization: nf4` (finetune/quantized_base.py)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or training_dtype(recipe)
    try:
        if recipe.quantization == "nf4":
            from finetune.quantized_base import load_quantized_model

            model = load_quantized_model(recipe, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=dtype)
    except OSError as err:
        raise RecipeError(f"{recipe.source}: cannot load model {recipe.model!r}: {err}") from None
    if not moe_blocks(model):
        raise RecipeError(f"{recipe.source}: model {recipe.model!r} ({type(model).__name__}) has no sparse MoE blocks")
    model.config.use_cache = False
    if getattr(model.config, "head_dim", None) is None:
        # Mixtral's config leaves head_dim unset (hidden / heads is implied). DeepSpeed's Ulysses reads it with
        # getattr(config, "head_dim", hidden // heads), gets None and fails; the value the model uses anyway.
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    mark_moe_blocks_as_zero3_leaves(model)
    return model


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    targets = recipe.lora.targets
    options = {**LORA_DEFAULTS, **recipe.lora.peft}
    return LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=ATTENTION_MODULES if "attention" in targets else [],
        target_parameters=EXPERT_PARAMETERS if "experts" in targets else None,
        modules_to_save=[ROUTER_MODULE] if "router" in targets else None,
        **options,
    )


def apply_method(model: nn.Module, recipe: Recipe) -> nn.Module:
    """LoRA adapters on the chosen groups (base frozen), or full training of the chosen groups."""
    if recipe.lora.method == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(group_of(name) in recipe.lora.targets)
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(recipe))
    check_adapters_applied(peft_model, recipe)
    return use_expert_kernel(peft_model, recipe)


def use_expert_kernel(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Expert LoRA on the routed tokens unless the recipe asks for PEFT's path (`lora.expert_kernel`)."""
    if recipe.lora.expert_kernel == "routed":
        from finetune.expert_lora import use_routed_expert_lora

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
    missing = [g for g in recipe.lora.targets if trainable[g] == 0]
    if missing:
        raise RecipeError(f"{recipe.source}: lora.targets {missing} matched no parameter of {recipe.model}")


def trainable_table(model: nn.Module, recipe: Recipe) -> str:
    trainable, total = trainable_counts(model)
    lines = [f"{'group':<10} {'trainable':>14} {'of':>16}   {'%':>7}"]
    for group in GROUPS:
        if total[group]:
            share = 100 * trainable[group] / total[group]
            lines.append(f"{group:<10} {trainable[group]:>14,} {total[group]:>16,}   {share:>6.2f}%")
    t, n = sum(trainable.values()), sum(total.values())
    lines.append(f"{'total':<10} {t:>14,} {n:>16,}   {100 * t / n:>6.2f}%")
    groups = {g: trainable[g] > 0 for g in GROUPS}
    if recipe.moe.aux_loss_coef > 0 or recipe.moe.z_loss_coef > 0:
        reach = reachability(model, groups)
        lines.append(f"router losses reach: {reach or 'NOTHING trainable'}")
    return "\n".join(lines)


def router_loss_warning(model: nn.Module, recipe: Recipe) -> str | None:
    """A loud warning when the router losses are on but cannot train the router."""
    if recipe.moe.aux_loss_coef == 0 and recipe.moe.z_loss_coef == 0:
        return None
    trainable, _ = trainable_counts(model)
    groups = {g: trainable[g] > 0 for g in GROUPS}
    if groups["router"]:
        return None
    reach = reachability(model, groups)
    if not reach:
        return (
            "WARNING: moe.aux_loss_coef / moe.z_loss_coef are on but NO trainable parameter can feel them: "
            "the router is frozen and nothing upstream of it trains. Add 'router' to lora.targets or set them to 0."
        )
    return (
        "WARNING: the router is frozen (no 'router' in lora.targets): the load-balancing loss can only move "
        f"{reach}, which barely changes routing. Add 'router' to lora.targets to balance the experts."
    )
