"""Materialise a seeded tiny Mixtral checkpoint on disk (briefly pretrained by default), for the tiny
recipes, the demo and the tests.

    python -m finetune.tiny runs/tiny-mixtral [--pretrain-steps N] [--layers 2] [--experts 4] [--seed 0]
                                            [--chat-format v3]

The model itself, and what its folder holds: finetune/model/tiny.py.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import invoked_as
from finetune.model.tiny import DEFAULT_PRETRAIN_STEPS, make_tiny_mixtral


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("tiny"), description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="default: 300, or 600 with --chat-format v3; 0 keeps the random initialisation")
    parser.add_argument("--max-shard-size", default="2MB", help="e.g. 2MB: small shards exercise sharded loading")
    parser.add_argument("--chat-format", choices=("v1", "v3"), default="v1",
                        help="v1: Mixtral 8x7B's tokenizer; v3: Mixtral 8x22B's (vocabulary 32768, function calling)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    args = parser.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = DEFAULT_PRETRAIN_STEPS[args.chat_format]
    out = make_tiny_mixtral(
        args.out_dir,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        pretrain_steps=args.pretrain_steps,
        overwrite=args.overwrite,
        chat_format=args.chat_format,
        layers=args.layers,
        experts=args.experts,
        hidden=args.hidden,
        intermediate=args.intermediate,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    what = f"pretrained {args.pretrain_steps} steps" if args.pretrain_steps else "random"
    what += f", {args.chat_format} tokenizer"
    print(f"tiny Mixtral written to {out} ({what}, {len(shards)} safetensors shards, seed {args.seed})")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
