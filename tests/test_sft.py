"""SFT: adapters on every group train, the router losses are added exactly once, runs resume exactly."""

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from finetune.model.lora_targets import group_of
from finetune.recipe.loading import load_recipe
from finetune.sft import main as sft_main
from finetune.train.outputs import save_outputs
from helpers import CONVERSATION, OTHER, batch_of, log_history, make_trainer, tiny_overrides

RECIPE = "recipes/tiny/sft.yaml"


# ---------------------------------------------------------------------------------------------
# One real training run, inspected by several tests


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    recipe, trainer, encoder = make_trainer(tiny_model_dir, out, max_steps=6, learning_rate=0.01)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    save_outputs(trainer, recipe, encoder)
    return recipe, trainer, before, out


def test_every_trained_group_changed_and_base_did_not(trained):
    _, trainer, before, _ = trained
    changed = {"attention": 0, "experts": 0, "router": 0}
    for name, param in trainer.model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        if param.requires_grad:
            assert moved, f"trainable {name} did not change"
            changed[group_of(name)] += 1
        else:
            assert not moved, f"frozen {name} changed"
    # lora_A and lora_B of q/k/v/o in 2 layers; both fused expert tensors (A and B) in 2 layers; 2 routers
    assert changed == {"attention": 16, "experts": 8, "router": 2}


def test_outputs_and_adapter_reload_gives_same_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, trainer, _, out = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer.model", "recipe.yaml"):
        assert (out / name).is_file(), name
    history = log_history(out)
    assert all("aux_loss" in h for h in history if "loss" in h)
    assert any("tokens_per_second" in h for h in history)
    assert "{% generation %}" in AutoTokenizer.from_pretrained(out).chat_template
    assert load_recipe(out / "recipe.yaml").train["max_steps"] == 6

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    trainer.model.eval()
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 28705, 28750, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The router losses: added once, scaled by their coefficient, blind to padding, not multiplied by
# gradient accumulation, and able to train the router.


def reference_terms(model, batch):
    """LM loss, load-balancing loss and z-loss computed independently with transformers' own outputs."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lm = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    mask = batch["attention_mask"].reshape(-1).float()
    z = torch.stack([(torch.logsumexp(l, -1) ** 2 * mask).sum() / mask.sum() for l in out.router_logits]).mean()
    return lm, out.aux_loss, z


@pytest.mark.parametrize("which", ["aux", "z"])
def test_loss_is_lm_plus_coef_times_router_loss(tiny_model_dir, tmp_path, which):
    key = "moe.aux_loss_coef" if which == "aux" else "moe.z_loss_coef"
    results = {}
    for coef in (0.05, 0.5):
        others = ["moe.aux_loss_coef=0", f"{key}={coef}"] if which == "z" else [f"{key}={coef}"]
        _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path / str(coef), *others)
        batch = batch_of(encoder, CONVERSATION, OTHER)
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        lm, aux, z = reference_terms(trainer.model, batch)
        term = aux if which == "aux" else z
        assert term > 0.1
        torch.testing.assert_close(loss, lm + coef * term, rtol=1e-5, atol=1e-6)  # once: not missing, not doubled
        results[coef] = (loss - lm).item()
    assert results[0.5] == pytest.approx(10 * results[0.05], rel=1e-4)


def test_right_padding_changes_no_router_loss(tiny_model_dir, tmp_path):
    _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path, "moe.z_loss_coef=0.1")
    trainer.model.eval()
    losses = {}
    for pad_to in (None, 40):
        batch = batch_of(encoder, CONVERSATION, pad_to=pad_to)
        with torch.no_grad():
            losses[pad_to] = trainer.compute_loss(trainer.model, dict(batch))
        metrics = trainer.router_terms.pop_means("eval")
        aux, z = metrics["aux_loss"], metrics["z_loss"]
        losses[pad_to] = (losses[pad_to].item(), aux, z)
    assert losses[None] == pytest.approx(losses[40], rel=1e-5)
    assert batch["input_ids"].shape[1] == 40 and batch["attention_mask"].sum() < 20


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def router_grads_for(tiny_model_dir, out, batch, accumulation, *extra):
    """Router gradient of the first optimizer step of a real Trainer run on one duplicated sample."""
    recipe, trainer, _ = make_trainer(
        tiny_model_dir, out, *extra, max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=0.0, warmup_steps=0,
    )
    one = trainer.train_dataset[0]
    from datasets import Dataset

    trainer.train_dataset = Dataset.from_list([one, one])
    capture = GradCapture()
    trainer.add_callback(capture)
    trainer.train()
    return {n: g for n, g in capture.grads.items() if ".mlp.gate." in n}


@pytest.mark.parametrize("coefs", [("moe.aux_loss_coef=0.5",), ("moe.aux_loss_coef=0", "moe.z_loss_coef=0.5")], ids=["aux", "z"])
def test_gradient_accumulation_does_not_multiply_router_loss(tiny_model_dir, tmp_path, coefs):
    whole = router_grads_for(tiny_model_dir, tmp_path / "2x1", 2, 1, *coefs)
    split = router_grads_for(tiny_model_dir, tmp_path / "1x2", 1, 2, *coefs)
    without = router_grads_for(tiny_model_dir, tmp_path / "off", 2, 1, "moe.aux_loss_coef=0", "moe.z_loss_coef=0")
    assert whole and whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(whole[name], without[name], atol=1e-6)  # the router loss does contribute


@pytest.mark.parametrize("which", ["aux", "z"])
def test_router_loss_alone_trains_the_router(tiny_model_dir, tmp_path, which):
    from finetune.moe.router import policy_logits
    from finetune.moe.router_losses import router_losses

    _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path)
    model = trainer.model.train()
    batch = batch_of(encoder, CONVERSATION, OTHER)
    with trainer.router_terms.tap.capture():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tap = trainer.router_terms.tap
    aux, z = router_losses(tap, policy_logits(tap), batch["attention_mask"])
    (aux if which == "aux" else z).backward()
    routers = [p for n, p in model.named_parameters() if ".mlp.gate." in n and p.requires_grad]
    assert len(routers) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize("overrides,warning", [
    # Router frozen, router losses on: they can only move the experts of earlier layers, said loudly.
    (["trainable=[experts]"], "WARNING: the router is frozen (no 'router' in trainable): the load-balancing loss can "
                              "only move experts (through the hidden states of later layers' routers)"),
    # Router trainable: nothing to warn about.
    (["trainable=[experts, router]"], None),
    # Router frozen but the router losses are off: nothing they could miss.
    (["trainable=[experts]", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"], None),
])
def test_frozen_router_warns_loudly_and_only_then(tiny_model_dir, tmp_path, capsys, overrides, warning):
    make_trainer(tiny_model_dir, tmp_path, *overrides, "lora.r=4")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING:")]
    assert warnings == ([] if warning is None else [warnings[0]]), err
    if warning is not None:
        assert warnings[0].startswith(warning), warnings[0]


# ---------------------------------------------------------------------------------------------
# Whole runs


def log_losses(out: Path) -> list[tuple[int, float]]:
    history = log_history(out)
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_resume_continues_the_same_run(tiny_model_dir, tmp_path, quantization):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=0.01)
    straight = tmp_path / "straight"
    assert sft_main([RECIPE, *tiny_overrides(tiny_model_dir, straight, **common), f"quantization={quantization}"]) == 0
    interrupted = tmp_path / "interrupted"
    overrides = tiny_overrides(tiny_model_dir, interrupted, **common) + [f"quantization={quantization}"]
    overrides = [o for o in overrides if o != "resume=never"]
    assert sft_main([RECIPE, *overrides, "stop_after_steps=3"]) == 0
    assert [s for s, _ in log_losses(interrupted)] == [1, 2, 3]
    assert sft_main([RECIPE, *overrides]) == 0  # resume=auto picks up checkpoint-3
    expected, got = log_losses(straight), log_losses(interrupted)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(expected, got):
        assert b == pytest.approx(a, rel=1e-5)
    # A changed recipe does not silently continue someone else's run.
    from finetune.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match="different run .*train.learning_rate"):
        sft_main([RECIPE, *overrides, "train.learning_rate=0.02"])


@pytest.mark.slow
def test_eval_loss_falls_on_tiny_recipe(pretrained_tiny_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(pretrained_tiny_dir, out, max_steps=60, eval_strategy="steps", eval_steps=60,
                               logging_steps=20)
    assert sft_main([RECIPE, *overrides]) == 0
    history = log_history(out)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2  # at start, at the end
    # Measured 4.82 -> 3.89: the base already knows where texts end, so the start is lower than it was.
    assert evals[-1] < 0.85 * evals[0], evals


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline .wandb file (a LevelDB-format log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow  # a training in its own process with wandb (about 13 s)
def test_wandb_offline_run_receives_metrics(tiny_model_dir, tmp_path, repo_root):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "finetune-test"}
    overrides = tiny_overrides(tiny_model_dir, out, report_to="wandb", max_steps=3)
    proc = subprocess.run([sys.executable, "-m", "finetune.sft", RECIPE, *overrides], cwd=repo_root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = [r for r in wandb_history(runs[0]) if "train/loss" in r]
    assert [r["train/global_step"] for r in rows] == [1, 2, 3]
    assert all(r["train/aux_loss"] > 0 for r in rows)
    logged = log_losses(out)
    assert [r["train/loss"] for r in rows] == pytest.approx([loss for _, loss in logged])
