"""The `finetune` command: `finetune <command> ...` runs `python -m finetune.<command> ...`.

    finetune check recipes/tiny/sft.yaml
    finetune tiny runs/tiny/base

Also what every command shares about its command line: how it was invoked (for its usage line), and
`run_guarded`, which turns bad input and failed checks into one `error:` line and an exit code
(finetune/errors.py).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from finetune.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailed, InputError

COMMANDS = {
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


def invoked_as(command: str) -> str:
    """How the user ran `command`, for its usage line and messages: `finetune sft` (the console script),
    `python -m finetune sft` (the package), else `python -m finetune.sft` (the module, also under
    `accelerate launch -m`)."""
    program = Path(sys.argv[0] if sys.argv else "")
    if program.name == "finetune":
        return f"finetune {command}"
    if program.name == "__main__.py" and program.parent.name == "finetune":
        return f"python -m finetune {command}"
    return f"python -m finetune.{command}"


def run_guarded(main_fn, argv=None) -> int:
    """Run a command's `main`: bad input exits 2, a failed check 1, each as one `error:` line."""
    try:
        return main_fn(argv) or 0
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: finetune <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(f"finetune.{argv[0]}")
    return run_guarded(module.main, argv[1:])
