"""Pre-flight check: see exactly what a recipe will train on before paying for GPUs.

    python -m finetune.check recipes/tiny/sft.yaml [key.sub=value ...]

Validates the recipe exactly as the passes do before loading (TRL's arguments, the output folder, the
model's config, DPO's SFT adapter), loads and validates the data with the same code the trainers use, prints row
counts and token-length statistics (and how many samples exceed `data.max_length`), and shows the first
sample with the trained (labelled) tokens marked. Exits 2 with a message naming the key or the data
rows when something is wrong.
"""

from __future__ import annotations

import sys

from finetune.cli import invoked_as
from finetune.data.cache import prepare
from finetune.data.encoders import encoder_for
from finetune.data.preview import report
from finetune.train.preflight import preflight
from finetune.train.steps import recipe_from_command_line


def main(argv: list[str] | None = None) -> int:
    recipe, _ = recipe_from_command_line(invoked_as("check"), None, __doc__, argv)
    preflight(recipe)  # exactly what the passes refuse before loading
    encoder = encoder_for(recipe)
    prepared = prepare(recipe.data, recipe.kind, encoder, progress=sys.stderr.isatty())
    print(report(recipe, encoder, prepared))
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
