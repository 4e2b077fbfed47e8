"""A GGUF file read back as the checkpoint it was written from: each tensor dequantized by the `gguf` package
on demand (the file is memory-mapped), q/k rows put back in transformers' order, expert stacks served one
expert at a time, under the names transformers 5 uses. So the export's layer-by-layer logits walk
(finetune/merge/verify.py) runs on it unchanged, one layer in memory.

Each tensor is also compared with the weights it was written from as it is read, block by block, against
the error bound of its type (`error_bound`): a corrupted block is named, not only seen as a logit drift.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from finetune.errors import CheckFailed
from finetune.files.checkpoint_layout import dense_keys, expert_matrix
from finetune.files.safetensors import CheckpointFiles
from finetune.gguf_file import write
from finetune.gguf_file.layout import DENSE, OUTSIDE, STACKS, T, gguf_name, heads_of, unpermute_from_llama

Q = gguf.GGMLQuantizationType


class GGUFCheckError(CheckFailed):
    """The GGUF file does not hold what was written, or a tensor strays past its type's error bound."""


def error_bound(reference: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The largest |dequantized - reference| each element may show in `qtype` (broadcastable to `reference`).
    F16/BF16: half a unit in the last place (11 / 8 significant bits), and half the smallest subnormal.
    Q8_0: blocks of 32 share a scale d = amax/127 stored in fp16; rounding to the integer grid costs d/2,
    and the fp16 scale up to 127 x d x 2^-11 more: 0.57 d. Q4_0: d = max/-8; the grid end opposite the
    block's largest value is clipped, which costs up to |d|, plus the fp16 scale: 1.01 |d|."""
    x = np.abs(reference)
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return x * 2.0**-11 + 2.0**-25
    if qtype == Q.BF16:
        return x * 2.0**-8 + 2.0**-134
    factor = {Q.Q8_0: 0.57 / 127, Q.Q4_0: 1.01 / 8}.get(qtype)
    if factor is None:  # a K-quant from llama-quantize: its own scales; checked by the logits only
        return np.full_like(x, np.inf)
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    return np.repeat(blocks.max(axis=-1, keepdims=True) * factor + 2.0**-24, 32, axis=-1).reshape(x.shape)


def dequantized(path: Path, tensor: gguf.ReaderTensor, index: int | None = None) -> np.ndarray:
    """The tensor (or its slice `index` along the first dimension) in fp32. Read with a plain file read, not
    through the reader's memory map: touched pages of a map count as resident for as long as it lives, so
    reading a whole file through it would grow with the model."""
    shape, offset, size = tensor.data.shape, tensor.data_offset, tensor.n_bytes
    if index is not None:
        size //= shape[0]
        shape, offset = shape[1:], offset + index * size
    data = np.empty(shape, dtype=tensor.data.dtype)
    with path.open("rb") as f:
        f.seek(offset)
        if f.readinto(data) != size:
            raise GGUFCheckError(f"{path}: truncated inside {tensor.name}")
    if tensor.tensor_type in (Q.F32, Q.F16):
        return data.astype(np.float32, copy=False)
    return gguf.quants.dequantize(data, tensor.tensor_type)


class GGUFCheckpoint:
    """The file as a checkpoint (get / keys_under / where, like CheckpointFiles), checked against
    `reference` (the folder it was written from) as each tensor is read."""

    def __init__(self, path: str | Path, config: dict, reference: CheckpointFiles):
        self.path, self.config, self.reference = Path(path), config, reference
        self.folder = reference.folder  # its config.json describes the model in the file
        self.tensors = {t.name: t for t in gguf.GGUFReader(self.path).tensors}
        self.worst = (0.0, "")
        """(largest |error| / bound seen so far, the tensor it was in)."""
        self.where: dict[str, str] = {}
        self._sources: dict[str, tuple[gguf.MODEL_TENSOR, ...]] = {}
        """{checkpoint key: the GGUF tensor kinds it is read from, in row order (gate then up for gate_up)}."""
        self._layers: dict[str, int | None] = {}
        for kind, key in OUTSIDE.items():
            self._add(key, None, kind)
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}."
            for kind, name in DENSE.items():
                self._add(prefix + name, layer, kind)
            self._add(prefix + "mlp.experts.gate_up_proj", layer, T.FFN_GATE_EXP, T.FFN_UP_EXP)
            self._add(prefix + "mlp.experts.down_proj", layer, T.FFN_DOWN_EXP)
        missing = sorted({gguf_name(kind, self._layers[key]) for key, kinds in self._sources.items()
                          for kind in kinds} - set(self.tensors))
        if missing:
            raise GGUFCheckError(f"{self.path}: no tensor {missing[0]} ({len(missing)} missing)")

    def _add(self, key: str, layer: int | None, *kinds: gguf.MODEL_TENSOR) -> None:
        self.where[key] = self.path.name
        self._sources[key], self._layers[key] = kinds, layer

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.where if key.startswith(prefix)]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        if key not in self._sources:
            raise GGUFCheckError(f"{self.path}: no tensor for {key}")
        kinds, layer = self._sources[key], self._layers[key]
        names = [gguf_name(kind, layer) for kind in kinds]
        if kinds[0] in STACKS:  # one expert: gate_up is the gate tensor's rows, then the up tensor's
            parts = [dequantized(self.path, self.tensors[name], index) for name in names]
            reference = expert_matrix(self.reference, layer, key.rsplit(".", 1)[1], index).float().numpy()
            start = 0
            for name, part in zip(names, parts):
                self._check(name, part, reference[start:start + len(part)], f"expert {index} ")
                start += len(part)
            return torch.from_numpy(np.concatenate(parts))
        values = dequantized(self.path, self.tensors[names[0]])
        heads = heads_of(kinds[0], self.config)
        if heads:
            values = np.ascontiguousarray(unpermute_from_llama(values, heads))
        if layer is not None:
            reference_key = dense_keys(self.reference, layer)[DENSE[kinds[0]]]
        elif key == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            reference_key = "model.embed_tokens.weight"
        else:
            reference_key = key
        self._check(names[0], values, self.reference.get(reference_key).float().numpy(), "")
        return torch.from_numpy(values)

    def _check(self, name: str, values: np.ndarray, reference: np.ndarray, where: str) -> None:
        """Every value within its type's bound of the reference, a slice of rows at a time (write.ROWS_AT_ONCE)."""
        qtype = self.tensors[name].tensor_type
        step = max(1, write.ROWS_AT_ONCE // values.shape[-1]) if values.ndim > 1 else len(values)
        for start in range(0, len(values), step):
            got, want = values[start:start + step], reference[start:start + step]
            error, bound = np.abs(got - want), error_bound(want, qtype)
            over = np.argwhere(~(error <= bound))  # NaN counts as over
            if len(over):
                at = tuple(int(i) for i in over[0])
                row = (start + at[0], *at[1:])
                raise GGUFCheckError(f"{self.path.name}: tensor {name} {where}at {list(row)} reads back as "
                                     f"{got[at]:.6g} where the merged weight is {want[at]:.6g}, past the "
                                     f"{qtype.name} error bound of {bound[at]:.3g}; the file is corrupt")
            finite = bound > 0
            ratio = float((error[finite] / bound[finite]).max()) if finite.any() else 0.0
            if np.isfinite(ratio) and ratio > self.worst[0]:
                self.worst = (ratio, name)
