"""Merge LoRA adapters into the base checkpoint, one shard at a time, in the original Mixtral layout.

    python -m finetune.export runs/tiny/dpo --out runs/tiny/merged [--base BASE] [--dtype bf16] [--no-verify]
    python -m finetune.export SFT_ADAPTER FURTHER_ADAPTER --out OUT      # several adapters, merged in order

Why by hand: PEFT's `merge_and_unload` + `save_pretrained` needs the whole model in memory (93 GB for
Mixtral 8x7B in bf16). Here each base shard is read, the LoRA deltas of its tensors are added (attention
q/k/v/o; per-expert w1/w3 from the fused gate_up delta, w2 from the down delta; the router replaced by
the adapter's trained copy), the shard is written under the same name in the original per-expert
layout (a base saved with fused experts is split), and freed. Adapter tensors are read on demand, a
layer's expert factors once while its shard is written. Peak memory is about one shard plus one layer's
expert factors.

Then the export checks itself (unless --no-verify): the merged model and base + adapters (applied by PEFT)
give the same logits on a few prompts, computed one decoder layer at a time (finetune/merge_check.py), so
the check holds about one layer in memory, not two whole models. Everything is written into a hidden
`.OUT.partial` folder that becomes `--out` only once the verification passed (finetune/output_folder.py): a failure or a kill leaves no
`--out`. `--out` must not be, hold or lie inside the base or an adapter, and an existing non-empty
`--out` is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from finetune.card import merged_card
from finetune.errors import CheckFailed, InputError
from finetune.merge_check import max_logit_difference
from finetune.model import adapter_base
from finetune.output_folder import check_output, staged
from finetune.safetensors_files import (
    CheckpointFiles,
    SafetensorsFile,
    allocate_large_tensors_with_mmap,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                   "special_tokens_map.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
FUSED_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


class ExportError(InputError):
    """An adapter or base checkpoint that cannot be merged; the message says which and why."""


class VerificationError(CheckFailed):
    """The merged model does not reproduce base + adapters; nothing was written to --out."""


@dataclass
class Exported:
    folder: Path
    max_logit_difference: float | None
    """Merged vs base + adapters applied by PEFT; None when not verified."""


class Adapter:
    """One PEFT LoRA adapter folder, its tensors read on demand."""

    def __init__(self, folder: str | Path, hidden: int, intermediate: int, experts: int):
        self.folder = Path(folder)
        config_file = self.folder / "adapter_config.json"
        if not config_file.is_file():
            raise ExportError(f"{self.folder}: no adapter_config.json")
        self.config = json.loads(config_file.read_text())
        for key in ("rank_pattern", "alpha_pattern"):
            if self.config.get(key):
                raise ExportError(f"{self.folder}: {key} is not supported by the streaming export")
        if self.config.get("use_dora"):
            raise ExportError(f"{self.folder}: DoRA adapters are not supported by the streaming export")
        r = self.config["r"]
        self.scale = self.config["lora_alpha"] / (r**0.5 if self.config.get("use_rslora") else r)
        self.rank, self.experts = r, experts
        weights = self.folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise ExportError(f"{self.folder}: no adapter_model.safetensors (an unfinished or non-safetensors adapter)")
        self._file = SafetensorsFile(weights)
        keys = set(self._file.keys())
        prefix = "base_model.model."
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

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get(key).float()

    @functools.lru_cache(maxsize=2)  # a layer's gate_up and down factors, while its shard is written
    def expert_factors(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A as experts x rank x in, B as out x rank x experts), read once per layer (PEFT's layout)."""
        keys = self.fused.get((layer, which))
        if keys is None:
            return None
        a, b = self.tensor(keys[0]), self.tensor(keys[1])
        return a.reshape(self.experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, self.experts)

    def expert_delta(self, layer: int, which: str, expert: int, rows: slice = slice(None)) -> torch.Tensor | None:
        """scale * B_e[rows] @ A_e for one expert, in the fused (out, in) orientation."""
        factors = self.expert_factors(layer, which)
        if factors is None:
            return None
        a, b = factors
        return self.scale * (b[rows, :, expert] @ a[expert])


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

            folder = Path(snapshot_download(base, allow_patterns=["*.safetensors", "*.json", "tokenizer.model"]))
        except Exception as err:
            raise ExportError(f"cannot find the base model {base!r} (not a folder; Hub: {err})") from None
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder}: no safetensors files")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json (not a model folder; give the base with --base)")
    return folder


def export(adapters: list[str], out: str | Path, base: str | None = None, dtype: str | None = None,
           progress: bool = True, overwrite: bool = False, verify: bool = True,
           prompts: list[list[int]] | None = None, tolerance: float | None = None) -> Exported:
    """Merge `adapters` (in order) into the base and write `out`; with `verify`, only if the merged model
    reproduces base + adapters within `tolerance` (default 1e-3, 0.1 for bf16/fp16)."""
    out = Path(out)
    allocate_large_tensors_with_mmap()  # one shard or layer resident at a time, not a fragmented heap of them
    for adapter in adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ExportError(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
    base = base or (adapter_base(adapters[0]) if adapters else None)
    if not base:
        raise ExportError("no --base given and the adapter records no base model")
    base_dir = base_files(base)
    check_output(out, {"base model": base_dir, **{f"adapter {a}": a for a in adapters}}, overwrite)
    config = json.loads((base_dir / "config.json").read_text())
    hidden, intermediate, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    loaded = [Adapter(a, hidden, intermediate, experts) for a in adapters]
    with staged(out) as folder:
        write_merged(folder, base_dir, config, loaded, dtype, progress)
        (folder / "README.md").write_text(merged_card(out.name, base, adapters))
        difference = None
        if verify:
            if prompts is None:
                from finetune.chat_format import ChatEncoder, find_sentencepiece

                encoder = ChatEncoder(find_sentencepiece(str(folder)))
                prompts = [encoder.encode_prompt([{"role": "user", "content": text}]) for text in VERIFY_PROMPTS]
            difference = max_logit_difference(folder, base_dir, adapters, prompts, progress)
            if tolerance is None:
                tolerance = 0.1 if dtype in ("bf16", "fp16") else 1e-3
            print(f"verification: max |logit difference| merged vs base + adapters = {difference:.2e} "
                  f"(tolerance {tolerance:g})")
            if difference > tolerance:
                raise VerificationError(f"the merged model does not reproduce base + adapters (max |logit difference| "
                                        f"{difference:.2e} > {tolerance:g}); nothing was written to {out}")
    return Exported(out, difference)


VERIFY_PROMPTS = ("What is 12 + 30?", "Écris « pomme » à l'envers.", "List the letters of 'tiger' separated by commas.")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", help="adapter folders, merged in this order")
    parser.add_argument("--out", required=True, help="new folder for the merged model (never the base or an adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is verified")
    parser.add_argument("--base", default=None, help="base model (default: the first adapter's recorded base)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base's dtypes")
    parser.add_argument("--no-verify", action="store_true", help="skip the layer-by-layer logits check")
    parser.add_argument("--tolerance", type=float, default=None, help="max |logit diff| (default 1e-3, bf16/fp16 0.1)")
    args = parser.parse_args(argv)
    exported = export(args.adapters, args.out, args.base, args.dtype, overwrite=args.overwrite,
                      verify=not args.no_verify, tolerance=args.tolerance)
    print(f"merged model written to {exported.folder}")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
