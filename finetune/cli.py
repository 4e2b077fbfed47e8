"""The `finetune` command: `finetune <pass> ...` runs `python -m finetune.<pass> ...`.

    finetune check recipes/tiny/sft.yaml
    finetune tiny runs/tiny/base
"""

from __future__ import annotations

import importlib
import sys

PASSES = {
    "demo": "the whole pipeline on a tiny Mixtral on CPU (base, SFT, DPO, export, evaluation, report)",
    "check": "validate a recipe and its data, show what the model will learn",
    "tiny": "write a tiny Mixtral checkpoint",
    "sft": "supervised fine-tuning (LoRA on attention, experts, router)",
    "dpo": "direct preference optimisation from the SFT adapter",
    "plan": "per-GPU memory plan for a recipe, before loading any weight",
    "export": "merge adapters into the base checkpoint, shard by shard",
    "push": "push an adapter or merged folder to the Hugging Face Hub",
    "evaluate": "held-out loss, preferences, generation checks and router balance on a suite",
    "chat": "talk to a trained model or adapter, multi-turn, in the Mixtral-Instruct format",
}


def run_guarded(main_fn, argv=None) -> int:
    """Run an entry point: bad input exits 2, a failed check 1, each as one `error:` line (finetune/errors.py)."""
    from finetune.errors import CheckFailed, InputError

    try:
        return main_fn(argv) or 0
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in PASSES:
        width = max(map(len, PASSES))
        print("usage: finetune <pass> [args]\n\npasses:")
        for name, what in PASSES.items():
            print(f"  {name:<{width}}  {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"finetune.{argv[0]}")
    return run_guarded(module.main, argv[1:])
