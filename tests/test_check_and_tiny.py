"""The tiny checkpoint looks like a real Mixtral repository; the pre-flight check shows what trains."""

import json

import torch

from finetune.model.tiny import checkpoint_keys, make_tiny_mixtral
from helpers import run_here, tiny_overrides


def test_tiny_checkpoint_layout_and_loading(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keys = checkpoint_keys(tiny_model_dir)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert len(list(tiny_model_dir.glob("model-*.safetensors"))) >= 2
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(keys)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 2 * 128, 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert "{% generation %}" in tokenizer.chat_template
    assert (tiny_model_dir / "tokenizer.model").is_file()


def test_tiny_checkpoint_is_seeded(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for shard in sorted(folder.glob("model-*.safetensors")):
            out.update(load_file(shard))
        return out

    again = tensors(make_tiny_mixtral(tmp_path / "same", seed=0))
    other = tensors(make_tiny_mixtral(tmp_path / "other", seed=1))
    first = tensors(tiny_model_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.block_sparse_moe.gate.weight"], other["model.layers.0.block_sparse_moe.gate.weight"])


def run_check(capsys, *args):
    return run_here(capsys, ["check", *args])


def test_check_shows_counts_lengths_and_marked_sample(capsys, tiny_model_dir, tmp_path):
    proc = run_check(capsys, "recipes/tiny/sft.yaml", f"model={tiny_model_dir}", "data.packing=true",
                     f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2200 read, 2000 train samples, 200 eval samples" in out
    assert "max_length 256 tokens: 0 sample(s) exceed it" in out
    assert "packing    2000 samples -> " in out
    sample = out.split("trained tokens inside ⟦ ⟧):\n")[1]
    assert sample.startswith("<s> [INST] ") and "[/INST]⟦ " in sample and "</s>⟧" in sample
    # Nothing of the prompt is inside the marks.
    for marked in sample.split("⟦")[1:]:
        assert "[INST]" not in marked.split("⟧")[0]


def test_check_counts_over_length_samples(capsys, tiny_model_dir, tmp_path):
    proc = run_check(capsys, "recipes/tiny/sft.yaml", f"model={tiny_model_dir}", "data.max_length=40",
                     f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "too long" in proc.stderr and "data.max_length=40" in proc.stderr
    proc = run_check(capsys, "recipes/tiny/sft.yaml", f"model={tiny_model_dir}", "data.max_length=40",
                     "data.on_bad_rows=skip", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    too_long = int(proc.stdout.split("max_length 40 tokens: ")[1].split(" ")[0])
    assert too_long > 0
    assert f"skipped    {too_long} bad row(s)" in proc.stdout


def test_check_dpo_recipe_needs_the_sft_adapter_and_shows_pairs(capsys, tiny_model_dir, tmp_path):
    from finetune.sft import main as sft_main

    common = [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'dpo'}"]
    proc = run_check(capsys, "recipes/tiny/dpo.yaml", *common, f"dpo.sft_adapter={tmp_path / 'sft'}")
    assert proc.returncode == 2  # what finetune.dpo refuses before loading, refused here too
    assert f"dpo.sft_adapter='{tmp_path / 'sft'}' holds no adapter_config.json (run SFT first)" in proc.stderr
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, tmp_path / "sft", max_steps=1)]) == 0
    proc = run_check(capsys, "recipes/tiny/dpo.yaml", *common, f"dpo.sft_adapter={tmp_path / 'sft'}")
    assert proc.returncode == 0, proc.stderr
    assert "2200 read, 2000 train samples, 200 eval samples" in proc.stdout
    assert "packing    off: DPO keeps each pair whole" in proc.stdout
    pair = proc.stdout.split("first preference pair (reply tokens inside ⟦ ⟧):\n")[1]
    prompt, replies = pair.split("\nchosen:   ")
    chosen, rejected = replies.split("\nrejected: ")
    assert prompt.startswith("prompt:   <s> [INST] ") and prompt.endswith("[/INST]") and "⟦" not in prompt
    for reply in (chosen, rejected):  # the whole reply and its EOS trained, nothing else
        assert reply.startswith("⟦ ") and reply.rstrip().endswith("</s>⟧") and reply.count("⟦") == 1


def test_check_missing_tiny_model_says_how_to_make_it(capsys, tmp_path):
    proc = run_check(capsys, "recipes/tiny/sft.yaml", f"model={tmp_path}/absent/model")
    assert proc.returncode == 2
    assert "python -m finetune.tiny" in proc.stderr and "Traceback" not in proc.stderr
