"""Write a Mixtral checkpoint (either layout) as one GGUF file, streamed: one tensor in memory at a time, an
expert stack built one expert at a time.

Why by hand, not llama.cpp's `convert_hf_to_gguf.py`: that script is not on PyPI (it ships in the
llama.cpp repository), and it holds every tensor of the model as a lazy object until it writes. Here the
`gguf` package's writer does all the formatting: the header and tensor table are written first, from the
shapes alone (layout.py), then each tensor is read, quantized with the package's quantizers and appended.
Quantization is per row, so quantizing expert by expert and concatenating the bytes is the same as
quantizing the stack: peak memory is one expert in fp32 plus one stack in its quantized type.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.files.checkpoint_layout import dense_keys, expert_matrices
from finetune.files.safetensors import CheckpointFiles
from finetune.gguf_file.layout import (
    ARCH_NAME,
    DENSE,
    FILE_TYPES,
    OUTSIDE,
    STACKS,
    Planned,
    check_config,
    heads_of,
    permute_for_llama,
    plan,
    rope_theta,
)
from finetune.gguf_file.vocab import add_tokenizer, tokenizer_metadata


def write_gguf(model_dir: str | Path, path: str | Path, requested: str, progress: bool = True) -> list[Planned]:
    """Write `model_dir` (a merged or base Mixtral folder) to the GGUF file `path` in `requested` type
    (a key of layout.GGUF_TYPES); returns what was written, in order."""
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    check_config(config)
    checkpoint = CheckpointFiles(folder)
    tensors = plan(config, requested)
    writer = gguf.GGUFWriter(path, ARCH_NAME)
    add_hyperparameters(writer, config, requested, folder.name)
    add_tokenizer(writer, tokenizer_metadata(folder, config["vocab_size"]))
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.byte_shape, np.dtype(np.uint8), tensor.nbytes, tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, desc=f"writing {Path(path).name}", unit="B", unit_scale=True, disable=not progress) as bar:
        for tensor in tensors:
            data = tensor_bytes(checkpoint, config, tensor)
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            del data
    writer.close()
    return tensors


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, requested: str, name: str) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[requested])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


ROWS_AT_ONCE = 1 << 22
"""Values quantized (and checked, read.py) per slice of rows: the package's quantizers make several
full-size temporaries, so a whole embedding (201M values in Mixtral 8x22B) at once would cost gigabytes.
Quantization is per row, so slices give the same bytes."""


def encoded(matrix: torch.Tensor, tensor: Planned) -> np.ndarray:
    """`matrix` (any float dtype) in the tensor's GGUF type, as the bytes the file holds."""
    array = np.ascontiguousarray(matrix.float().numpy())
    if tensor.qtype == gguf.GGMLQuantizationType.F32:
        return array.view(np.uint8)
    if array.ndim == 1:
        return np.ascontiguousarray(gguf.quants.quantize(array, tensor.qtype)).view(np.uint8)
    out = np.empty(gguf.quant_shape_to_byte_shape(array.shape, tensor.qtype), dtype=np.uint8)
    step = max(1, ROWS_AT_ONCE // array.shape[-1])
    for start in range(0, array.shape[0], step):
        out[start:start + step] = np.ascontiguousarray(
            gguf.quants.quantize(array[start:start + step], tensor.qtype)).view(np.uint8)
    return out


def tensor_bytes(checkpoint: CheckpointFiles, config: dict, tensor: Planned) -> np.ndarray:
    """The bytes of one planned tensor, shaped as `tensor.byte_shape`."""
    if tensor.kind in OUTSIDE:
        key = OUTSIDE[tensor.kind]
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            key = OUTSIDE[gguf.MODEL_TENSOR.TOKEN_EMBD]
        data = encoded(checkpoint.get(key), tensor)
    elif tensor.kind in DENSE:
        matrix = checkpoint.get(dense_keys(checkpoint, tensor.layer)[DENSE[tensor.kind]])
        heads = heads_of(tensor.kind, config)
        if heads:
            matrix = torch.from_numpy(permute_for_llama(matrix.float().numpy(), heads))
        data = encoded(matrix, tensor)
    else:
        stack, rows = STACKS[tensor.kind]
        inter = config["intermediate_size"]
        part = {"gate": slice(None, inter), "up": slice(inter, None), None: slice(None)}[rows]
        data = np.empty(tensor.byte_shape, dtype=np.uint8)
        for expert, matrix in enumerate(expert_matrices(checkpoint, tensor.layer, stack, config["num_local_experts"])):
            data[expert] = encoded(matrix[part], tensor)
    return data.reshape(tensor.byte_shape)
