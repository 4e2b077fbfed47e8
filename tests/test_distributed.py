"""ZeRO-3 over 2 CPU processes (DeepSpeed's CPU accelerator, gloo): sharding, saving, equality with one
process, router losses, no hang with different routing, DPO, resume. And plain DDP with a 4-bit base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_as_one_process, launch, log_history, overrides_for, tiny_overrides

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def zero3_aux_on(tiny_model_dir, four_rows, tmp_path_factory):
    """Also tokenizes into a fresh data cache; the launch's output is kept next to the run folder."""
    work = tmp_path_factory.mktemp("z3")
    out = work / "aux-on"
    proc = launch("sft", "recipes/tiny/sft.yaml", overrides_for(tiny_model_dir, out, four_rows,
                                                                f"data.cache_dir={work / 'cache'}",
                                                                per_device_train_batch_size=2))
    (work / "launch.log").write_text(proc.stdout)
    return out


def test_one_process_tokenizes_and_the_other_reads_its_cache(zero3_aux_on):
    work = zero3_aux_on.parent
    log = (work / "launch.log").read_text()
    [folder] = list((work / "cache").iterdir())
    assert f"[process 0] data: tokenized into the cache {folder} in" in log
    assert f"[process 1] data: opened the cache {folder} in" in log
    assert log.index("[process 0] data: tokenized") < log.index("[process 1] data: opened")


def test_zero3_shards_every_large_parameter(zero3_aux_on):
    reports = [json.loads((zero3_aux_on / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in reports)
    assert all(r["leaf_modules"] == ["MixtralSparseMoeBlock"] for r in reports)
    large = {n: full for n, (_, full) in reports[0]["partitions"].items() if full >= 4096}
    assert any(n.endswith(".gate_up_proj") for n in large) and any("embed_tokens" in n for n in large)
    for name, full in large.items():
        for report in reports:
            local = report["partitions"][name][0]
            assert full / 2 <= local <= full / 2 + 2, (name, local, full)  # half, up to padding


def test_zero3_adapter_has_full_shapes_and_logs_router_loss(zero3_aux_on, tiny_model_dir, tmp_path):
    from finetune.sft import main as sft_main

    single = tmp_path / "single"
    sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, single, max_steps=1)])
    saved, reference = load_file(zero3_aux_on / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert saved.keys() == reference.keys()
    for key in saved:
        assert saved[key].shape == reference[key].shape and saved[key].numel() > 0, key
    history = log_history(zero3_aux_on)
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 3 and all(h["aux_loss"] > 0 for h in logs)


def test_zero3_matches_single_process_with_same_global_batch(tiny_model_dir, four_rows, tmp_path):
    common = ["moe.aux_loss_coef=0"]  # a per-rank mean: not additive over ranks
    sharded = tmp_path / "zero3"
    launch("sft", "recipes/tiny/sft.yaml", overrides_for(tiny_model_dir, sharded, four_rows, *common, per_device_train_batch_size=2))
    assert_same_as_one_process(sharded, tiny_model_dir, four_rows, common, tmp_path / "single")


def test_ddp_with_a_4bit_base_matches_single_process_with_same_global_batch(tiny_model_dir, four_rows, tmp_path):
    """Each rank holds a whole 4-bit copy (recipes/accelerate/cpu_ddp.yaml: 2 processes, gloo)."""
    common = ["moe.aux_loss_coef=0", "quantization=nf4"]
    ddp = tmp_path / "ddp"
    command = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu_ddp.yaml", "-m", "finetune.sft",
               "recipes/tiny/sft.yaml", *overrides_for(tiny_model_dir, ddp, four_rows, *common, per_device_train_batch_size=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "x 2 processes = 4 sequences per optimizer step" in proc.stdout
    assert_same_as_one_process(ddp, tiny_model_dir, four_rows, common, tmp_path / "single")


def test_zero3_resume_reproduces_uninterrupted_losses(tiny_model_dir, four_rows, zero3_aux_on, tmp_path):
    out = tmp_path / "resumed"
    overrides = overrides_for(tiny_model_dir, out, four_rows, per_device_train_batch_size=2,
                              save_strategy="steps", save_steps=2)
    overrides = [o for o in overrides if o != "resume=never"]
    launch("sft", "recipes/tiny/sft.yaml", [*overrides, "stop_after_steps=2"])
    launch("sft", "recipes/tiny/sft.yaml", overrides)
    history = lambda o: [(h["step"], h["loss"]) for h in log_history(o) if "loss" in h]  # noqa: E731
    got, expected = history(out), history(zero3_aux_on)
    assert [s for s, _ in got] == [1, 2, 3]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)


def test_zero3_dpo_runs_from_a_zero3_sft_adapter(tiny_model_dir, zero3_aux_on, tmp_path):
    out = tmp_path / "dpo"
    overrides = tiny_overrides(tiny_model_dir, out, max_steps=2, per_device_train_batch_size=2)
    overrides += [f"dpo.sft_adapter={zero3_aux_on}", "data.train=[{path: data/preferences/eval.jsonl}]",
                  "data.eval=[]", "data.eval_fraction=0"]
    launch("dpo", "recipes/tiny/dpo.yaml", overrides)
    logs = [h for h in log_history(out) if "loss" in h]
    assert len(logs) == 2
    assert logs[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3) and logs[0]["rewards/margins"] == pytest.approx(0, abs=1e-3)
    assert all(torch.isfinite(torch.tensor([h["loss"], h["aux_loss"]])).all() for h in logs)


def test_plan_is_within_2x_of_measured_peak(zero3_aux_on, tiny_model_dir):
    reports = [json.loads((zero3_aux_on / f"rank{r}.json").read_text()) for r in (0, 1)]
    measured = max(r["peak_rss_mib"] for r in reports)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.plan", "recipes/tiny/sft.yaml", f"model={tiny_model_dir}",
         "launch=recipes/accelerate/cpu_zero3.yaml", "train.per_device_train_batch_size=2", "--gpus", "2",
         "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = float(next(x for x in proc.stdout.splitlines() if x.strip().startswith("total")).split()[-1]) * 1024
    assert "DeepSpeed ZeRO-3" in proc.stdout
    assert measured / 2 <= total <= measured * 2, (total, measured)


def test_recipe_launch_config_relaunches_under_accelerate(tiny_model_dir, four_rows, tmp_path):
    out = tmp_path / "launched"
    overrides = overrides_for(tiny_model_dir, out, four_rows, per_device_train_batch_size=2, max_steps=1)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "FINETUNE_LAUNCHED")}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.sft", "recipes/tiny/sft.yaml", *overrides,
         "launch=recipes/accelerate/cpu_zero3.yaml"],
        cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching: accelerate launch --config_file recipes/accelerate/cpu_zero3.yaml" in proc.stdout
    # The steps ran in the 2 launched processes, not in the one that relaunched: each process read the data,
    # rank 0 alone announced and saved once, and the batch arithmetic counts 2 processes.
    assert "[process 0] data: " in proc.stdout and "[process 1] data: " in proc.stdout
    assert proc.stdout.count("SFT adapter written to") == 1 and "x 2 processes" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()


def test_zero3_full_finetune_saves_consolidated_16bit_weights(tiny_model_dir, four_rows, tmp_path):
    from finetune.model.tiny import checkpoint_keys

    out = tmp_path / "full"
    overrides = overrides_for(tiny_model_dir, out, four_rows, per_device_train_batch_size=2, max_steps=1)
    launch("sft", "recipes/tiny/sft.yaml", [*overrides, "method=full", "lora.r=null", "lora.lora_alpha=null", "trainable=[attention,router]",
                                               "train.gradient_checkpointing=false"])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert set(checkpoint_keys(out)) == set(checkpoint_keys(tiny_model_dir))  # original layout, nothing missing
    trained = dict(saved.named_parameters())
    for name, param in base.named_parameters():
        assert trained[name].shape == param.shape and trained[name].numel() > 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q], dict(base.named_parameters())[q])  # trained group moved
    e = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(trained[e], dict(base.named_parameters())[e])  # frozen group did not


def test_sequence_parallel_step_equals_one_process(tiny_model_dir, tmp_path):
    """DeepSpeed Ulysses over 2 CPU processes (`sequence_parallel: 2`): one SFT step on one long sample, each
    process holding half of its tokens, gives the loss and the LoRA gradients of one process holding all.
    Plain SGD at lr 1 with no clipping makes the adapter's change the gradient itself; router losses off (with
    sequence parallelism they are computed per process, over its half of the tokens)."""
    from finetune.data.chat_format import ChatEncoder, bundled_sentencepiece_path
    from finetune.sft import main as sft_main

    reply = " ".join(["each token goes to two of the experts and the reply carries on"] * 40)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Write a long text."},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    length = len(ChatEncoder(bundled_sentencepiece_path()).encode(json.loads(data.read_text())["messages"]).input_ids)
    assert length > 400
    common = ["lora.init_lora_weights=false", "moe.aux_loss_coef=0", "data.max_length=1024", "train.optim=sgd",
              "train.max_grad_norm=0", "train.weight_decay=0"]

    def run(out, lr):
        return overrides_for(tiny_model_dir, out, data, *common, max_steps=1, learning_rate=lr, per_device_train_batch_size=1)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu_zero3.yaml", "-m", "finetune.sft",
               "recipes/tiny/sft.yaml", *run(tmp_path / "sp", 1.0), "sequence_parallel=2"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tokens split across 2 processes (DeepSpeed Ulysses)" in proc.stdout
    assert sft_main(["recipes/tiny/sft.yaml", *run(tmp_path / "one", 1.0)]) == 0
    assert sft_main(["recipes/tiny/sft.yaml", *run(tmp_path / "start", 0.0)]) == 0

    adapters = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("sp", "one", "start")}
    assert len(adapters["one"]) == 26
    for key, start in adapters["start"].items():
        expected, got = adapters["one"][key] - start, adapters["sp"][key] - start  # -lr x gradient
        assert expected.abs().max() > 0, key
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), key
    loss = lambda out: log_history(out)[0]["loss"]  # noqa: E731
    assert loss(tmp_path / "sp") == pytest.approx(loss(tmp_path / "one"), rel=1e-5)
