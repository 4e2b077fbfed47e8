"""Merge LoRA adapters into the base checkpoint, one shard at a time, in the original Mixtral layout.

    python -m finetune.export runs/tiny/dpo --out runs/tiny/merged [--base BASE] [--dtype bf16] [--no-verify]
    python -m finetune.export SFT_ADAPTER FURTHER_ADAPTER --out OUT      # several adapters, merged in order
    python -m finetune.export runs/tiny/dpo --out runs/tiny/merged --gguf q8_0   # + a GGUF and Modelfile in OUT
    python -m finetune.export runs/tiny/merged --gguf q4_0 --out runs/tiny/gguf  # a GGUF of a model folder

The merge is streamed, one shard at a time, with about one shard in memory (finetune/merge/streaming.py,
which says why by hand). The export then checks itself (unless --no-verify): the merged model and base + adapters (applied by PEFT)
give the same logits on a few prompts, computed one decoder layer at a time (finetune/merge/verify.py), so
the check holds about one layer in memory, not two whole models. Everything is written into a hidden
`.OUT.partial` folder that becomes `--out` only once the verification passed (finetune/files/output_folder.py): a failure or a kill leaves no
`--out`. `--out` must not be, hold or lie inside the base or an adapter, and an existing non-empty
`--out` is replaced only with `--overwrite`.

`--gguf TYPE` (f16, bf16, q8_0, q4_0; K-quants such as q4_k_m with llama.cpp's llama-quantize on PATH) also
writes `OUT/OUT-TYPE.gguf` for llama.cpp and Ollama, with an Ollama `Modelfile` beside it
(finetune/gguf_file/). The GGUF is streamed like the merge and verified against the merged weights: every
value within its type's error bound, and the logits within a tolerance per type. Given one model folder
instead of adapters, only the GGUF and Modelfile are written to `--out`. Needs `pip install -e ".[gguf]"`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.cli import check_number, invoked_as
from finetune.errors import CheckFailed
from finetune.files.adapter_folder import adapter_base, read_adapter_config
from finetune.files.output_folder import check_output, staged
from finetune.files.safetensors import allocate_large_tensors_with_mmap
from finetune.merge.lineage import check_chain
from finetune.merge.streaming import DTYPES, Adapter, ExportError, base_files, write_merged
from finetune.merge.verify import max_logit_difference
from finetune.publish.card import merged_card


class VerificationError(CheckFailed):
    """The merged model does not reproduce base + adapters; nothing was written to --out."""


@dataclass
class Exported:
    folder: Path
    max_logit_difference: float | None
    """Merged vs base + adapters applied by PEFT; None when not verified (or nothing merged)."""
    gguf: object | None = None
    """finetune.gguf_file.convert.Converted when a GGUF was written."""


def export(adapters: list[str], out: str | Path, base: str | None = None, dtype: str | None = None,
           progress: bool = True, overwrite: bool = False, verify: bool = True,
           prompts: list[list[int]] | None = None, tolerance: float | None = None,
           gguf: str | None = None, gguf_tolerance: float | None = None) -> Exported:
    """Merge `adapters` (in order) into the base and write `out`; with `verify`, only if the merged model
    reproduces base + adapters within `tolerance` (default 1e-3, 0.1 for bf16/fp16). With `gguf` (a type),
    also the verified GGUF file and its Modelfile, in `out`."""
    out = Path(out)
    if gguf:
        check_gguf_type(gguf)
    allocate_large_tensors_with_mmap()  # one shard or layer resident at a time, not a fragmented heap of them
    for adapter in adapters:
        read_adapter_config(adapter)  # a PEFT adapter folder, readable, before anything else
    base_given = base is not None
    base = base or (adapter_base(adapters[0]) if adapters else None)
    if not base:
        raise ExportError("no --base given and the adapter records no base model")
    check_chain(adapters, base, base_given)
    base_dir = base_files(base)
    check_output(out, {"base model": base_dir, **{f"adapter {a}": a for a in adapters}}, overwrite)
    config = json.loads((base_dir / "config.json").read_text())
    hidden, intermediate, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    loaded = [Adapter(a, hidden, intermediate, experts) for a in adapters]
    with staged(out) as folder:
        write_merged(folder, base_dir, config, loaded, dtype, progress)
        (folder / "README.md").write_text(merged_card(out.name, base, adapters))
        difference = None
        prompts = prompts or verification_prompts(folder)
        if verify:
            difference = max_logit_difference(folder, base_dir, adapters, prompts, progress)
            if tolerance is None:
                tolerance = 0.1 if dtype in ("bf16", "fp16") else 1e-3
            print(f"verification: max |logit difference| merged vs base + adapters = {difference:.2e} "
                  f"(tolerance {tolerance:g})")
            if difference > tolerance:
                raise VerificationError(f"the merged model does not reproduce base + adapters (max |logit difference| "
                                        f"{difference:.2e} > {tolerance:g}); nothing was written to {out}")
        converted = write_gguf_file(folder, folder, out, gguf, prompts, verify, gguf_tolerance, progress) \
            if gguf else None
    return Exported(out, difference, converted)


def export_gguf(model_dir: str | Path, out: str | Path, gguf: str, overwrite: bool = False, verify: bool = True,
                tolerance: float | None = None, progress: bool = True) -> Exported:
    """Write only the verified GGUF file of the model folder `model_dir` (and its Modelfile) into `out`."""
    out = Path(out)
    check_gguf_type(gguf)
    allocate_large_tensors_with_mmap()
    check_output(out, {"model": model_dir}, overwrite)
    with staged(out) as folder:
        converted = write_gguf_file(model_dir, folder, out, gguf, verification_prompts(model_dir), verify,
                                    tolerance, progress)
    return Exported(out, None, converted)


def check_gguf_type(gguf: str) -> None:
    """Refuse --gguf before any work when the gguf package or the type's quantizer is missing."""
    try:
        from finetune.gguf_file.convert import check_requested
    except ImportError as err:
        raise ExportError(f"--gguf needs the gguf package ({err}); install it with: pip install -e \".[gguf]\"") \
            from None
    check_requested(gguf)


def write_gguf_file(model_dir, folder: Path, out: Path, gguf: str, prompts, verify: bool, tolerance, progress):
    from finetune.gguf_file.convert import convert

    converted = convert(model_dir, folder, out.name, gguf, prompts, verify, tolerance, progress)
    if converted.check is not None:
        check = converted.check
        print(f"GGUF verification: max |logit difference| / max |logit| = {check.relative_logit_difference:.2e} "
              f"(tolerance {check.tolerance:g}); every value within its type's error bound (worst "
              f"{check.worst_error:.0%} of it, in {check.worst_tensor})")
    return converted


def verification_prompts(model_dir) -> list[list[int]]:
    """VERIFY_PROMPTS as chat prompts in the model's own format."""
    from finetune.data.chat_format import find_sentencepiece
    from finetune.data.encoders import chat_encoder

    encoder = chat_encoder(find_sentencepiece(str(model_dir)))
    return [encoder.encode_prompt([{"role": "user", "content": text}]) for text in VERIFY_PROMPTS]


VERIFY_PROMPTS = ("What is 12 + 30?", "Écris « pomme » à l'envers.", "List the letters of 'tiger' separated by commas.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("export"), description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", help="adapter folders, merged in this order (or, with --gguf, "
                        "one model folder to convert)")
    parser.add_argument("--out", required=True, help="new folder for the merged model (never the base or an adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is verified")
    parser.add_argument("--base", default=None, help="base model (default: the first adapter's recorded base)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base's dtypes")
    parser.add_argument("--no-verify", action="store_true", help="skip the layer-by-layer logits check")
    parser.add_argument("--tolerance", type=float, default=None, help="max |logit diff| (default 1e-3, bf16/fp16 0.1)")
    parser.add_argument("--gguf", default=None, metavar="TYPE",
                        help="also write a GGUF for llama.cpp / Ollama: f16, bf16, q8_0, q4_0, or a K-quant "
                        "(q4_k_m, ...) with llama.cpp's llama-quantize on PATH")
    parser.add_argument("--gguf-tolerance", type=float, default=None,
                        help="max |logit diff| / max |logit| of the GGUF (default per type: f16 2e-3, bf16 1.5e-2, "
                        "q8_0 0.1, q4_0 and K-quants 0.4)")
    args = parser.parse_args(argv)
    check_number("--tolerance", args.tolerance, minimum=0)
    check_number("--gguf-tolerance", args.gguf_tolerance, minimum=0)
    if args.gguf_tolerance is not None and not args.gguf:
        raise ExportError("--gguf-tolerance is the GGUF's check; give --gguf TYPE with it, or leave it out")
    model_folder = len(args.adapters) == 1 and is_model_folder(args.adapters[0])
    if model_folder:
        if not args.gguf:
            raise ExportError(f"{args.adapters[0]}: a model folder, not an adapter; there is nothing to merge. To "
                              "convert it for llama.cpp / Ollama, add --gguf TYPE (e.g. --gguf q8_0)")
        if args.base or args.dtype or args.tolerance is not None:
            raise ExportError("--base, --dtype and --tolerance are for merging adapters; converting a model folder "
                              "takes --gguf, --gguf-tolerance, --no-verify and --overwrite")
        exported = export_gguf(args.adapters[0], args.out, args.gguf, args.overwrite, not args.no_verify,
                               args.gguf_tolerance)
    else:
        exported = export(args.adapters, args.out, args.base, args.dtype, overwrite=args.overwrite,
                          verify=not args.no_verify, tolerance=args.tolerance, gguf=args.gguf,
                          gguf_tolerance=args.gguf_tolerance)
        print(f"merged model written to {exported.folder}")
    if exported.gguf is not None:
        gguf_path = exported.folder / exported.gguf.path.name
        print(f"GGUF written to {gguf_path}\n"
              f"  llama.cpp: llama-server -m {gguf_path} --jinja\n"
              f"  Ollama:    ollama create {exported.folder.name} -f {exported.folder / 'Modelfile'}")
    return 0


def is_model_folder(path: str) -> bool:
    """A model (config.json and weights), not a PEFT adapter folder."""
    folder = Path(path)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file() \
        and any(folder.glob("*.safetensors"))


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
