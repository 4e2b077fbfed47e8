"""DPO: the reference is the SFT policy, the router losses enter once, every loss variant is finite."""

import math

import pytest
import torch

from finetune.dpo import build
from finetune.dpo import main as dpo_main
from finetune.recipe.loading import load_recipe
from finetune.recipe.schema import RecipeError
from finetune.sft import main as sft_main
from helpers import ROOT, log_history, tiny_overrides


def recipe_aux_coef() -> float:
    return load_recipe("recipes/tiny/dpo.yaml").moe.aux_loss_coef

LN2 = math.log(2)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A clearly non-zero SFT adapter on attention, experts and router."""
    out = tmp_path_factory.mktemp("sft")
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, out, max_steps=5, learning_rate=0.02)]) == 0
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    return out


def dpo_overrides(model_dir, sft, out, *extra, **train):
    items = tiny_overrides(model_dir, out, **{"max_steps": 2, "per_device_train_batch_size": 4, **train})
    return items + [f"dpo.sft_adapter={sft}", *extra]


def first_log(out):
    history = log_history(out)
    return next(h for h in history if "loss" in h)


@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed-reference"])
def test_first_step_is_ln2_with_zero_margin(tiny_model_dir, sft_adapter, tmp_path, precompute):
    out = tmp_path / "dpo"
    overrides = dpo_overrides(tiny_model_dir, sft_adapter, out, precompute_ref_log_probs=precompute)
    if precompute:  # TRL scores the reference over every pair first: 16 pairs, not 2000, make the same first step
        rows = tmp_path / "pairs.jsonl"
        rows.write_text("".join((ROOT / "data/preferences/train.jsonl").read_text().splitlines(True)[:16]))
        overrides += [f"data.train=[{{path: {rows}}}]", "data.eval=[]", "data.eval_fraction=0"]
    assert dpo_main(["recipes/tiny/dpo.yaml", *overrides]) == 0
    log = first_log(out)
    assert log["dpo_loss"] == pytest.approx(LN2, abs=1e-3)
    assert log["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert log["loss"] == pytest.approx(LN2 + recipe_aux_coef() * log["aux_loss"], abs=1e-3)
    assert not (out / "ref").exists()
    # The adapter reloads with plain PEFT on the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert sorted(model.peft_config) == ["default"]


def test_reference_is_the_sft_policy_not_the_base(tiny_model_dir, sft_adapter, tmp_path):
    recipe = load_recipe("recipes/tiny/dpo.yaml", dpo_overrides(tiny_model_dir, sft_adapter, tmp_path), expect_kind="dpo")
    trainer, encoder = build(recipe)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy = model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        with model.disable_adapter():
            base = model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    reference = torch.cat([chosen, rejected])
    torch.testing.assert_close(reference, policy, rtol=1e-5, atol=1e-4)  # reference == SFT policy at step 0
    assert (reference - base).abs().max() > 0.1  # and far from the raw base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".ref." in n for n in trainable)


@pytest.mark.parametrize("coef", [0.05, 0.5])
def test_router_loss_enters_dpo_loss_once(tiny_model_dir, sft_adapter, tmp_path, coef):
    recipe = load_recipe(
        "recipes/tiny/dpo.yaml", dpo_overrides(tiny_model_dir, sft_adapter, tmp_path, f"moe.aux_loss_coef={coef}"),
        expect_kind="dpo",
    )
    trainer, _ = build(recipe)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True).aux_loss
    # At step 0 the policy equals the reference, so the DPO part is exactly ln 2.
    assert aux > 0.1
    assert loss.item() == pytest.approx(LN2 + coef * aux.item(), rel=1e-5)
    assert trainer.router_terms.pop_means("eval")["aux_loss"] == pytest.approx(aux.item(), rel=1e-5)


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [("sigmoid", 0.0, LN2), ("sigmoid", 0.2, LN2), ("ipo", 0.0, (1 / (2 * 0.1)) ** 2), ("hinge", 0.0, 1.0),
     ("robust", 0.2, LN2)],
)
def test_loss_variants_at_step_zero(tiny_model_dir, sft_adapter, tmp_path, loss_type, smoothing, expected):
    overrides = dpo_overrides(
        tiny_model_dir, sft_adapter, tmp_path, "moe.aux_loss_coef=0",
        loss_type=f"[{loss_type}]", label_smoothing=smoothing, beta=0.1,
    )
    trainer, _ = build(load_recipe("recipes/tiny/dpo.yaml", overrides, expect_kind="dpo"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model.eval(), dict(batch))
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_logged_metrics_add_up_from_ln2_in_fp32_and_bf16(tiny_model_dir, sft_adapter, tmp_path, bf16):
    out = tmp_path / "dpo"
    overrides = dpo_overrides(tiny_model_dir, sft_adapter, out, bf16=bf16, learning_rate=0.01)
    assert dpo_main(["recipes/tiny/dpo.yaml", *overrides]) == 0
    coef = load_recipe("recipes/tiny/dpo.yaml", overrides).moe.aux_loss_coef
    history = log_history(out)
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 2
    # Step 1: the policy is the reference, in bf16 too: exactly ln 2, no margin, nothing NaN (failure mode 9).
    assert logs[0]["dpo_loss"] == pytest.approx(LN2, rel=1e-6) and logs[0]["rewards/margins"] == 0
    for log in logs:
        assert all(math.isfinite(log[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies"))
        assert log["aux_loss"] > 0
        assert log["loss"] == pytest.approx(log["dpo_loss"] + coef * log["aux_loss"], rel=1e-3 if bf16 else 1e-5)
def test_adapter_shape_must_match_the_sft_adapter_before_loading(tiny_model_dir, sft_adapter, tmp_path):
    from finetune.train.preflight import preflight

    overrides = dpo_overrides(tiny_model_dir, sft_adapter, tmp_path, "lora.r=4")
    with pytest.raises(RecipeError, match="lora.r=4 differs from the SFT adapter's 8"):
        preflight(load_recipe("recipes/tiny/dpo.yaml", overrides, expect_kind="dpo"))
    overrides = dpo_overrides(tiny_model_dir, tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(RecipeError, match="holds no adapter_config.json"):
        preflight(load_recipe("recipes/tiny/dpo.yaml", overrides, expect_kind="dpo"))


@pytest.mark.slow
def test_tiny_pipeline_raises_heldout_preference_accuracy(pretrained_tiny_dir, tmp_path):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    sft_args = [f"model={pretrained_tiny_dir}", f"output_dir={sft}", "train.max_steps=100", "train.eval_strategy=no"]
    assert sft_main(["recipes/tiny/sft.yaml", *sft_args]) == 0
    dpo_args = [f"model={pretrained_tiny_dir}", f"output_dir={dpo}", f"dpo.sft_adapter={sft}", "train.max_steps=60",
                "train.eval_steps=60"]
    assert dpo_main(["recipes/tiny/dpo.yaml", *dpo_args]) == 0
    history = log_history(dpo)
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    assert evals[0]["eval_loss"] == pytest.approx(LN2 + recipe_aux_coef() * evals[0]["eval_aux_loss"], abs=1e-3)
    assert evals[-1]["eval_rewards/accuracies"] > 0.65, evals[-1]
    assert evals[-1]["eval_rewards/margins"] > 0
