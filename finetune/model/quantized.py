"""The base model in 4-bit (`quantization: nf4`), built one tensor at a time: QLoRA for Mixtral.

Attention projections become bitsandbytes `Linear4bit` layers (NF4 with double-quantized scales, as
QLoRA does). Each fused expert stack becomes an `NF4ExpertStack` (finetune/moe/nf4.py), quantized expert by
expert as it is read. Embeddings, norms, router and LM head stay in the training dtype: together about
1% of Mixtral 8x7B, and the router trains in full.

Why not `from_pretrained(quantization_config=BitsAndBytesConfig(...))`: transformers quantizes
`nn.Linear` modules only, so the expert stacks (97% of the weights) would stay 16-bit, and it collects a
layer's every w1 and w3 into one fused 16-bit stack before anything could quantize it. Here the model is
built on the meta device and each tensor is read from the safetensors shards (either layout,
finetune/files/checkpoint_layout.py) straight onto the training device, so the 16-bit weight held beside the
quantized model at any time is one expert's matrix, or one attention projection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.files.checkpoint_layout import (
    OUTSIDE_LAYER_TENSORS,
    STACKS,
    dense_keys,
    expert_matrices,
    stack_shape,
)
from finetune.files.safetensors import CheckpointFiles, allocate_large_tensors_with_mmap
from finetune.model.device import training_device
from finetune.moe.nf4 import BLOCKSIZE, QUANT_TYPE, NF4ExpertStack, bitsandbytes
from finetune.recipe.schema import Recipe, RecipeError


def checkpoint_folder(name: str, source: str) -> Path:
    """A local model folder as is; a Hub id downloaded (config and safetensors only) into the Hub cache."""
    path = Path(name)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise RecipeError(f"{source}: quantization: nf4 reads safetensors checkpoints, and {name} has none "
                          "(model.safetensors or model.safetensors.index.json)")
    return path


def device_for_training(recipe: Recipe) -> torch.device:
    """This process's device under accelerate (its own GPU, else the CPU; the CPU for `device: cpu`): where
    the quantized weights live."""
    from accelerate import PartialState

    return PartialState(cpu=training_device(recipe) == "cpu").device


def load_quantized_model(recipe: Recipe, dtype: torch.dtype, device: torch.device | str | None = None,
                         progress: bool = True):
    """The recipe's base model with NF4 attention and experts, on `device` (default: this process's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.moe.expert_lora import route_experts

    bnb = bitsandbytes(recipe.source)
    device = torch.device(device or device_for_training(recipe))
    allocate_large_tensors_with_mmap()  # each expert's matrix is read, quantized and freed: keep the heap flat
    folder = checkpoint_folder(recipe.model, recipe.source)
    checkpoint = CheckpointFiles(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=recipe.attn_implementation)

    for key in OUTSIDE_LAYER_TENSORS:
        if key in checkpoint.where:
            _assign(model, key, checkpoint.get(key).to(device, dtype))
    for index in tqdm(range(config.num_hidden_layers), desc="loading in 4-bit", unit=" layer", disable=not progress):
        layer = model.model.layers[index]
        for name, key in dense_keys(checkpoint, index).items():
            tensor = checkpoint.get(key)
            module_name, _, leaf = name.rpartition(".")
            if isinstance(layer.get_submodule(module_name), nn.Linear) and leaf == "weight":
                layer.set_submodule(module_name, _linear_4bit(bnb, tensor, dtype, device))
            else:
                _assign(layer, name, tensor.to(device, dtype))
        experts = layer.mlp.experts
        for stack in STACKS:
            shape = stack_shape(stack, config)
            matrices = expert_matrices(checkpoint, index, stack, shape[0])
            quantized = NF4ExpertStack.from_experts(matrices, shape, dtype, device)
            setattr(experts, stack, nn.Parameter(quantized, requires_grad=False))
        route_experts(experts)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary embedding's inverse frequencies are computed, not stored: compute them on the device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise RecipeError(f"{recipe.source}: model {recipe.model} has no tensor for {missing[:3]} in its checkpoint")
    return model


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(module_name), leaf, nn.Parameter(tensor))


def _linear_4bit(bnb, weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """bitsandbytes' 4-bit Linear (no bias, as in Mixtral) holding `weight` [out, in], quantized on `device`."""
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type=QUANT_TYPE, quant_storage=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(weight.to(device), requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=True, quant_type=QUANT_TYPE, quant_storage=torch.uint8,
                                     module=layer).to(device)  # moving an unquantized Params4bit quantizes it
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight the first time the layer runs in eval
    # mode without grad, for a bf16 kernel that has no backward: every later training step would then round
    # through bf16 and send no gradient through this layer into its input (measured: after one evaluation,
    # input gradients differ from the dequantized model's). Training evaluates between steps, so never repack.
    layer.support_avx512bf16_for_cpu = False
    return layer
