"""Merge LoRA adapters into the base checkpoint, one shard at a time, in the original Mixtral layout.

    python -m finetune.export runs/tiny/dpo --out runs/tiny/merged [--base BASE] [--dtype bf16] [--no-verify]
    python -m finetune.export SFT_ADAPTER FURTHER_ADAPTER --out OUT      # several adapters, merged in order

The merge is streamed, one shard at a time, with about one shard in memory (finetune/merge/streaming.py,
which says why by hand). The export then checks itself (unless --no-verify): the merged model and base + adapters (applied by PEFT)
give the same logits on a few prompts, computed one decoder layer at a time (finetune/merge/verify.py), so
the check holds about one layer in memory, not two whole models. Everything is written into a hidden
`.OUT.partial` folder that becomes `--out` only once the verification passed (finetune/files/output_folder.py): a failure or a kill leaves no
`--out`. `--out` must not be, hold or lie inside the base or an adapter, and an existing non-empty
`--out` is replaced only with `--overwrite`.
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
    """Merged vs base + adapters applied by PEFT; None when not verified."""


def export(adapters: list[str], out: str | Path, base: str | None = None, dtype: str | None = None,
           progress: bool = True, overwrite: bool = False, verify: bool = True,
           prompts: list[list[int]] | None = None, tolerance: float | None = None) -> Exported:
    """Merge `adapters` (in order) into the base and write `out`; with `verify`, only if the merged model
    reproduces base + adapters within `tolerance` (default 1e-3, 0.1 for bf16/fp16)."""
    out = Path(out)
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
        if verify:
            if prompts is None:
                from finetune.data.chat_format import find_sentencepiece
                from finetune.data.encoders import chat_encoder

                encoder = chat_encoder(find_sentencepiece(str(folder)))
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


VERIFY_PROMPTS = ("What is 12 + 30?", "Écris « pomme » à l'envers.", "List the letters of 'tiger' separated by commas.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("export"), description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", help="adapter folders, merged in this order")
    parser.add_argument("--out", required=True, help="new folder for the merged model (never the base or an adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is verified")
    parser.add_argument("--base", default=None, help="base model (default: the first adapter's recorded base)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base's dtypes")
    parser.add_argument("--no-verify", action="store_true", help="skip the layer-by-layer logits check")
    parser.add_argument("--tolerance", type=float, default=None, help="max |logit diff| (default 1e-3, bf16/fp16 0.1)")
    args = parser.parse_args(argv)
    check_number("--tolerance", args.tolerance, minimum=0)
    exported = export(args.adapters, args.out, args.base, args.dtype, overwrite=args.overwrite,
                      verify=not args.no_verify, tolerance=args.tolerance)
    print(f"merged model written to {exported.folder}")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
