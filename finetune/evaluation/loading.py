"""A model ready for evaluation or chat: a model folder or Hub id, or an adapter on its recorded base (or
`--base`), checked before any weight loads, on the GPU in bf16 where there is one.

On a GPU the weights are placed by accelerate (`device_map="auto"`): layer by layer on the GPU, and on the CPU
for what does not fit, so Mixtral 8x7B (87 GiB in bf16) evaluates on one 80 GB GPU instead of failing to load.
An adapter's expert LoRA runs through the routed kernel (finetune/moe/expert_lora.py), as in training: PEFT's own
path rebuilds every expert's weight on every forward. A second adapter on the same base (a DPO reference that is
the SFT adapter) is loaded into the same model and switched to, never as a second copy of the base."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.data.chat_format import ChatEncoder, find_sentencepiece
from finetune.data.encoders import chat_encoder
from finetune.files.adapter_folder import adapter_base, check_adapter_complete, is_adapter_folder
from finetune.model.config import ModelSourceError, model_config


@dataclass
class LoadedModel:
    """A model ready for evaluation: a full model, or a base with a PEFT adapter on top."""

    model: nn.Module
    encoder: ChatEncoder
    path: str
    base: str | None = None  # the adapter's base model; None for a full model

    def without_adapter(self):
        """Context in which the model is its base (the adapter switched off); only for adapters."""
        return self.model.disable_adapter() if self.base is not None else nullcontext()

    @contextmanager
    def with_adapter(self, folder: str):
        """Context in which another adapter of the same base replaces this one (loaded beside it, then removed)."""
        from finetune.moe.expert_lora import use_routed_expert_lora

        self.model.load_adapter(folder, adapter_name=OTHER_ADAPTER)
        use_routed_expert_lora(self.model)
        self.model.set_adapter(OTHER_ADAPTER)
        try:
            yield self.model
        finally:
            self.model.set_adapter("default")
            self.model.delete_adapter(OTHER_ADAPTER)


OTHER_ADAPTER = "other"


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_loadable(path: str, base: str | None = None, what: str = "model") -> None:
    """Fail before any weight loads when `path` (a model, or an adapter on its base) cannot be loaded;
    `what` names the option in the message."""
    if not is_adapter_folder(path):
        model_config(path, what)
        return
    check_adapter_complete(path, what)
    recorded = adapter_base(path)
    if base is None and not recorded:
        raise ModelSourceError(f"{what}={path}: the adapter records no base model; give one with --base")
    model_config(base or recorded, "--base" if base else f"{what}={path}: its recorded base model (or give --base)")


def load_for_eval(path: str, base: str | None = None) -> LoadedModel:
    """A model folder / Hub id, or an adapter folder loaded on its recorded base (or `base`)."""
    from transformers import AutoModelForCausalLM

    check_loadable(path, base)
    device = eval_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    placed = {"device_map": "auto"} if device.type == "cuda" else {}  # GPU first, the rest on the CPU
    if is_adapter_folder(path):
        from peft import PeftModel

        from finetune.moe.expert_lora import use_routed_expert_lora

        base = base or adapter_base(path)
        try:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **placed), path)
            use_routed_expert_lora(model)
        except RuntimeError as err:  # PEFT's "size mismatch for ...": the adapter belongs to a base of another shape
            if "size mismatch" not in str(err):
                raise
            first = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
            raise ModelSourceError(f"the adapter {path} does not fit the base {base} ({first}); give the base it was "
                                   "trained on (--base, or the one it records)") from None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed)
        base = None
    if not placed:
        model = model.to(device)
    return LoadedModel(model.eval(), encoder_of(path, base), path, base)


def encoder_of(path: str, base: str | None = None) -> ChatEncoder:
    """The chat encoder of a model folder / Hub id, or of an adapter (its own tokenizer, else its base's), in
    the format its tokenizer speaks; no weight loads."""
    if is_adapter_folder(path):
        base = base or adapter_base(path)
        return chat_encoder(find_sentencepiece(path if (Path(path) / "tokenizer.model").is_file() else base))
    return chat_encoder(find_sentencepiece(path))
