"""Secrets never reach a written file.

Recipes refuse fields that hold secrets (`train.hub_token`, or any key named like a token, key, password
or secret): recipes are copied next to every adapter, into model cards and onto the Hub. Tokens come
from the environment (`HF_TOKEN`, `WANDB_API_KEY`) or `huggingface-cli login` only. As a second guard,
text written to outputs (the recipe copy, model cards) goes through `redact`, which blanks the values of
those variables, the logged-in Hub token, and anything shaped like a Hub token.
"""

from __future__ import annotations

import os
import re

SECRET_KEY = re.compile(r"(^|_)(token|key|api_key|password|passwd|secret)$")
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
HUB_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
REDACTED = "<redacted>"
SECRET_FIX = ("recipes are copied into every output and pushed to the Hub, so remove it and use "
              "`huggingface-cli login` or the HF_TOKEN environment variable instead")


def is_secret_key(name: str) -> bool:
    return bool(SECRET_KEY.search(name.lower()))


def secret_values() -> list[str]:
    values = [os.environ[name] for name in SECRET_ENVIRONMENT if os.environ.get(name)]
    try:
        from huggingface_hub import get_token

        values.append(get_token() or "")
    except ImportError:
        pass
    return [v for v in values if len(v) >= 8]  # a short value would blank ordinary words


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret blanked; `secrets`: `secret_values()` when the caller already has them."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return HUB_TOKEN_SHAPE.sub(REDACTED, text)
