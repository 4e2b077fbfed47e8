"""Push an adapter or merged-model folder to the Hugging Face Hub.

    python -m finetune.push runs/tiny/dpo --repo-id ORG/NAME [--private] [--revision BRANCH]

The token comes from the usual places (HF_TOKEN, or `huggingface-cli login`) and is never written or
printed. The folder is uploaded as it is (finetune/publish/hub.py): a failed upload leaves it intact, says
why, and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import invoked_as
from finetune.publish.hub import push


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("push"), description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--include-checkpoints", action="store_true", help="also upload checkpoint-* folders")
    parser.add_argument("--base-id", help="the base model's Hub id, named in the pushed adapter_config.json "
                                          "(default: the base the adapter records, when that is a Hub id)")
    args = parser.parse_args(argv)
    url = push(args.folder, args.repo_id, args.private, args.revision, args.include_checkpoints, args.base_id)
    print(f"pushed {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
