"""Where each tensor of a Mixtral checkpoint goes in a GGUF file, under what name and in what type.

llama.cpp runs Mixtral as its `llama` architecture with experts: per layer `attn_q/k/v/output`, the norms,
the router `ffn_gate_inp`, and the experts stacked into `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`
([experts, out, in] in numpy order). Names come from the `gguf` package's own tables (`MODEL_TENSORS`,
`TENSOR_NAMES`), so a name llama.cpp does not list for the architecture fails here, not at load time.

Types follow llama.cpp's converter: 1-D tensors (norms) and the router stay F32; every other matrix takes
the requested type. With q4_0 the output head is Q8_0, because llama.cpp's own quantizer keeps that most
sensitive matrix at a higher precision (Q6_K, which the package can only read, not write). A matrix
whose rows do not split into whole blocks is written F16, as llama.cpp falls back too.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from finetune.errors import InputError

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR

GGUF_TYPES = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
"""What `--gguf` writes with the package's own quantizers."""
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
K_QUANTS = {"q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S",
            "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
"""K-quants (`--gguf` name: llama-quantize's name). The package can read them but not write them, so they
are made by llama.cpp's `llama-quantize` from an F16 file this export writes and verifies first."""

STACKS = {T.FFN_GATE_EXP: ("gate_up_proj", "gate"), T.FFN_UP_EXP: ("gate_up_proj", "up"),
          T.FFN_DOWN_EXP: ("down_proj", None)}
"""Expert stacks: (transformers 5's fused stack they come from, which rows of it: gate first, then up)."""
DENSE = {T.ATTN_NORM: "input_layernorm.weight", T.ATTN_Q: "self_attn.q_proj.weight",
         T.ATTN_K: "self_attn.k_proj.weight", T.ATTN_V: "self_attn.v_proj.weight",
         T.ATTN_OUT: "self_attn.o_proj.weight", T.FFN_NORM: "post_attention_layernorm.weight",
         T.FFN_GATE_INP: "mlp.gate.weight"}
"""A layer's other tensors: their names inside the layer, as transformers 5 (and checkpoint_layout) names them."""
OUTSIDE = {T.TOKEN_EMBD: "model.embed_tokens.weight", T.OUTPUT_NORM: "model.norm.weight", T.OUTPUT: "lm_head.weight"}


def gguf_name(tensor: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    if tensor not in gguf.MODEL_TENSORS[ARCH]:
        raise InputError(f"the gguf package lists no {tensor.name} for llama.cpp's {ARCH_NAME} architecture")
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"


@dataclass(frozen=True)
class Planned:
    """One tensor of the GGUF file."""

    name: str
    kind: gguf.MODEL_TENSOR
    layer: int | None
    shape: tuple[int, ...]
    """numpy order ([experts,] rows, row length); llama.cpp's ne is the reverse."""
    qtype: gguf.GGMLQuantizationType

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def tensor_type(kind: gguf.MODEL_TENSOR, shape: tuple[int, ...], requested: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or kind == T.FFN_GATE_INP:
        return Q.F32
    qtype = Q.Q8_0 if requested == "q4_0" and kind == T.OUTPUT else GGUF_TYPES[requested]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def check_config(config: dict) -> None:
    """Refuse a config llama.cpp's llama architecture would run differently from transformers."""
    if config.get("model_type") != "mixtral":
        raise InputError(f"model_type {config.get('model_type')!r}: the GGUF export writes Mixtral models")
    if config.get("sliding_window"):
        raise InputError(f"sliding_window {config['sliding_window']}: llama.cpp's {ARCH_NAME} architecture has no "
                         "sliding window, so the GGUF would attend further back than the model was trained to")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InputError(f"rope type {rope.get('rope_type', rope.get('type'))!r}: the GGUF export writes plain "
                         "RoPE only (Mixtral's)")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise InputError("head_dim x num_attention_heads != hidden_size: not a layout llama.cpp's llama reads")


def rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 1e6)))


def plan(config: dict, requested: str) -> list[Planned]:
    """Every tensor of the file, in the order it is written: embeddings, each layer, final norm, head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    experts, vocab = config["num_local_experts"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {T.ATTN_NORM: (hidden,), T.ATTN_Q: (q_rows, hidden), T.ATTN_K: (kv_rows, hidden),
              T.ATTN_V: (kv_rows, hidden), T.ATTN_OUT: (hidden, q_rows), T.FFN_NORM: (hidden,),
              T.FFN_GATE_INP: (experts, hidden), T.FFN_GATE_EXP: (experts, inter, hidden),
              T.FFN_UP_EXP: (experts, inter, hidden), T.FFN_DOWN_EXP: (experts, hidden, inter)}

    def planned(kind, layer, shape):
        return Planned(gguf_name(kind, layer), kind, layer, shape, tensor_type(kind, shape, requested))

    tensors = [planned(T.TOKEN_EMBD, None, (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        tensors += [planned(kind, layer, shapes[kind]) for kind in (*DENSE, *STACKS)]
    tensors += [planned(T.OUTPUT_NORM, None, (hidden,)), planned(T.OUTPUT, None, (vocab, hidden))]
    return tensors


def permute_for_llama(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from transformers' rotate-half RoPE order to llama.cpp's interleaved pairs, per head (what
    llama.cpp's converter does: each head's first and second halves interleaved)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def unpermute_from_llama(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_for_llama`."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def heads_of(kind: gguf.MODEL_TENSOR, config: dict) -> int | None:
    """The head count a q/k matrix is permuted by (None for other tensors)."""
    return {T.ATTN_Q: config["num_attention_heads"], T.ATTN_K: config["num_key_value_heads"]}.get(kind)
