"""The export's self-check, streamed through the layers: merged model vs base + adapters, one layer in memory.

Loading both models whole (the obvious check) needs two fp32 copies of the model: about 370 GB of RAM for
Mixtral 8x7B. Here the prompts are embedded once, then each decoder layer is built from its own tensors
only (read from whichever shards hold them), run on every prompt's hidden states and freed; the final norm
and head give the logits. The same walk runs twice, once over the merged checkpoint and once over the base
with each adapter applied by PEFT itself, on that layer alone (earlier adapters merged by PEFT, the last
applied at run time). So the reference never goes through the export's merge code, and a wrong merge shows
up as a logit difference. Peak memory is one layer, with PEFT's LoRA on it, plus the activations.

Mixtral's own modules (`MixtralDecoderLayer`, its rotary embedding and causal mask) compute each layer,
so the walk is the model's forward pass, cut at layer boundaries.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.errors import CheckFailed
from finetune.files.adapter_folder import ADAPTER_WEIGHTS, PEFT_PREFIX
from finetune.files.checkpoint_layout import (
    OUTSIDE_LAYER_MODULES,
    STACKS,
    dense_keys,
    expert_matrices,
    stack_shape,
)
from finetune.files.safetensors import CheckpointFiles, SafetensorsFile


class MergeCheckError(CheckFailed):
    """An adapter tensor that the check cannot place, or a checkpoint missing a tensor."""


def layer_state(checkpoint: CheckpointFiles, layer: int, config) -> dict[str, torch.Tensor]:
    """One decoder layer's fp32 tensors, named as `MixtralDecoderLayer` names them, from either layout."""
    state = {name: checkpoint.get(key).float() for name, key in dense_keys(checkpoint, layer).items()}
    for stack in STACKS:
        shape = stack_shape(stack, config)
        state[f"mlp.experts.{stack}"] = fused = torch.empty(shape)
        for expert, matrix in enumerate(expert_matrices(checkpoint, layer, stack, shape[0])):
            fused[expert] = matrix
    return state


def build(module_class, state: dict[str, torch.Tensor], *args) -> nn.Module:
    """The module with exactly `state` as its weights (built on the meta device: no second copy)."""
    with torch.device("meta"):
        module = module_class(*args)
    module.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(module.named_buffers()):  # non-persistent buffers are not in the state dict
        if buffer.is_meta:
            raise MergeCheckError(f"{module_class.__name__} has an unset buffer {name}")
    return module.eval()


class AdapterTensors:
    """One PEFT adapter, its tensors grouped by the part of the model they belong to."""

    def __init__(self, folder: str | Path):
        from peft import LoraConfig

        self.folder = Path(folder)
        self.config = LoraConfig.from_pretrained(str(self.folder))
        self.config.task_type = None  # applied to single layers, not a causal-LM wrapper
        self.config.inference_mode = True
        self._file = SafetensorsFile(self.folder / ADAPTER_WEIGHTS)
        names = [key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key for key in self._file.keys()]
        outside = tuple(f"{module}." for module in OUTSIDE_LAYER_MODULES)
        placeable = [n for n in names if n.startswith(outside) or re.match(r"model\.layers\.\d+\.", n)]
        if len(placeable) != len(names):
            raise MergeCheckError(f"{self.folder}: adapter tensors outside the model's parts: "
                                  f"{sorted(set(names) - set(placeable))[:3]}")
        self.names = names

    def under(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        keys = [n for n in self.names if n.startswith(prefixes)]
        if not keys:
            return {}
        return {PEFT_PREFIX + k: self._file.get(PEFT_PREFIX + k).float() for k in keys}


def with_adapters(parts: dict[str, nn.Module], adapters: list[AdapterTensors]) -> dict[str, nn.Module]:
    """`parts` ({path in the model: module}) with `adapters` applied as PEFT applies them: every adapter but
    the last merged by PEFT, the last kept as LoRA computed at run time. A part that is itself a LoRA target
    (an LM head, say) comes back as PEFT's wrapper, so use the returned modules."""
    from peft import PeftModel, set_peft_model_state_dict

    root = nn.Module()  # the parts at their paths in the full model, so the adapter's tensor names fit
    for path, module in parts.items():
        parent = root
        *parents, last = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(last, module)
    holder, prefixes = root, tuple(f"{path}." for path in parts)
    for position, adapter in enumerate(adapters):
        tensors = adapter.under(prefixes)
        if not tensors:
            continue
        wrapped = PeftModel(root, adapter.config)
        loaded = set_peft_model_state_dict(wrapped, tensors)
        if loaded.unexpected_keys:
            raise MergeCheckError(f"{adapter.folder}: PEFT found no place for {sorted(loaded.unexpected_keys)[:3]}")
        wrapped.eval()
        root = wrapped.merge_and_unload() if position < len(adapters) - 1 else wrapped
    return {path: holder.get_submodule(path) for path in parts}  # PEFT changes the holder in place


def stream_logits(checkpoint: str | Path | CheckpointFiles, prompts: list[list[int]], adapters: list[str | Path] = (),
                  progress: bool = False, label: str | None = None) -> list[torch.Tensor]:
    """fp32 logits ([tokens, vocab]) of each prompt, computed one decoder layer at a time. `checkpoint` is a
    model folder, or anything that reads tensors as CheckpointFiles does (a GGUF file read back, say) and
    whose `folder` holds the config."""
    from transformers import AutoConfig
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralDecoderLayer,
        MixtralRMSNorm,
        MixtralRotaryEmbedding,
    )

    source = CheckpointFiles(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    config = AutoConfig.from_pretrained(str(source.folder))
    config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU; the causal mask follows it
    config._experts_implementation = "eager"  # the reference per-expert loop
    loaded = [AdapterTensors(a) for a in adapters]

    embedding_key = "model.embed_tokens.weight"
    embed = build(nn.Embedding, {"weight": source.get(embedding_key).float()}, config.vocab_size, config.hidden_size)
    embed = with_adapters({"model.embed_tokens": embed}, loaded)["model.embed_tokens"]
    with torch.no_grad():
        hidden = [embed(torch.tensor([ids])) for ids in prompts]
    head_weight = embed.weight if config.tie_word_embeddings else None
    del embed

    rotary = MixtralRotaryEmbedding(config)
    mask_function = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    positions = [torch.arange(h.shape[1]).unsqueeze(0) for h in hidden]
    with torch.no_grad():
        rotations = [rotary(h, p) for h, p in zip(hidden, positions)]
        masks = [mask_function(config=config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                               position_ids=p) for h, p in zip(hidden, positions)]
    for index in tqdm(range(config.num_hidden_layers), desc=f"checking {label or source.folder.name}", unit=" layer",
                      disable=not progress, leave=False):
        layer = build(MixtralDecoderLayer, layer_state(source, index, config), config, index)
        layer = with_adapters({f"model.layers.{index}": layer}, loaded)[f"model.layers.{index}"]
        with torch.no_grad():
            hidden = [layer(h, position_embeddings=r, attention_mask=m, position_ids=p)
                      for h, r, m, p in zip(hidden, rotations, masks, positions)]
        del layer

    norm = build(MixtralRMSNorm, {"weight": source.get("model.norm.weight").float()}, config.hidden_size,
                 config.rms_norm_eps)
    if head_weight is None:
        head_weight = source.get("lm_head.weight").float()
    head = build(nn.Linear, {"weight": head_weight}, config.hidden_size, config.vocab_size, False)
    final = with_adapters({"model.norm": norm, "lm_head": head}, loaded)
    norm, head = final["model.norm"], final["lm_head"]
    with torch.no_grad():
        return [head(norm(h))[0] for h in hidden]


def max_logit_difference(merged: str | Path, base: str | Path, adapters: list[str | Path], prompts: list[list[int]],
                         progress: bool = False) -> float:
    """Max |logit difference| between the merged checkpoint and base + adapters (applied by PEFT)."""
    if not adapters:
        raise MergeCheckError("nothing to verify: no adapters")
    expected = stream_logits(base, prompts, adapters, progress)
    got = stream_logits(merged, prompts, (), progress)
    return max((a - b).abs().max().item() for a, b in zip(got, expected))
