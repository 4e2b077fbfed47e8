"""GGUF export for llama.cpp and Ollama: each type reads back with the `gguf` package under the names and shapes
the package maps Mixtral's tensors to, gives the merged model's logits within its tolerance, carries a
tokenizer that encodes conversations as mistral_common does, and fails verification when a block is corrupt."""

import copy
import json
import random
import re

import gguf
import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.chat_format import bundled_sentencepiece_path, tokenizer_from_pieces
from finetune.export import export_gguf, verification_prompts
from finetune.files.safetensors import CheckpointFiles
from finetune.gguf_file.layout import permute_for_llama
from finetune.gguf_file.read import GGUFCheckError, GGUFCheckpoint
from finetune.gguf_file.verify import TOLERANCES, verify_gguf
from finetune.model.tiny import make_tiny_mixtral
from helpers import nonzero_adapter, random_conversation, refused_here

TYPES = [pytest.param(kind, marks=pytest.mark.slow) for kind in ("f16", "bf16", "q8_0", "q4_0")]
"""Every type the package writes, in the slow tier (the fast tier's 5 minutes); the fast tier keeps the
permutation, the tokenizer round trip and the refusals, which need no verified export."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("gguf") / "base", seed=5, layers=3, max_shard_size="300KB")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A non-zero adapter on attention, experts and router."""
    return nonzero_adapter(base, tmp_path_factory.mktemp("gguf") / "sft")


def merged_tensors(folder):
    checkpoint = CheckpointFiles(folder)
    return {key: checkpoint.get(key) for key in checkpoint.where}


def expected_layout(folder, blocks):
    """{GGUF name: numpy shape} from the merged checkpoint, named by the gguf package's own map of HF names.
    Per-expert w1/w3/w2 are stacked first under `experts.w1` ..., as llama.cpp's converter does; a stack is
    [experts, out, in]."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, blocks)
    config = json.loads((folder / "config.json").read_text())
    expected = {}
    for key, tensor in merged_tensors(folder).items():
        name = names.get_name(re.sub(r"\.experts\.\d+\.", ".experts.", key), try_suffixes=(".weight",))
        assert name is not None, f"the gguf package maps no llama tensor to {key}"
        shape = tuple(tensor.shape)
        if ".experts." in key:
            shape = (config["num_local_experts"], *shape)
        assert expected.setdefault(name, shape) == shape
    return expected


@pytest.mark.parametrize("kind", TYPES)
def test_gguf_of_each_type_reads_back_and_gives_the_merged_logits(adapter, tmp_path, capsys, kind):
    from finetune.cli import run_guarded
    from finetune.export import main as export_main

    out = tmp_path / "merged"
    assert run_guarded(export_main, [str(adapter), "--out", str(out), "--gguf", kind]) == 0
    printed = capsys.readouterr().out
    path = out / f"merged-{kind}.gguf"
    assert f"ollama create merged -f {out / 'Modelfile'}" in printed
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{path.name}\n")
    assert (out / "config.json").is_file()  # the merged folder is there too, beside the GGUF

    config = json.loads((out / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    read = {t.name: t for t in reader.tensors}
    # Names and shapes: what the gguf package maps each merged tensor to, nothing more or less.
    assert {name: tuple(int(d) for d in reversed(t.shape)) for name, t in read.items()} == \
        expected_layout(out, config["num_hidden_layers"])
    # Types as llama.cpp's converter writes them: norms and router F32, the head Q8_0 under q4_0.
    expected_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[kind]
    for name, tensor in read.items():
        want = "F32" if name.endswith(("norm.weight", "ffn_gate_inp.weight")) else \
            "Q8_0" if kind == "q4_0" and name == "output.weight" else expected_type
        assert tensor.tensor_type.name == want, name
    assert reader.get_field("llama.expert_count").contents() == config["num_local_experts"]
    assert reader.get_field("llama.expert_used_count").contents() == config["num_experts_per_tok"]
    assert reader.get_field("llama.block_count").contents() == config["num_hidden_layers"]

    # The whole model, built by transformers from the file's dequantized tensors, against the merged model.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from_file = GGUFCheckpoint(path, config, CheckpointFiles(out))
    state = {}
    for key in list(from_file.where):
        if key.endswith(("gate_up_proj", "down_proj")):
            experts = config["num_local_experts"]
            state[key] = torch.stack([from_file.get(key, e) for e in range(experts)])
        else:
            state[key] = from_file.get(key)
    rebuilt = AutoModelForCausalLM.from_config(merged.config, dtype=torch.float32).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    relative = 0.0
    for prompt in verification_prompts(out):
        with torch.no_grad():
            want, got = merged(torch.tensor([prompt])).logits, rebuilt(torch.tensor([prompt])).logits
        relative = max(relative, float((got - want).abs().max() / want.abs().max()))
    assert relative <= TOLERANCES[kind], relative
    if kind == "f16":
        assert relative < 1e-3


def test_q_and_k_rows_follow_llama_cpp_rope(base):
    """llama.cpp rotates adjacent pairs (x0, x1), (x2, x3) ... of each head; transformers rotates (x_i, x_i+d/2).
    Attention scores from the permuted q/k under llama.cpp's rotation equal transformers' own."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

    config = AutoConfig.from_pretrained(base)
    tensors = merged_tensors(base)
    wq, wk = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.k_proj.weight"]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.head_dim or config.hidden_size // heads
    x = torch.randn(1, 7, config.hidden_size)
    positions = torch.arange(7)[None]
    cos, sin = MixtralRotaryEmbedding(config)(x, positions)
    q = (x @ wq.T).view(1, 7, heads, dim).transpose(1, 2)
    k = (x @ wk.T).view(1, 7, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    theirs = q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)

    def llama_cpp_rope(v):  # ggml's normal rope: pair (2i, 2i+1) turned by position * base^(-2i/d)
        theta = config.rope_parameters["rope_theta"] ** (-torch.arange(0, dim, 2) / dim)
        angle = positions[0][:, None] * theta[None]
        even, odd = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = even * angle.cos() - odd * angle.sin()
        out[..., 1::2] = even * angle.sin() + odd * angle.cos()
        return out

    pq = torch.from_numpy(permute_for_llama(wq.numpy(), heads))
    pk = torch.from_numpy(permute_for_llama(wk.numpy(), kv_heads))
    q2 = llama_cpp_rope((x @ pq.T).view(1, 7, heads, dim).transpose(1, 2))
    k2 = llama_cpp_rope((x @ pk.T).view(1, 7, kv_heads, dim).transpose(1, 2))
    ours = q2 @ k2.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    unpermuted = (x @ wq.T).view(1, 7, heads, dim).transpose(1, 2)
    assert not torch.allclose(llama_cpp_rope(unpermuted) @ llama_cpp_rope(unpermuted).transpose(-1, -2),
                              q @ q.transpose(-1, -2), atol=1e-3)  # the permutation is needed


def gguf_tokenizer(path):
    """A tokenizer built from the GGUF file's metadata alone, read with the gguf package's reader."""
    reader = gguf.GGUFReader(path)
    field = reader.get_field
    tokens = field(gguf.Keys.Tokenizer.LIST).contents()
    scores = field(gguf.Keys.Tokenizer.SCORES).contents()
    types = field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents()
    assert field(gguf.Keys.Tokenizer.MODEL).contents() == "llama"
    assert (field(gguf.Keys.Tokenizer.BOS_ID).contents(), field(gguf.Keys.Tokenizer.EOS_ID).contents()) == (1, 2)
    assert field(gguf.Keys.Tokenizer.ADD_BOS).contents() is True
    template = field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
    return tokenizer_from_pieces(list(zip(tokens, scores, types)), template), types


@pytest.mark.parametrize("version", ["v1", pytest.param("v3", marks=pytest.mark.slow)])
def test_tokenizer_metadata_encodes_conversations_as_mistral_common(tmp_path, version, tiny_model_dir,
                                                                    tiny_v3_model_dir):
    """300 conversations (system prompts, several turns) and 50 prompts: the chat template and pieces in the
    file give mistral_common's ids."""
    model = tiny_model_dir if version == "v1" else tiny_v3_model_dir
    export_gguf(model, tmp_path / "out", "q8_0", verify=False, progress=False)
    tokenizer, types = gguf_tokenizer(tmp_path / "out" / "out-q8_0.gguf")
    path = str(bundled_sentencepiece_path(version))
    reference = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)
    prompt_reference = MistralTokenizer.from_file(path, mode=ValidationMode.test)
    rng = random.Random(31)

    def ref_ids(tokenizer, messages):
        return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=copy.deepcopy(messages))).tokens

    for index in range(300):
        messages = random_conversation(rng, lookalikes=False)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == ref_ids(reference, messages), messages
        if index < 50:
            prompt = messages[:-1]
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
            assert ids["input_ids"] == ref_ids(prompt_reference, prompt)
    if version == "v3":  # control tokens are CONTROL, [REFERENCE_DOC_n] pieces USER_DEFINED
        sp = reference.instruct_tokenizer.tokenizer
        assert types[sp.get_control_token("[TOOL_CALLS]")] == gguf.TokenType.CONTROL
        assert gguf.TokenType.USER_DEFINED in set(types)
    assert "[INST]" in (tmp_path / "out" / "Modelfile").read_text()


@pytest.fixture(scope="module")
def q8_file(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "out"
    export_gguf(base, out, "q8_0", progress=False)
    return out / "out-q8_0.gguf"


@pytest.mark.parametrize("corruption,rows_at_once", [
    pytest.param("scale", None, marks=pytest.mark.slow), pytest.param("one value", None, marks=pytest.mark.slow),
    pytest.param("one value", 64, marks=pytest.mark.slow)])
def test_a_corrupted_q8_0_block_fails_verification(base, q8_file, tmp_path, monkeypatch, corruption, rows_at_once):
    """The sixth block of expert 0 of a down stack (rows of 128 values: 4 blocks a row) is row 1, columns
    32-63; the check names it, also when it checks a slice of rows at a time."""
    from finetune.gguf_file import write
    from finetune.gguf_file.layout import plan

    if rows_at_once:
        monkeypatch.setattr(write, "ROWS_AT_ONCE", rows_at_once)  # one row per slice

    config = json.loads((base / "config.json").read_text())
    planned = plan(config, "q8_0")
    check = verify_gguf(q8_file, base, "q8_0", planned, verification_prompts(base))  # intact: passes
    assert check.relative_logit_difference <= TOLERANCES["q8_0"] and check.worst_error <= 1
    broken = tmp_path / "broken.gguf"
    data = bytearray(q8_file.read_bytes())
    target = next(t for t in gguf.GGUFReader(q8_file).tensors if t.name == "blk.1.ffn_down_exps.weight")
    block = target.data_offset + 34 * 5  # the sixth block of 32 values: fp16 scale, then 32 int8
    if corruption == "scale":
        scale = np.frombuffer(bytes(data[block:block + 2]), dtype=np.float16)[0]
        data[block:block + 2] = np.float16(scale * 4).tobytes()
    else:
        value = np.frombuffer(bytes(data[block + 2 + 7:block + 3 + 7]), dtype=np.int8)[0]
        data[block + 2 + 7] = np.int8(-value if value else 40).tobytes()[0]
    broken.write_bytes(bytes(data))
    with pytest.raises(GGUFCheckError, match=r"blk\.1\.ffn_down_exps\.weight expert 0 at \[(\d+), (\d+)\]") as caught:
        verify_gguf(broken, base, "q8_0", planned, verification_prompts(base))
    row, column = (int(x) for x in re.search(r"at \[(\d+), (\d+)\]", str(caught.value)).groups())
    assert row == 1 and (column == 39 if corruption == "one value" else 32 <= column < 64), (row, column)


def test_refusals_name_the_fix(base, adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no llama-quantize
    refused_here(capsys, ["export", str(adapter), "--out", str(tmp_path / "o"), "--gguf", "q4_k_m"],
                 "llama-quantize, which is not on PATH")
    refused_here(capsys, ["export", str(adapter), "--out", str(tmp_path / "o"), "--gguf", "q9"],
                 "--gguf q9: not a type")
    refused_here(capsys, ["export", str(base), "--out", str(tmp_path / "o")], "a model folder, not an adapter")
    refused_here(capsys, ["export", str(base), "--gguf", "q8_0", "--out", str(base / "gguf")], "own inputs")
    refused_here(capsys, ["export", str(adapter), "--out", str(tmp_path / "o"), "--gguf-tolerance", "0.1"],
                 "give --gguf TYPE")
    refused_here(capsys, ["export", str(base), "--gguf", "q8_0", "--gguf-tolerance", "nan", "--out",
                          str(tmp_path / "o")], "--gguf-tolerance")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_failed_gguf_check_leaves_nothing(adapter, tmp_path, capsys):
    from finetune.cli import run_guarded
    from finetune.export import main as export_main

    out = tmp_path / "merged"
    code = run_guarded(export_main, [str(adapter), "--out", str(out), "--gguf", "q4_0", "--gguf-tolerance", "1e-9"])
    assert code != 0 and "logits differ from the merged model's" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
