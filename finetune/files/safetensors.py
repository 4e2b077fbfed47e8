"""Safetensors checkpoints read tensor by tensor with plain file reads, not memory maps.

Why by hand: safetensors' `safe_open` memory-maps the file, and every page a read touches stays resident
(counted in the process's memory) until the file is closed, so a tensor read through it is held twice: once
as file pages, once as the tensor. For a Mixtral 8x7B shard of 5 GB that doubles the streaming export's peak.
Here the header is parsed once and each tensor is read straight into its own buffer. The format is the
documented one: an 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then the data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import struct
from pathlib import Path

import torch

from finetune.errors import CheckFailed

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsError(CheckFailed):
    """A file that is not a readable safetensors file, or a tensor it does not hold."""


class SafetensorsFile:
    """One .safetensors file: its header, and any tensor read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            except (struct.error, ValueError) as err:
                raise SafetensorsError(f"{self.path}: not a safetensors file ({err})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return self.entries[key]["shape"]

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key`, or only its slice `index` along the first dimension (one expert of a stack)."""
        if key not in self.entries:
            raise SafetensorsError(f"{self.path}: no tensor {key}")
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        shape = entry["shape"]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise SafetensorsError(f"{self.path}: {key} of shape {shape} has no slice {index}")
            size = (end - start) // shape[0]
            start, end, shape = start + index * size, start + (index + 1) * size, shape[1:]
        tensor = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
        buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        if buffer is not None and buffer.nbytes != end - start:
            raise SafetensorsError(f"{self.path}: {key} has {end - start} bytes for shape {shape}")
        with self.path.open("rb") as f:
            f.seek(self._data_start + start)
            if buffer is not None and f.readinto(buffer) != end - start:
                raise SafetensorsError(f"{self.path}: truncated inside {key}")
        return tensor


class CheckpointFiles:
    """A model folder's safetensors shards (one `model.safetensors`, or those its index names)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.has_index = index.is_file()
        if self.has_index:
            self.where: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            self.where = dict.fromkeys(SafetensorsFile(self.folder / "model.safetensors").keys(), "model.safetensors")
        self.shards = sorted(set(self.where.values()))
        self._files: dict[str, SafetensorsFile] = {}

    def file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.folder / shard)
        return self._files[shard]

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.where if key.startswith(prefix)]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        if key not in self.where:
            raise SafetensorsError(f"{self.folder}: no tensor {key} in the checkpoint")
        return self.file(self.where[key]).get(key, index)


def allocate_large_tensors_with_mmap() -> None:
    """Make every allocation of 1 MiB or more its own memory map, returned to the OS as soon as it is freed
    (glibc's M_MMAP_THRESHOLD; elsewhere a no-op). Why: glibc raises that threshold after each large free, up
    to 32 MiB, so tensors of a few MiB then come from the heap, which fragments and does not shrink. Measured
    on the export of 4- and 19-layer checkpoints: peak memory 303 and 393 MiB without, 175 and 176 with.
    Process-wide; the streaming export sets it."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_LIBC = None
try:  # glibc only
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.mallopt  # noqa: B018
except (OSError, AttributeError):
    _LIBC = None
