"""The `finetune` command: `finetune <command> ...` runs `python -m finetune.<command> ...`.

    finetune check recipes/tiny/sft.yaml
    finetune tiny runs/tiny/base

Also what every command shares about its command line: how it was invoked (for its usage line), and
`run_guarded`, which turns bad input and failed checks into one `error:` line and an exit code
(finetune/errors.py).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

from finetune.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_CHECK_FAILED,
    EXIT_CTRL_C,
    CheckFailed,
    InputError,
)

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


def check_number(option: str, value: float | None, minimum: float | None = None, above: bool = False) -> None:
    """A number given on the command line is finite (`nan`, `inf` parse as floats) and not below `minimum` (or,
    with `above`, strictly above it); else an InputError naming the option. None (not given) passes."""
    if value is None:
        return
    if not math.isfinite(value):
        raise InputError(f"{option} {value}: give a finite number")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise InputError(f"{option} {value:g}: give a number {'above' if above else 'of at least'} {minimum:g}")


def run_guarded(main_fn, argv=None) -> int:
    """Run a command's `main`: bad input exits 2, a failed check 1, each as one `error:` line; Ctrl-C 130 and a
    reader that closed our output (`| head`) 141, as the shell reports those signals, without a traceback."""
    try:
        return main_fn(argv) or 0
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_CTRL_C
    except BrokenPipeError:
        # Python would complain again flushing stdout at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


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
