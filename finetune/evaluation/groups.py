"""Evaluation figures per language and per task family, and how differently the router treats each.

Rows of an evaluation file may carry `lang` and `task` (the bundled data does: data/make_data.py). Each part
of an evaluation adds its per-row results here, keyed by those fields, so every figure is reported per
language and per task family next to its total, from the forward passes the part runs anyway.

Routing: each held-out row's routed-token counts (layer x expert, real tokens only) add up per group; a
group's share is its count over all routed tokens of that group in that layer. The routing gap of a field
is the mean across layers of the largest difference in one expert's share between two of its groups:

    gap = mean over layers l of  max over experts e of  (max over groups g - min over groups g) share[g, l, e]

0 when every language (or task family) is routed alike. A router that sends one language's tokens to an
expert the others never get scores about that expert's share of that language.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from finetune.data.groups import GROUP_FIELDS


class GroupMeans:
    """Running means of named figures per group: add (total, count) pairs, read means per field and group."""

    def __init__(self):
        self.totals: dict[tuple[str, str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str, str], float] = defaultdict(float)

    def add(self, groups: dict[str, str], name: str, total: float, count: float = 1.0) -> None:
        for field, group in groups.items():
            self.totals[field, group, name] += float(total)
            self.counts[field, group, name] += float(count)

    def figures(self, size: tuple[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """{field: {group: {name: mean}}}, groups sorted. `size=("tokens", "loss")` also gives each group
        the count behind its "loss" figure, as "tokens"."""
        out: dict = {}
        for (field, group, name), total in sorted(self.totals.items()):
            count = self.counts[field, group, name]
            figures = out.setdefault(field, {}).setdefault(group, {})
            figures[name] = total / count if count else float("nan")
            if size and name == size[1]:
                figures[size[0]] = int(count)
        return out


class RoutingByGroup:
    """Routed-token counts per layer x expert, summed per group; shares and the routing gap per field."""

    def __init__(self):
        self.counts: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, groups: dict[str, str], counts: torch.Tensor) -> None:
        for field, group in groups.items():
            key = (field, group)
            self.counts[key] = self.counts[key] + counts if key in self.counts else counts.clone()

    def figures(self) -> dict[str, dict]:
        """{field: {"share": {group: [[share per expert] per layer]}, "gap": routing gap}}."""
        out: dict = {}
        for field in GROUP_FIELDS:
            groups = sorted(group for f, group in self.counts if f == field)
            if not groups:
                continue
            shares = torch.stack([share_per_layer(self.counts[field, group]) for group in groups])
            out[field] = {"share": {g: s.tolist() for g, s in zip(groups, shares)}, "gap": routing_gap(shares)}
        return out


def share_per_layer(counts: torch.Tensor) -> torch.Tensor:
    """[layers, experts] counts -> each expert's share of the layer's routed tokens."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def routing_gap(shares: torch.Tensor) -> float:
    """[groups, layers, experts] shares -> mean over layers of the largest between-group difference in one
    expert's share (0 with fewer than two groups)."""
    if shares.shape[0] < 2:
        return 0.0
    spread = shares.max(0).values - shares.min(0).values  # layers x experts
    return spread.max(-1).values.mean().item()
