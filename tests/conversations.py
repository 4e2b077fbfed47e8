"""Seeded random conversations for the tokenizer parity tests."""

import random

PLAIN_WORDS = (
    "the model answers what is two plus three café naïve über straße Mixtral expert routing "
    "bonjour comment ça va très bien merci 日本語 テキスト 中文 한국어 Ελληνικά русский 🤖 🚀 ✓ "
    "def return x = 1 print(x) {\"key\": [1, 2]} 3.14159 -42 1e-5 100% #tag @user a/b\\c"
).split()
# Text that must stay plain: spellings of special tokens and the instruction markers.
LOOKALIKES = ["</s>", "<s>", "[INST]", "[/INST]", "<unk>", "<<SYS>>", "<0x0A>", "▁"]
SPACES = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\n    ", "\t", " \n", "\u00a0", "\r\n"]


def random_text(rng: random.Random, lookalikes: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 14)):
        if lookalikes and rng.random() < 0.15:
            parts.append(rng.choice(LOOKALIKES))
        else:
            parts.append(rng.choice(PLAIN_WORDS))
        parts.append(rng.choice(SPACES) if lookalikes else rng.choice(SPACES[:2] + ["\n", "\n    "]))
    text = "".join(parts)
    if lookalikes and rng.random() < 0.3:
        text = rng.choice(SPACES) + text  # leading whitespace
    else:
        text = text.strip() or "x"
    return text


def random_conversation(rng: random.Random, lookalikes: bool = False, end_with_assistant: bool = True) -> list[dict]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": random_text(rng, lookalikes)})
    turns = rng.randint(1, 4)
    for t in range(turns):
        messages.append({"role": "user", "content": random_text(rng, lookalikes)})
        if t < turns - 1 or end_with_assistant:
            messages.append({"role": "assistant", "content": random_text(rng, lookalikes)})
    return messages
