"""`data.packing: true` (TRL's padding-free `bfd` packing): a packed row scores each sample exactly as alone,
the router losses and statistics count the same real tokens, and training learns the same."""

import pytest
import torch

from finetune.moe.router import RouterTap
from finetune.moe.router_losses import router_losses
from finetune.moe.router_stats import entropy_sums, expert_counts
from finetune.recipe.loading import load_recipe
from finetune.sft import build
from helpers import log_history, tiny_overrides

RECIPE = "recipes/tiny/sft.yaml"


@pytest.fixture(scope="module")
def packed(tiny_model_dir, tmp_path_factory):
    """The tiny SFT trainer with packing, and the first batch its data loader gives (2 packed rows)."""
    out = tmp_path_factory.mktemp("packed")
    overrides = tiny_overrides(tiny_model_dir, out, per_device_train_batch_size=2) + ["data.packing=true"]
    trainer, _ = build(load_recipe(RECIPE, overrides, expect_kind="sft"))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    return trainer.model, batch


def sample_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each sample in a packed row: positions restart at 0 for each."""
    starts = (position_ids[0] == 0).nonzero().squeeze(1).tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[1]]))


def separate_log_probs(model, batch) -> list[torch.Tensor]:
    """Each packed sample run alone: its next-token log-probs (0 where not trained)."""
    out = []
    for start, end in sample_spans(batch["position_ids"]):
        ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
        out.append(model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[0])
    return out


def split(per_position: torch.Tensor, batch) -> list[torch.Tensor]:
    """A packed row's next-token values, [1, T - 1], cut into the samples' own (a sample's last position
    scores the next sample's first token, whose label is masked)."""
    return [per_position[0, start:end - 1] for start, end in sample_spans(batch["position_ids"])]


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    log_p = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return log_p * (targets != -100)


def assert_per_sample_losses_equal(packed_log_probs: list[torch.Tensor], alone: list[torch.Tensor]):
    assert len(packed_log_probs) == len(alone) > 4
    for got, expected in zip(packed_log_probs, alone):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sum(), expected.sum(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_packed_row_scores_each_sample_as_if_alone(packed):
    model, batch = packed
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    alone = separate_log_probs(model, batch)
    packed_log_probs = model(**batch, fused_lm_head=True).log_probs  # what the trainer calls
    assert_per_sample_losses_equal(split(packed_log_probs, batch), alone)
    trained = sum(int((lp != 0).sum()) for lp in alone)
    assert int((packed_log_probs != 0).sum()) == trained > 50


@pytest.mark.parametrize("leak", ["all-ones attention mask", "use_cache=True"])
@torch.no_grad()
def test_the_check_catches_samples_that_see_each_other(packed, leak):
    """Either of these makes transformers' sdpa path skip the block-diagonal mask: the samples of a row
    attend to each other, and the comparison above must notice."""
    model, batch = packed
    alone = separate_log_probs(model, batch)
    if leak == "use_cache=True":
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        leaked = log_probs_from_logits(logits, batch["labels"])
    else:
        leaked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), fused_lm_head=True).log_probs
    with pytest.raises(AssertionError):
        assert_per_sample_losses_equal(split(leaked, batch), alone)
    # and the same plain-logits computation without the leak passes
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert_per_sample_losses_equal(split(log_probs_from_logits(logits, batch["labels"]), batch), alone)


@torch.no_grad()
def test_router_losses_and_statistics_count_the_same_real_tokens(packed):
    """The trainer passes no attention mask for a packed row (every token is real); a padded batch of the
    same samples with its mask gives the same load-balancing loss, z-loss, expert counts and entropy."""
    model, batch = packed
    spans = sample_spans(batch["position_ids"])
    width = max(end - start for start, end in spans)
    ids = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for row, (start, end) in enumerate(spans):
        ids[row, : end - start] = batch["input_ids"][0, start:end]
        mask[row, : end - start] = 1
    tap = RouterTap(model)
    try:
        with tap.capture():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        packed_logits = tap.take()
        with tap.capture():
            model(input_ids=ids, attention_mask=mask)
        padded_logits = tap.take()
    finally:
        tap.remove()
    for got, expected in zip(router_losses(tap, packed_logits, None), router_losses(tap, padded_logits, mask)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(expert_counts(packed_logits, tap.top_k, None), expert_counts(padded_logits, tap.top_k, mask))
    for got, expected in zip(entropy_sums(packed_logits, None), entropy_sums(padded_logits, mask)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # Without its mask the padded batch counts the pads: a different loss, so the comparison has teeth.
    unmasked = router_losses(tap, padded_logits, None)[0]
    assert abs(float(unmasked) - float(router_losses(tap, packed_logits, None)[0])) > 1e-4


@pytest.mark.slow
def test_sft_with_packing_learns_like_without(pretrained_tiny_dir, tmp_path):
    """The same recipe and about the same tokens per step (16 padded samples of ~39 tokens, or 2 packed rows
    of up to 256): held-out loss after 40 steps within 5%."""

    from finetune.sft import main as sft_main

    def eval_losses(out, batch, *extra):
        overrides = tiny_overrides(pretrained_tiny_dir, out, max_steps=40, eval_strategy="steps", eval_steps=20,
                                   eval_on_start=True, per_device_train_batch_size=batch)
        assert sft_main([RECIPE, *overrides, *extra]) == 0
        history = log_history(out)
        return [h["eval_loss"] for h in history if "eval_loss" in h]

    packed = eval_losses(tmp_path / "packed", 2, "data.packing=true")
    padded = eval_losses(tmp_path / "padded", 16)
    assert packed[-1] < packed[0] - 0.5, packed  # held-out loss goes down
    assert abs(packed[-1] - padded[-1]) <= 0.05 * padded[-1], (packed, padded)


@pytest.mark.slow
def test_packing_writes_nothing_into_the_data_cache(tiny_model_dir, tmp_path):
    """TRL packs the memory-mapped rows while building its trainer; its files stay out of our cache folder
    (which may be read-only, and whose files are checksummed)."""
    import json

    from helpers import make_trainer

    _, trainer, _ = make_trainer(tiny_model_dir, tmp_path / "out", "data.packing=true",
                                 f"data.cache_dir={tmp_path / 'cache'}")
    (folder,) = (tmp_path / "cache").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*summary["checksums"], "summary.json"])
    assert len(trainer.train_dataset) < summary["rows_read"]  # packed: fewer rows than samples
