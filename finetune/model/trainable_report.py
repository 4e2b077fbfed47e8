"""What a pass prints before training about what trains: parameters per group, and which trainable groups
the router losses can reach, with a loud warning when they cannot reach the router."""

from __future__ import annotations

from torch import nn

from finetune.model.lora_targets import GROUPS, trainable_counts
from finetune.moe.router_losses import reachability
from finetune.recipe.schema import Recipe


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
            "the router is frozen and nothing upstream of it trains. Add 'router' to trainable or set them to 0."
        )
    return (
        "WARNING: the router is frozen (no 'router' in trainable): the load-balancing loss can only move "
        f"{reach}, which barely changes routing. Add 'router' to trainable to balance the experts."
    )
