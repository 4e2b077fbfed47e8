"""The memory plan: exact parameter counts from the meta device, DeepSpeed's accounting, a verdict."""

import re
import subprocess
import sys

import pytest

from finetune.config import load_recipe
from finetune.plan import (
    GIB,
    count_parameters,
    deepspeed_estimate,
    estimate,
    load_model_config,
    zero_settings,
)


def run_plan(repo_root, *args):
    proc = subprocess.run([sys.executable, "-m", "finetune.plan", *map(str, args)], cwd=repo_root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def row(output, label):
    line = next(x for x in output.splitlines() if x.strip().startswith(label))
    return float(line.split()[-1])


def test_mixtral_8x7b_lora_on_8_gpus_with_zero3(repo_root):
    out = run_plan(repo_root, "recipes/sft.yaml", "--gpus", 8, "--gpu-memory", 80)
    assert "DeepSpeed ZeRO-3" in out  # read from the recipe's launch config
    frozen = float(re.search(r"parameters: ([0-9.]+) B frozen", out).group(1))
    assert frozen == pytest.approx(46.70, abs=0.01)  # Mixtral 8x7B
    assert row(out, "weights (bf16, sharded /8)") == pytest.approx(46.92e9 * 2 / 8 / GIB, rel=0.01)
    # LoRA r=16 counted by hand: q/k/v/o, the fused experts (A: E*r x in, B: out x E*r), the router in full.
    hidden, inter, experts, r, layers = 4096, 14336, 8, 16, 32
    attention = r * ((hidden + hidden) + 2 * (hidden + 1024) + (hidden + hidden))
    expert_lora = experts * r * ((hidden + 2 * inter) + (inter + hidden))
    trainable = layers * (attention + expert_lora + experts * hidden)
    assert f"({trainable:,} params, sharded /8)" in out
    assert row(out, "trained:") == pytest.approx(trainable * 16 / 8 / GIB, abs=0.006)  # fp32 master, grads, Adam
    block = experts * 3 * hidden * inter + experts * hidden + expert_lora  # one MoE layer with its LoRA
    assert row(out, "ZeRO-3 gather") == pytest.approx(2 * block * 2 / GIB, abs=0.006)  # it and the prefetched next
    rows = [row(out, label) for label in ("weights", "trained:", "ZeRO-3 gather", "activations", "runtime")]
    assert row(out, "total") == pytest.approx(sum(rows), abs=0.03)
    assert "of 80 GiB per GPU: fits" in out
    assert "DOES NOT FIT" in run_plan(repo_root, "recipes/sft.yaml", "--gpus", 1, "--gpu-memory", 80)


@pytest.mark.parametrize("offload", [False, True])
def test_full_finetune_model_states_agree_with_deepspeed(repo_root, tmp_path, monkeypatch, offload):
    path = tmp_path / "full.yaml"
    path.write_text(
        "kind: sft\nlaunch: recipes/accelerate/zero3.yaml\nmodel: mistralai/Mixtral-8x7B-v0.1\noutput_dir: x\n"
        "data: {train: [{path: data/chat/train.jsonl}], max_length: 4096}\nlora: {method: full}\n"
    )
    monkeypatch.chdir(repo_root)
    recipe = load_recipe(path)
    config, _ = load_model_config(recipe.model)
    counts = count_parameters(recipe, config)
    stage, off_opt, off_param = zero_settings(recipe, None, offload)
    plan = estimate(recipe, config, counts, 8, 1, stage, off_opt, off_param, "gpu")
    ours = sum(b for what, b in plan.rows if what.startswith(("weights", "trained", "ZeRO")))
    ds_cpu, ds_gpu = deepspeed_estimate(counts, 8, 1, stage, off_opt, off_param)
    assert ours == pytest.approx(ds_gpu, rel=0.02)
    if offload:  # DeepSpeed adds a 1.5x buffer factor on the CPU side
        assert plan.cpu_bytes_per_node * 1.5 == pytest.approx(ds_cpu, rel=0.02)
