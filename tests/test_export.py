"""Streaming merged export: original layout, every group merged, logits equal base + adapters."""

import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open

from finetune.cli import run_guarded
from finetune.export import export, verify_merge
from finetune.export import main as export_cli_main
from finetune.sft import main as sft_main
from finetune.tiny import checkpoint_keys, make_tiny_mixtral


def export_main(argv):
    """`python -m finetune.export ARGV` in this process: the exit code as the command line gives it."""
    return run_guarded(export_cli_main, argv)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("base") / "many-shards", seed=3, max_shard_size="200KB", layers=4)


@pytest.fixture(scope="module")
def adapter(sharded_base, tmp_path_factory):
    """A non-zero adapter on attention, experts and router."""
    out = tmp_path_factory.mktemp("adapter") / "sft"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(sharded_base, out, max_steps=3, learning_rate=0.05)]) == 0
    return out


def tensors(folder):
    out = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_export_keeps_layout_and_merges_every_group(sharded_base, adapter, tmp_path):
    assert len(list(sharded_base.glob("model-*.safetensors"))) >= 8
    out = export([str(adapter)], tmp_path / "merged", progress=False).folder
    assert checkpoint_keys(out) == checkpoint_keys(sharded_base)
    base, merged = tensors(sharded_base), tensors(out)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                "model.layers.0.block_sparse_moe.gate.weight"):
        assert key in changed
    for expert in range(4):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.3.block_sparse_moe.experts.{expert}.{w}.weight" in changed
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded_base / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "README.md"):
        assert (out / name).is_file(), name
    # transformers loads it, and it computes what base + adapter computes (PEFT applying LoRA at run time).
    prompts = [[1, 733, 16289, 28793, 1824, 349, 28705, 28750, 28806, 28770, 28804, 733, 28748, 16289, 28793]]
    assert verify_merge(out, [str(adapter)], str(sharded_base), prompts) < 1e-4


def test_several_adapters_merge_in_order(sharded_base, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export([str(adapter), str(adapter)], tmp_path / "twice", progress=False).folder
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded_base), adapter).merge_and_unload()
    reference = PeftModel.from_pretrained(reference, adapter).eval()
    once = AutoModelForCausalLM.from_pretrained(export([str(adapter)], tmp_path / "once", progress=False).folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 733, 16289, 28793, 13397, 272, 1707, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        expected, got, single = reference(input_ids=ids).logits, merged(input_ids=ids).logits, once(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - single).abs().max() > 1e-2  # the second adapter really was applied on top


def test_cli_dtype_and_verification(sharded_base, adapter, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert export_main([str(adapter), "--out", str(out), "--dtype", "bf16"]) == 0
    assert "verification: max |logit difference|" in capsys.readouterr().out
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_adapter_is_a_clear_error(tmp_path, capsys, sharded_base):
    assert export_main([str(tmp_path), "--out", str(tmp_path / "o"), "--base", str(sharded_base)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_fused_base_checkpoint_is_merged_and_written_in_original_layout(sharded_base, adapter, tmp_path):
    """A base saved in transformers 5's fused in-memory layout (experts.gate_up_proj / down_proj)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    fused = tmp_path / "fused"
    fused.mkdir()
    state = AutoModelForCausalLM.from_pretrained(sharded_base).state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(sharded_base / name, fused)
    out = export([str(adapter)], tmp_path / "merged", base=str(fused), progress=False).folder
    assert checkpoint_keys(out) == checkpoint_keys(sharded_base)  # original per-expert layout
    reference = export([str(adapter)], tmp_path / "from-original", progress=False).folder
    a, b = tensors_single(out), tensors(reference)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def tensors_single(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
