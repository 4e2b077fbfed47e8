"""Merge LoRA adapters into the base checkpoint, one shard at a time, in the original Mixtral layout (what
`finetune export` writes before it verifies the result with finetune/merge/verify.py).

Why by hand: PEFT's `merge_and_unload` + `save_pretrained` needs the whole model in memory (93 GB for
Mixtral 8x7B in bf16). Here each base shard is read, the LoRA deltas of its tensors are added (attention
q/k/v/o; per-expert w1/w3 from the fused gate_up delta, w2 from the down delta; the router replaced by
the adapter's trained copy), the shard is written under the same name in the original per-expert
layout (a base saved with fused experts is split), and freed. Adapter tensors are read on demand, a
layer's expert factors once while its shard is written. Peak memory is about one shard plus one layer's
expert factors.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from finetune.errors import InputError
from finetune.files.adapter_folder import ADAPTER_WEIGHTS, PEFT_PREFIX, expert_factors, lora_scale, read_adapter_config
from finetune.files.safetensors import CheckpointFiles, SafetensorsFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                   "special_tokens_map.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
FUSED_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


class ExportError(InputError):
    """An adapter or base checkpoint that cannot be merged; the message says which and why."""


class Adapter:
    """One PEFT LoRA adapter folder, its tensors read on demand."""

    def __init__(self, folder: str | Path, hidden: int, intermediate: int, experts: int):
        self.folder = Path(folder)
        self.config = read_adapter_config(self.folder)
        for key in ("rank_pattern", "alpha_pattern", "trainable_token_indices"):
            if self.config.get(key):
                raise ExportError(f"{self.folder}: {key} is not supported by the streaming export")
        if self.config.get("use_dora"):
            raise ExportError(f"{self.folder}: DoRA adapters are not supported by the streaming export")
        self.scale, self.rank, self.experts = lora_scale(self.config), self.config["r"], experts
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ExportError(f"{self.folder}: no {ADAPTER_WEIGHTS} (an unfinished or non-safetensors adapter)")
        self._file = SafetensorsFile(weights)
        keys = set(self._file.keys())
        prefix = PEFT_PREFIX
        self.attention: dict[str, tuple[str, str]] = {}  # base weight key -> (A key, B key)
        self.fused: dict[tuple[int, str], tuple[str, str]] = {}  # (layer, gate_up|down) -> (A, B)
        self.routers: dict[int, str] = {}
        for key in sorted(keys):
            name = key[len(prefix):] if key.startswith(prefix) else key
            if name.endswith("lora_A.weight"):
                b_key = key.replace("lora_A.weight", "lora_B.weight")
                stem = name[: -len("lora_A.weight")]
                a_shape, b_shape = self._file.shape(key), self._file.shape(b_key)
                layer = re.search(r"layers\.(\d+)\.", name)
                rank = self.rank * (experts if ".mlp.experts." in name else 1)
                if a_shape[0] != rank or b_shape[1] != rank:
                    raise ExportError(f"{self.folder}: adapter_config.json says r={self.rank}, but {key} has "
                                      f"shape {a_shape} (rank {a_shape[0] // (rank // self.rank)}); the config does "
                                      "not belong to these tensors, and merging would use the wrong scale")
                if ".mlp.experts." in name:
                    if a_shape[1] == hidden and b_shape[0] == 2 * intermediate:
                        self.fused[(int(layer.group(1)), "gate_up")] = (key, b_key)
                    elif a_shape[1] == intermediate and b_shape[0] == hidden:
                        self.fused[(int(layer.group(1)), "down")] = (key, b_key)
                    else:
                        raise ExportError(f"{self.folder}: cannot place expert LoRA {key} of shape {a_shape}")
                else:
                    self.attention[stem + "weight"] = (key, b_key)
            elif re.search(r"\.mlp\.gate\.weight$", name):
                self.routers[int(re.search(r"layers\.(\d+)\.", name).group(1))] = key
            elif not name.endswith("lora_B.weight"):
                # A tensor this export would not merge: refused, never left out of the merged model unsaid.
                raise ExportError(f"{self.folder}: {key} is neither LoRA factors nor a router; the streaming export "
                                  "cannot merge it")

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get(key).float()

    @functools.lru_cache(maxsize=2)  # a layer's gate_up and down factors, while its shard is written
    def expert_factors(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A as experts x rank x in, B as experts x out x rank), read once per layer."""
        keys = self.fused.get((layer, which))
        if keys is None:
            return None
        return expert_factors(self.tensor(keys[0]), self.tensor(keys[1]), self.experts)

    def expert_delta(self, layer: int, which: str, expert: int, rows: slice = slice(None)) -> torch.Tensor | None:
        """scale * B_e[rows] @ A_e for one expert, in the fused (out, in) orientation."""
        factors = self.expert_factors(layer, which)
        if factors is None:
            return None
        a, b = factors
        return self.scale * (b[expert][rows] @ a[expert])


def merge_tensor(key: str, tensor: torch.Tensor, adapters: list[Adapter], intermediate: int) -> torch.Tensor:
    """The base tensor with every adapter's contribution, in adapter order (fp32 maths)."""
    merged = None
    expert = EXPERT_KEY.match(key)
    router = ROUTER_KEY.match(key)
    for adapter in adapters:
        delta = None
        if key in adapter.attention:
            a_key, b_key = adapter.attention[key]
            delta = adapter.scale * (adapter.tensor(b_key) @ adapter.tensor(a_key))
        elif expert:
            layer, index, name = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            if name == "w2":
                delta = adapter.expert_delta(layer, "down", index)
            else:  # the fused gate_up rows: gate first, then up
                rows = slice(None, intermediate) if name == "w1" else slice(intermediate, None)
                delta = adapter.expert_delta(layer, "gate_up", index, rows)
        elif router and int(router.group(1)) in adapter.routers:
            merged = adapter.tensor(adapter.routers[int(router.group(1))])  # trained in full: replaces
            continue
        if delta is not None:
            merged = (tensor.float() if merged is None else merged) + delta
    return tensor if merged is None else merged


def original_layout(key: str, tensor: torch.Tensor, adapters: list[Adapter], intermediate: int):
    """(name, merged tensor) pairs in the original Mixtral layout for one base tensor. A fused expert stack
    (transformers 5's in-memory layout: gate_up_proj [E, 2I, H], gate rows first; down_proj [E, H, I]) is
    merged expert by expert and split into w1 / w3 / w2; its router is renamed to block_sparse_moe.gate."""
    fused = FUSED_KEY.match(key)
    if fused:
        layer, which = fused.group(1), fused.group(2)
        for expert in range(tensor.shape[0]):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            if which == "down_proj":
                yield f"{prefix}.w2.weight", merge_tensor(f"{prefix}.w2.weight", tensor[expert], adapters, intermediate)
            else:
                for name, rows in (("w1", tensor[expert][:intermediate]), ("w3", tensor[expert][intermediate:])):
                    yield f"{prefix}.{name}.weight", merge_tensor(f"{prefix}.{name}.weight", rows, adapters, intermediate)
        return
    router = FUSED_ROUTER_KEY.match(key)
    if router:
        key = f"model.layers.{router.group(1)}.block_sparse_moe.gate.weight"
    yield key, merge_tensor(key, tensor, adapters, intermediate)


def base_files(base: str) -> Path:
    folder = Path(base)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, allow_patterns=["*.safetensors", "*.json", "tokenizer.model*"]))
        except Exception as err:
            raise ExportError(f"cannot find the base model {base!r} (not a folder; Hub: {err})") from None
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder}: no safetensors files")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json (not a model folder; give the base with --base)")
    return folder


def write_merged(folder: Path, base_dir: Path, config: dict, adapters: list[Adapter], dtype: str | None,
                 progress: bool) -> None:
    """Merged shards, index, config, generation config and tokenizer files into `folder`."""
    intermediate = config["intermediate_size"]
    checkpoint = CheckpointFiles(base_dir)
    target = DTYPES[dtype] if dtype else None
    total_size, weight_map = 0, {}
    for shard in tqdm(checkpoint.shards, desc="merging shards", unit=" shard", disable=not progress):
        tensors, source = {}, checkpoint.file(shard)
        for base_key in source.keys():
            base_tensor = source.get(base_key)
            for key, tensor in original_layout(base_key, base_tensor, adapters, intermediate):
                tensors[key] = tensor.to(target or base_tensor.dtype).contiguous()
                total_size += tensors[key].numel() * tensors[key].element_size()
                weight_map[key] = shard
            del base_tensor
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    if checkpoint.has_index:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(config)
    if dtype:
        config["torch_dtype"] = config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", folder)
    last = adapters[-1].folder if adapters else None
    tokenizer_source = last if last is not None and (last / "tokenizer.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, folder)
