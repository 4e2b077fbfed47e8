"""The memory plan: exact parameter counts from the meta device, DeepSpeed's accounting, a verdict."""

import contextlib
import io
import os
import re

import pytest

from finetune.model.config import read_model_config
from finetune.planning.memory import GIB, Setup, count_parameters, deepspeed_estimate, estimate, zero_settings
from finetune.recipe.loading import load_recipe


def run_plan(repo_root, *args):
    """`python -m finetune.plan ARGS` from the repository root, in this process (its libraries imported once)."""
    from finetune.cli import run_guarded
    from finetune.plan import main

    cwd, out = os.getcwd(), io.StringIO()
    os.chdir(repo_root)
    try:
        with contextlib.redirect_stdout(out):
            assert run_guarded(main, list(map(str, args))) == 0
    finally:
        os.chdir(cwd)
    return out.getvalue()


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
    assert "packed row" not in out  # flash_attention_2 takes the samples' boundaries: no mask
    rows = [row(out, label) for label in ("weights", "trained:", "ZeRO-3 gather", "activations", "LM head",
                                          "runtime")]
    assert row(out, "total") == pytest.approx(sum(rows), abs=0.03)
    assert "of 80 GiB per GPU: fits" in out
    assert "DOES NOT FIT" in run_plan(repo_root, "recipes/sft.yaml", "--gpus", 1, "--gpu-memory", 80)


def test_mixtral_8x7b_lora_with_one_expert_per_gpu(repo_root):
    """`expert_parallel: 8` on one node of 8: every GPU holds the whole model but 7 of every 8 experts (and their
    LoRA), and sends the routed rows, not the weights; the figures checked against Mixtral 8x7B's config."""
    out = run_plan(repo_root, "recipes/sft.yaml", "expert_parallel=8", "launch=recipes/accelerate/ep8.yaml", "--gpus", 8,
                   "--gpu-memory", 80)
    hidden, inter, experts, r, layers, top_k, tokens = 4096, 14336, 8, 16, 32, 2, 4096
    total = 46_702_792_704 + 224_395_264 - layers * experts * hidden  # the base and the LoRA r=16 of the test
    # above (the router, trained in full, counted once)
    expert_lora = experts * r * ((hidden + 2 * inter) + (inter + hidden))
    expert_params = layers * (experts * 3 * hidden * inter + expert_lora)
    assert "no ZeRO, expert parallel 8" in out
    assert row(out, "weights (bf16, experts /8: 1 of 8 per layer)") == pytest.approx(
        (total - expert_params * 7 / 8) * 2 / GIB, abs=0.006)
    held = 224_395_264 - layers * expert_lora * 7 / 8
    assert f"({held:,.0f} params, experts' /8)" in out
    assert row(out, "trained:") == pytest.approx(held * 16 / GIB, abs=0.006)
    assert "ZeRO-3 gather" not in out and "of 80 GiB per GPU: fits" in out
    # Sent per GPU per micro-step: 6 all-to-alls per layer of the routed rows, 7/8 of them to other GPUs; ZeRO-3
    # on the same GPUs gathers 7/8 of every weight twice and reduce-scatters the LoRA gradients.
    all_to_all = 6 * layers * tokens * top_k * hidden * 2 * 7 / 8
    assert row(out, "EP all-to-all of routed rows") == pytest.approx(all_to_all / 1e9, abs=0.006)
    zero3 = (2 * total * 2 + 224_395_264 * 2) * 7 / 8
    said = re.search(r"ZeRO-3 on the same devices instead: ([0-9.]+) GB = ([0-9,]+) ms at NVLink 450 GB/s "
                     r"\(([0-9.]+)x the bytes\)", out)
    assert float(said[1]) == pytest.approx(zero3 / 1e9, abs=0.006)
    assert float(said[2].replace(",", "")) == pytest.approx(zero3 / 450e9 * 1e3, abs=1)
    ep_total = float(re.search(r"total +([0-9.]+) += ", out)[1])
    assert float(said[3]) == pytest.approx(zero3 / 1e9 / ep_total, abs=0.06)
    # The ZeRO-3 plan offers EP beside its own traffic.
    zero3_out = run_plan(repo_root, "recipes/sft.yaml", "--gpus", 8, "--gpu-memory", 80)
    assert f"expert_parallel=8 instead: {ep_total:.2f} GB" in zero3_out


@pytest.mark.parametrize("offload", [False, True])
def test_full_finetune_model_states_agree_with_deepspeed(repo_root, tmp_path, monkeypatch, offload):
    path = tmp_path / "full.yaml"
    path.write_text(
        "kind: sft\nlaunch: recipes/accelerate/zero3.yaml\nmodel: mistralai/Mixtral-8x7B-v0.1\noutput_dir: x\n"
        "data: {train: [{path: data/chat/train.jsonl}], max_length: 4096}\nmethod: full\n"
    )
    monkeypatch.chdir(repo_root)
    recipe = load_recipe(path)
    config, _ = read_model_config(recipe.model, builtin=True)
    counts = count_parameters(recipe, config)
    stage, off_opt, off_param, ds = zero_settings(recipe, None, offload)
    setup = Setup(8, 1, stage, off_opt, off_param, 4096, 8, 1, ds["stage3_max_live_parameters"],
                  ds["stage3_max_reuse_distance"], prefetch_bucket_size=ds["stage3_prefetch_bucket_size"])
    plan = estimate(recipe, config, counts, setup, "gpu")
    ours = sum(b for what, b in plan.rows if what.startswith(("weights", "trained", "ZeRO")))
    ds_cpu, ds_gpu = deepspeed_estimate(counts, 8, 1, stage, off_opt, off_param)
    assert ours == pytest.approx(ds_gpu, rel=0.02)
    if offload:  # DeepSpeed adds a 1.5x buffer factor on the CPU side
        assert plan.cpu_bytes_per_node * 1.5 == pytest.approx(ds_cpu, rel=0.02)


def plan_output(argv, capsys) -> str:
    from finetune.plan import main

    assert main(argv) == 0
    return capsys.readouterr().out


def suggestions(output: str) -> list[tuple[str, float, list[str]]]:
    """(what changes, GiB per device, the re-plan command's arguments) for each suggested setup."""
    lines = output.split("nearest setups that fit:\n")[1].splitlines()
    found = []
    for said, command in zip(lines[0::2], lines[1::2]):
        what, total = re.match(r"  - (.+): ([0-9.]+) GiB per", said).groups()
        assert command.strip().startswith("python -m finetune.plan ")
        found.append((what, float(total), command.split()[3:]))
    return found


@pytest.mark.parametrize("argv, expected", [
    # One 80 GB GPU: the 47B weights alone do not fit. Offload, or a second GPU.
    (["--gpus", "1", "--gpu-memory", "80"], ["a 4-bit base (quantization=nf4", "offloaded to CPU",
                                             "2 devices (1 node(s) x 2)"]),
    # Eight GPUs without ZeRO: every GPU holds every weight; ZeRO-3 shards them, 4 bits shrink them, or each GPU
    # keeps half of the experts (expert parallelism over pairs of GPUs).
    (["--gpus", "8", "--zero", "0", "--gpu-memory", "80"], ["a 4-bit base (quantization=nf4", "ZeRO-3 (recipes",
                                                            "offloaded to CPU", "expert parallelism over 2 GPUs"]),
    # ZeRO-3 on 8 GPUs at 18 GiB: one expert per GPU fits, and so do offload and a second node.
    (["--gpus", "8", "--gpu-memory", "18"], ["expert parallelism over 8 GPUs", "offloaded to CPU",
                                             "16 devices (2 node(s) x 8)"]),
    # Nothing alone is enough (offload still holds 4 sequences of 4096 tokens): pairs of changes.
    (["--gpus", "1", "--gpu-memory", "12", "train.per_device_train_batch_size=4"],
     ["offloaded to CPU (recipes/accelerate/zero3_offload.yaml) + micro-batch 2 with 32 accumulation steps",
      "offloaded to CPU (recipes/accelerate/zero3_offload.yaml) + data.max_length 2048",
      "32 devices (4 node(s) x 8) + micro-batch 1 with 64 accumulation steps", "32 devices (4 node(s) x 8) + data.max_length 1024"]),
])
def test_every_suggested_setup_fits_when_planned_again(capsys, repo_root, monkeypatch, argv, expected):
    monkeypatch.chdir(repo_root)
    output = plan_output(["recipes/sft.yaml", *argv], capsys)
    assert "DOES NOT FIT" in output
    found = suggestions(output)
    for text in expected:
        assert any(text in what for what, _, _ in found), (text, found)
    assert len(found) == len(expected)
    for what, total, command in found:
        again = plan_output(command, capsys)
        assert ": fits (" in again, (what, again)
        assert row(again, "total") == pytest.approx(total, abs=0.006)
        assert "nearest setups" not in again
        assert len([a for a in command if a.startswith("train.per_device_train_batch_size=")]) <= 1


def test_nothing_fitting_is_said_plainly(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    output = plan_output(["recipes/sft.yaml", "--gpus", "1", "--gpu-memory", "4"], capsys)
    assert "DOES NOT FIT" in output and "nearest setups" not in output
    assert "nothing within 64 nodes, ZeRO-3 with offload, micro-batch 1 and data.max_length 256 fits in 4 GiB" in output


@pytest.mark.parametrize("recipe", ["recipes/sft_qlora.yaml", "recipes/dpo_qlora.yaml"])
def test_qlora_recipe_headers_state_what_the_plan_says(repo_root, recipe):
    """Mixtral 8x7B with a 4-bit base on one GPU: the verdicts for 80 and 48 GiB, as each header states them."""
    out = run_plan(repo_root, recipe)
    header = (repo_root / recipe).read_text()
    stated_total = float(re.search(r"says: ([0-9.]+) GiB per GPU", header).group(1))
    assert row(out, "total") == pytest.approx(stated_total, abs=0.05)
    for size in (80, 48):
        used = re.search(rf"of {size} GiB per GPU: fits \(([0-9]+)% used\)", out)
        assert used, out
        assert f"one {size} GB GPU ({used.group(1)}% used)" in header
    weights = row(out, "weights (46.44 B in 4-bit NF4")
    assert 23 <= weights <= 26  # Mixtral 8x7B's 4-bit weights with their scales, the rest in bf16


def test_a_4bit_recipe_is_not_planned_under_zero(repo_root, monkeypatch, capsys):
    from finetune.cli import run_guarded
    from finetune.plan import main

    monkeypatch.chdir(repo_root)
    assert run_guarded(main, ["recipes/sft_qlora.yaml", "--zero", "3"]) == 2
    assert "runs without DeepSpeed" in capsys.readouterr().err


def test_32k_recipe_header_states_what_the_plan_says(repo_root, capsys, monkeypatch):
    """Mixtral 8x7B at 32k tokens per row on 8 x 80 GiB, and the terms that grow with the row: activations and
    the LM head's trained rows linearly, the packed row's mask quadratically, the LM head's tile not at all."""
    monkeypatch.chdir(repo_root)
    header = (repo_root / "recipes/sft_32k.yaml").read_text()
    out = plan_output(["recipes/sft_32k.yaml", "--gpus", "8", "--gpu-memory", "80"], capsys)
    stated = re.search(r"says: ([0-9.]+) GiB per GPU, so it fits\n# 8 x 80 GB GPUs \(([0-9]+)% used\)", header)
    assert row(out, "total") == pytest.approx(float(stated.group(1)), abs=0.05)
    assert f"of 80 GiB per GPU: fits ({stated.group(2)}% used)" in out
    stated_terms = header.replace("\n# ", " ")
    assert f"{row(out, 'activations'):.1f} GiB are activations" in stated_terms
    assert f"{row(out, 'LM head'):.1f} GiB the LM head" in stated_terms
    # flash_attention_2 takes the packed samples' boundaries: no mask row; sdpa's mask is quadratic in the row.
    assert "packed row" not in out
    sdpa = plan_output(["recipes/sft_32k.yaml", "--gpus", "8", "--gpu-memory", "80", "attn_implementation=sdpa"], capsys)
    assert f"no {row(sdpa, 'packed row'):.1f} GiB row mask, as sdpa needs" in stated_terms
    assert row(sdpa, "total") == pytest.approx(row(out, "total") + row(sdpa, "packed row"), abs=0.02)
    half = plan_output(["recipes/sft_32k.yaml", "--gpus", "8", "--gpu-memory", "80", "data.max_length=16384"], capsys)
    assert row(out, "activations") == pytest.approx(2 * row(half, "activations"), rel=1e-3)
    half_sdpa = plan_output(["recipes/sft_32k.yaml", "--gpus", "8", "--gpu-memory", "80", "data.max_length=16384",
                             "attn_implementation=sdpa"], capsys)
    assert row(sdpa, "packed row") == pytest.approx(4 * row(half_sdpa, "packed row"), rel=1e-2)
    assert row(half, "LM head") < row(out, "LM head") < 2 * row(half, "LM head")  # the tile stays, rows grow
    split = plan_output(["recipes/sft_32k.yaml", "--gpus", "8", "--gpu-memory", "80", "sequence_parallel=2"], capsys)
    assert row(split, "activations") == pytest.approx(row(half, "activations"), rel=1e-6)  # half a row per GPU


def test_mixtral_8x22b_recipe_figures_are_checked_against_its_config(repo_root, capsys, monkeypatch):
    """The 8x22B plan the README and the recipe header state: 141B parameters counted from the config by hand,
    and the ZeRO-3 figures on 8 x 80 GiB."""
    monkeypatch.chdir(repo_root)
    hidden, inter, experts, layers, vocab, kv, r = 6144, 16384, 8, 56, 32768, 8 * 128, 16
    attention = 2 * hidden * hidden + 2 * hidden * kv
    per_layer = attention + experts * 3 * hidden * inter + experts * hidden + 2 * hidden
    total = layers * per_layer + 2 * vocab * hidden + hidden
    assert total == 140_630_071_296  # the "141B"
    active = layers * (attention + 2 * 3 * hidden * inter) + 2 * vocab * hidden
    assert active == pytest.approx(39.15e9, rel=1e-3)  # the "39B"
    out = plan_output(["recipes/sft_8x22b.yaml", "--gpus", "8", "--gpu-memory", "80"], capsys)
    lora = layers * (r * ((hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden))
                     + experts * r * ((hidden + 2 * inter) + (inter + hidden)))
    trainable = lora + layers * experts * hidden  # the routers train in full
    assert f"{(total - layers * experts * hidden) / 1e9:.3f} B frozen" in out
    assert f"({trainable:,} params, sharded /8)" in out
    assert row(out, "weights (bf16, sharded /8)") == pytest.approx((total + lora) * 2 / 8 / GIB, abs=0.006)
    assert row(out, "trained:") == pytest.approx(trainable * 16 / 8 / GIB, abs=0.006)
    header = (repo_root / "recipes/sft_8x22b.yaml").read_text().replace("\n# ", " ")
    readme = (repo_root / "README.md").read_text()
    used = re.search(r"of 80 GiB per GPU: fits \(([0-9]+)% used\)", out).group(1)
    assert f"says: {row(out, 'total'):.1f} GiB per GPU" in header and f"8 x 80 GB GPUs ({used}% used)" in header
    assert f"| **total** | **{row(out, 'total'):.2f} ({used}%)** |" in readme


@pytest.mark.slow
def test_mixtral_8x22b_recipe_headers_state_the_other_setups(repo_root, capsys, monkeypatch):
    """DPO, 64k tokens with and without sequence parallelism, 4 bits on one GPU: as the 8x22B headers state."""
    monkeypatch.chdir(repo_root)
    header = (repo_root / "recipes/sft_8x22b.yaml").read_text().replace("\n# ", " ")
    dpo = plan_output(["recipes/dpo_8x22b.yaml", "--gpus", "8", "--gpu-memory", "80"], capsys)
    assert f"says: {row(dpo, 'total'):.1f} GiB per GPU" in (repo_root / "recipes/dpo_8x22b.yaml").read_text()
    long = plan_output(["recipes/sft_8x22b.yaml", "--gpus", "8", "--gpu-memory", "80", "data.max_length=65536"], capsys)
    assert "DOES NOT FIT" in long and f"needs {row(long, 'total'):.1f} GiB and does not" in header
    split = plan_output(["recipes/sft_8x22b.yaml", "--gpus", "8", "--gpu-memory", "80", "data.max_length=65536",
                         "sequence_parallel=2"], capsys)
    split_used = re.search(r"fits \(([0-9]+)% used\)", split).group(1)
    assert f"it fits at {row(split, 'total'):.1f} GiB ({split_used}%)" in header
    four_bit = plan_output(["recipes/sft_qlora.yaml", "model=mistralai/Mixtral-8x22B-v0.1", "--gpus", "1",
                            "--gpu-memory", "141"], capsys)
    four_used = re.search(r"fits \(([0-9]+)% used\)", four_bit).group(1)
    assert f"one process): {row(four_bit, 'total'):.1f} GiB, so one 141 GB H200 ({four_used}%)" in header
    assert "DOES NOT FIT" in plan_output(["recipes/sft_qlora.yaml", "model=mistralai/Mixtral-8x22B-v0.1", "--gpus",
                                          "1", "--gpu-memory", "80"], capsys)
