"""Whether a name is a Hugging Face Hub id (`org/name`) or a path on this machine: the one rule.

A model, tokenizer, dataset or `--base` may be either. A name is taken as a Hub id when it is exactly two
parts (`org/name`), neither starts like a path (`.` or `/`), and nothing exists at that path here; every
command decides the same way, so a folder named `runs/base` that exists is always the folder.
"""

from __future__ import annotations

from pathlib import Path


def looks_like_hub_id(name: str) -> bool:
    """`org/name` in shape, whether or not such a path exists here (for repository ids to push to)."""
    org, slash, repo = name.partition("/")
    return bool(slash and org and repo) and "/" not in repo and not name.startswith((".", "/", "~"))


def is_hub_id(name: str) -> bool:
    """A Hub id, not a local path: `org/name` in shape and no such file or folder here."""
    return looks_like_hub_id(name) and not Path(name).exists()


def public_name(value: str | None) -> str | None:
    """What published files (model cards, pushed recipes) call a model, adapter or data file: a Hub id as it
    is, a local path by its last part only, so no path of this machine is ever published."""
    if value is None:
        return None
    return value if is_hub_id(value) else Path(value).name


def same_model(a: str, b: str) -> bool | None:
    """Whether two names (Hub ids or paths) are the same model: True, False, or None when a path no longer
    exists here and so cannot be told apart from another."""
    if a == b:
        return True
    known = [is_hub_id(n) or Path(n).exists() for n in (a, b)]
    if not all(known):
        return None
    return not any(map(is_hub_id, (a, b))) and Path(a).resolve() == Path(b).resolve()
