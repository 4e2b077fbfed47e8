"""Figures per language and task family: a router rigged to send French tokens to expert 0 shows in the
per-language shares and in the routing gap, which the unrigged router stays under; the per-group figures
add up to the totals; the report has the per-language table and heatmaps."""

import json
import shutil

import pytest
import torch

from finetune.evaluate import main as evaluate_main
from finetune.evaluation.groups import routing_gap
from finetune.evaluation.run import evaluate
from finetune.evaluation.suite import Suite

# A routing gap (0..1) that a router treating one language apart exceeds and an untrained one does not: on
# the 200 bundled held-out conversations the seeded tiny router measures 0.05 (0.09 on 40 of them); rigged,
# 0.14 (French-only tokens are 28% of the French ones, and each takes one of its two expert slots at 0).
GAP_THRESHOLD = 0.1
CHAT = "data/chat/eval.jsonl"


def french_only_tokens(encoder) -> set[int]:
    """Token ids that occur in the French held-out conversations and in no other language's."""
    by_lang: dict[str, set[int]] = {}
    for line in open(CHAT, encoding="utf-8"):
        row = json.loads(line)
        by_lang.setdefault(row["lang"], set()).update(encoder.encode(row["messages"]).input_ids)
    others = set().union(*(ids for lang, ids in by_lang.items() if lang != "fr"))
    return by_lang["fr"] - others


def rig_french_to_expert_0(folder, encoder) -> None:
    """Rewrite a tiny Mixtral so that every layer routes French-only tokens to expert 0 and no other token
    to it: attention and experts add nothing to the residual stream, so each router reads the token's own
    embedding, whose first coordinate is +1 for French-only tokens and -1 for the rest; router row 0 reads
    that coordinate, strongly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    french = torch.tensor(sorted(french_only_tokens(encoder)))
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = -1.0
        embed[french, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.gate.weight[0] = 0.0
            layer.mlp.gate.weight[0, 0] = 100.0
    model.save_pretrained(folder)


def test_rigged_router_shows_french_going_to_expert_0(tiny_model_dir, encoder, tmp_path):
    suite = Suite(name="languages", chat=CHAT, max_length=256, batch_size=16)
    balanced, _ = evaluate(str(tiny_model_dir), suite, progress=False)
    rigged_dir = tmp_path / "rigged"
    shutil.copytree(tiny_model_dir, rigged_dir)
    rig_french_to_expert_0(rigged_dir, encoder)
    rigged, _ = evaluate(str(rigged_dir), suite, progress=False)

    shares = rigged["heldout"]["routing_by_group"]["lang"]["share"]
    assert sorted(shares) == ["de", "en", "es", "fr", "it"]
    for layer in range(len(shares["fr"])):
        assert shares["fr"][layer][0] > 0.1  # every French-only token picks expert 0 ...
        assert all(shares[lang][layer][0] == 0 for lang in ("en", "de", "es", "it"))  # ... and nothing else does
    gap = rigged["heldout"]["routing_by_group"]["lang"]["gap"]
    assert gap == pytest.approx(sum(shares["fr"][layer][0] for layer in range(len(shares["fr"]))) / len(shares["fr"]))
    balanced_gap = balanced["heldout"]["routing_by_group"]["lang"]["gap"]
    print(f"routing gap between languages: rigged {gap:.3f}, seeded router {balanced_gap:.3f}")
    assert gap > GAP_THRESHOLD > balanced_gap

    # Per-language losses, weighted by their tokens, give the total; token counts add up.
    by_lang = rigged["heldout"]["by_group"]["lang"]
    assert sum(g["tokens"] for g in by_lang.values()) == rigged["heldout"]["tokens"]
    weighted = sum(g["loss"] * g["tokens"] for g in by_lang.values()) / rigged["heldout"]["tokens"]
    assert weighted == pytest.approx(rigged["heldout"]["loss"], rel=1e-9)


def test_routing_gap_is_the_largest_share_difference_averaged_over_layers():
    shares = torch.tensor([[[0.5, 0.5], [0.25, 0.75]],   # group a: layer 0, layer 1
                           [[0.5, 0.5], [0.75, 0.25]],   # group b
                           [[0.4, 0.6], [0.5, 0.5]]],    # group c
                          dtype=torch.float64)
    # layer 0: expert 0 spans 0.4..0.5, expert 1 0.5..0.6 -> 0.1; layer 1: 0.25..0.75 -> 0.5
    assert routing_gap(shares) == pytest.approx((0.1 + 0.5) / 2)
    assert routing_gap(shares[:1]) == 0.0


def test_report_has_per_language_and_task_tables_and_heatmaps(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate_main([str(tiny_model_dir), "--suite", "eval/bundled.yaml", "--out", str(out), "limit=40",
                          "max_new_tokens=4", "lm_eval_tasks=[]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["model"]
    report = (out / "report.md").read_text()
    assert "## By language" in report and "## By task family" in report
    for field, groups in (("lang", ["de", "en", "es", "fr", "it"]), ("task", ["arithmetic", "capital", "reverse",
                                                                             "spell", "uppercase"])):
        assert (out / f"router_by_{field}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"router_by_{field}.png" in report
        for group in groups:
            loss = metrics["heldout"]["by_group"][field][group]["loss"]
            exact = metrics["generation"]["by_group"][field][group]["exact_match"]
            logp = metrics["preferences"]["by_group"][field][group]["logp_accuracy"]
            assert f"| {group} | {loss:.4f} | {exact:.4f} |" in report
            assert f"| {logp:.4f} |" in report
    assert f"| all | {metrics['heldout']['loss']:.4f} |" in report
    prompts = sum(g["prompts"] for g in metrics["generation"]["by_group"]["lang"].values())
    assert prompts == metrics["generation"]["prompts"] == 40
