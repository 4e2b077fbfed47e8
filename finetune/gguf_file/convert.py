"""A model folder to a verified GGUF file and its Ollama Modelfile, in an output folder being staged.

Types the `gguf` package writes (f16, bf16, q8_0, q4_0) are written and verified directly. A K-quant
(q4_k_m, ...) is made by llama.cpp's `llama-quantize` from an F16 file this writes and verifies first;
the result is verified too (the package dequantizes K-quants), and the F16 file is removed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from finetune.data.chat_format import find_sentencepiece
from finetune.data.encoders import chat_format_of
from finetune.errors import CheckFailed, InputError
from finetune.gguf_file.layout import GGUF_TYPES, K_QUANTS, plan
from finetune.gguf_file.modelfile import modelfile
from finetune.gguf_file.verify import GGUFCheck, verify_gguf
from finetune.gguf_file.write import write_gguf

QUANTIZER = "llama-quantize"
QUANTIZER_INSTALL = ("git clone https://github.com/ggml-org/llama.cpp && cmake -S llama.cpp -B llama.cpp/build "
                     "&& cmake --build llama.cpp/build --target llama-quantize -j, then put llama.cpp/build/bin "
                     "on PATH")


@dataclass
class Converted:
    path: Path
    check: GGUFCheck | None
    """None when not verified."""


def check_requested(requested: str) -> None:
    """Refuse, before any work, a type this machine cannot write."""
    if requested in GGUF_TYPES:
        return
    if requested not in K_QUANTS:
        raise InputError(f"--gguf {requested}: not a type this export writes; choose one of "
                         f"{', '.join([*GGUF_TYPES, *K_QUANTS])}")
    if shutil.which(QUANTIZER) is None:
        raise InputError(f"--gguf {requested}: K-quants are made by llama.cpp's {QUANTIZER}, which is not on PATH. "
                         f"Install it ({QUANTIZER_INSTALL}), or choose f16, bf16, q8_0 or q4_0, which need "
                         "nothing more")


def convert(model_dir: str | Path, folder: Path, name: str, requested: str, prompts: list[list[int]],
            verify: bool = True, tolerance: float | None = None, progress: bool = True) -> Converted:
    """Write `folder`/`name`-`requested`.gguf from `model_dir` and a Modelfile beside it."""
    import json

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    path = folder / f"{name}-{requested}.gguf"
    direct = requested in GGUF_TYPES
    written = path if direct else folder / f".{name}-f16.gguf"
    planned = write_gguf(model_dir, written, requested if direct else "f16", progress)
    check = None
    if verify or not direct:  # the F16 input of llama-quantize is always checked first
        check = verify_gguf(written, model_dir, requested if direct else "f16", planned, prompts, progress=progress,
                            tolerance=tolerance if direct else None)
    if not direct:
        run = subprocess.run([QUANTIZER, str(written), str(path), K_QUANTS[requested]], capture_output=True, text=True)
        if run.returncode:
            raise CheckFailed(f"{QUANTIZER} failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        written.unlink()
        check = verify_gguf(path, model_dir, requested, plan(config, "f16"), prompts, tolerance, progress) \
            if verify else None
    (folder / "Modelfile").write_text(modelfile(path.name, chat_format_of(find_sentencepiece(str(model_dir)))))
    return Converted(path, check)
