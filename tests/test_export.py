"""Streaming merged export: original layout, every group merged, logits equal base + adapters; its
layer-by-layer self-check equals the whole-model computation and catches a corrupted shard."""

import json

import pytest
import torch
from safetensors import safe_open

from finetune.cli import run_guarded
from finetune.export import export
from finetune.export import main as export_cli_main
from finetune.merge.verify import max_logit_difference, stream_logits
from finetune.model.tiny import checkpoint_keys, make_tiny_mixtral
from helpers import nonzero_adapter


def export_main(argv):
    """`python -m finetune.export ARGV` in this process: the exit code as the command line gives it."""
    return run_guarded(export_cli_main, argv)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("base") / "many-shards", seed=3, max_shard_size="200KB", layers=4)


@pytest.fixture(scope="module")
def adapter(sharded_base, tmp_path_factory):
    """A non-zero adapter on attention, experts and router."""
    return nonzero_adapter(sharded_base, tmp_path_factory.mktemp("adapter") / "sft")


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
    assert max_logit_difference(out, sharded_base, [str(adapter)], PROMPTS) < 1e-4


PROMPTS = [[1, 733, 16289, 28793, 1824, 349, 28705, 28750, 28806, 28770, 28804, 733, 28748, 16289, 28793],
           [1, 733, 16289, 28793, 13397, 272, 1707, 733, 28748, 16289, 28793]]


def whole_model_logits(model, prompts):
    with torch.no_grad():
        return [model.eval()(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


def test_layer_by_layer_check_computes_what_the_whole_models_compute(sharded_base, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = export([str(adapter), str(adapter)], tmp_path / "twice", progress=False, verify=False).folder
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded_base), adapter).merge_and_unload()
    with_peft = PeftModel.from_pretrained(with_peft, adapter)
    cases = [
        (stream_logits(sharded_base, PROMPTS, [adapter, adapter]), whole_model_logits(with_peft, PROMPTS)),
        (stream_logits(merged, PROMPTS), whole_model_logits(AutoModelForCausalLM.from_pretrained(merged), PROMPTS)),
        (stream_logits(sharded_base, PROMPTS), whole_model_logits(AutoModelForCausalLM.from_pretrained(sharded_base),
                                                                  PROMPTS)),
    ]
    for streamed, whole in cases:
        assert [s.shape for s in streamed] == [w.shape for w in whole] == [(len(p), 32000) for p in PROMPTS]
        for s, w in zip(streamed, whole):
            torch.testing.assert_close(s, w, rtol=0, atol=1e-5)
    # The two sides really differ: the adapters change the logits well beyond the tolerance.
    assert (cases[0][0][0] - cases[2][0][0]).abs().max() > 1e-2


@pytest.mark.parametrize("corrupt", ["model.layers.2.self_attn.o_proj.weight", "block_sparse_moe.experts.*.w2",
                                     "model.layers.0.block_sparse_moe.gate.weight"])
def test_check_fails_on_a_corrupted_merged_shard(sharded_base, adapter, tmp_path, corrupt):
    import shutil

    from safetensors.torch import save_file

    merged = export([str(adapter)], tmp_path / "merged", progress=False).folder
    assert max_logit_difference(merged, sharded_base, [str(adapter)], PROMPTS) < 1e-4
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    if "*" in corrupt:  # every expert's down projection of layer 1, by a little
        keys = [k for k in weight_map if k.startswith("model.layers.1.") and k.endswith("w2.weight")]
    else:
        keys = [corrupt]
    for shard in sorted({weight_map[k] for k in keys}):
        with safe_open(str(broken / shard), "pt") as f:
            shard_tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key in set(keys) & set(shard_tensors):
            shard_tensors[key] = shard_tensors[key] + 0.02 * torch.randn_like(shard_tensors[key])
        save_file(shard_tensors, str(broken / shard), metadata={"format": "pt"})
    assert max_logit_difference(broken, sharded_base, [str(adapter)], PROMPTS) > 1e-3  # the fp32 tolerance


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


def test_an_adapter_tensor_the_export_cannot_merge_is_refused_not_dropped(sharded_base, adapter, tmp_path, capsys):
    """E.g. PEFT's trainable token rows (`trainable_tokens_delta`): left out, the merged model would silently
    lack them."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    weights = load_file(copy / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 64)
    save_file(weights, copy / "adapter_model.safetensors")
    assert export_main([str(copy), "--out", str(tmp_path / "o"), "--base", str(sharded_base)]) == 2
    error = capsys.readouterr().err
    assert "token_adapter.trainable_tokens_delta is neither LoRA factors nor a router" in error
    assert not (tmp_path / "o").exists()


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


def test_an_adapter_on_the_lm_head_is_applied_and_merged(sharded_base, tmp_path):
    """A LoRA target that is a part itself (PEFT replaces the module): the check computes what PEFT computes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sharded_base),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "head-adapter", save_embedding_layers=False)
    streamed = stream_logits(sharded_base, PROMPTS, [tmp_path / "head-adapter"])
    for s, w in zip(streamed, whole_model_logits(model, PROMPTS)):
        torch.testing.assert_close(s, w, rtol=0, atol=1e-5)
    exported = export([str(tmp_path / "head-adapter")], tmp_path / "merged", progress=False)
    assert exported.max_logit_difference < 1e-4
