"""The GGUF file's self-check, streamed: read back with the `gguf` package's reader, it must hold exactly the
planned tensors (names, shapes, types) and metadata, every value must lie within its type's error bound of
the merged weight (read.py), and the model it holds must give the merged model's logits within a
tolerance per type, computed one layer at a time by the export's own walk (finetune/merge/verify.py).

The logit tolerance is relative, max |logit difference| / max |logit|, because quantization noise scales
with the weights and so with the logits. F16 and BF16 round each weight alone; Q8_0 and Q4_0 share a scale
per block of 32, and Q4_0's 16 levels per block cost the most (figures: README, "Serve it").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from finetune.files.safetensors import CheckpointFiles
from finetune.gguf_file.layout import ARCH_NAME, Planned
from finetune.gguf_file.read import GGUFCheckError, GGUFCheckpoint
from finetune.merge.verify import stream_logits

TOLERANCES = {"f16": 2e-3, "bf16": 1.5e-2, "q8_0": 0.1, "q4_0": 0.4}
"""Default max relative logit difference per type; a K-quant from llama-quantize takes q4_0's. About 5x what
a pretrained tiny Mixtral shows for F16 / BF16, 4x for Q8_0, 2x for Q4_0 (benchmarks/gguf_fidelity.py). The
strict check is the per-value bound; this one catches what the bound cannot see (a wrong layout read back
consistently would still move the logits)."""


@dataclass
class GGUFCheck:
    relative_logit_difference: float
    tolerance: float
    worst_error: float
    """The largest |dequantized - merged| seen, as a fraction of its type's bound (at most 1 when it passes)."""
    worst_tensor: str


def check_contents(path: str | Path, config: dict, planned: list[Planned], types_fixed: bool = True) -> None:
    """The file holds the planned tensors (names, shapes, and types unless a quantizer chose them) and the
    model's hyperparameters."""
    reader = gguf.GGUFReader(path)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != ARCH_NAME:
        raise GGUFCheckError(f"{path}: general.architecture is {arch and arch.contents()!r}, not {ARCH_NAME!r}")
    for key, value in {gguf.Keys.LLM.BLOCK_COUNT: config["num_hidden_layers"],
                       gguf.Keys.LLM.EXPERT_COUNT: config["num_local_experts"],
                       gguf.Keys.LLM.EXPERT_USED_COUNT: config["num_experts_per_tok"]}.items():
        field = reader.get_field(key.format(arch=ARCH_NAME))
        if field is None or field.contents() != value:
            raise GGUFCheckError(f"{path}: {key.format(arch=ARCH_NAME)} is {field and field.contents()}, not {value}")
    found = {t.name: t for t in reader.tensors}
    if list(found) != [t.name for t in planned]:
        extra, missing = set(found) - {t.name for t in planned}, {t.name for t in planned} - set(found)
        raise GGUFCheckError(f"{path}: tensors differ from the plan (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}, or out of order)")
    for tensor in planned:
        read = found[tensor.name]
        if tuple(int(d) for d in reversed(read.shape)) != tensor.shape:
            raise GGUFCheckError(f"{path}: {tensor.name} has shape {list(reversed(read.shape))}, not {list(tensor.shape)}")
        if types_fixed and read.tensor_type != tensor.qtype:
            raise GGUFCheckError(f"{path}: {tensor.name} is {read.tensor_type.name}, not {tensor.qtype.name}")


def verify_gguf(path: str | Path, model_dir: str | Path, requested: str, planned: list[Planned],
                prompts: list[list[int]], tolerance: float | None = None, progress: bool = False) -> GGUFCheck:
    """Check the GGUF file `path` against the folder it was written from; raise GGUFCheckError if it fails."""
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    check_contents(path, config, planned, types_fixed=requested in TOLERANCES)
    tolerance = TOLERANCES.get(requested, TOLERANCES["q4_0"]) if tolerance is None else tolerance
    reference = CheckpointFiles(folder)
    from_file = GGUFCheckpoint(path, config, reference)
    got = stream_logits(from_file, prompts, progress=progress, label=Path(path).name)
    expected = stream_logits(reference, prompts, progress=progress)
    scale = max(float(e.abs().max()) for e in expected)
    difference = max(float((g - e).abs().max()) for g, e in zip(got, expected)) / scale
    check = GGUFCheck(difference, tolerance, *from_file.worst)
    if not difference <= tolerance:
        raise GGUFCheckError(f"{Path(path).name}: its logits differ from the merged model's by {difference:.2e} "
                             f"(relative; tolerance {tolerance:g} for {requested})")
    return check
