"""Which chat format a model speaks, and its encoder: v1 (Mixtral 8x7B) or v3 (Mixtral 8x22B, with tools).

The format is read from the tokenizer file itself: v3's SentencePiece model has `[INST]` as a control piece
(v1 spells it in text pieces). A recipe may name it (`chat_format`); naming v3 for a v1 file is refused,
since v1 has no control tokens to write it with. Naming v1 for a v3 file is allowed: it is how a base
trained on the plain `[INST]` text would be tuned.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data.chat_format import ChatEncoder, find_sentencepiece
from finetune.data.chat_format_v3 import ChatEncoderV3
from finetune.recipe.schema import Recipe, RecipeError

ENCODERS = {"v1": ChatEncoder, "v3": ChatEncoderV3}
V3_VOCAB = 32768


def chat_format_of(sentencepiece_path: str | Path) -> str:
    """`v3` when the tokenizer has `[INST]` as a control token, else `v1`."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_path))
    inst = sp.piece_to_id("[INST]")
    return "v3" if inst != sp.unk_id() and sp.is_control(inst) else "v1"


def chat_encoder(sentencepiece_path: str | Path, chat_format: str = "auto") -> ChatEncoder:
    """The encoder for a tokenizer file: its own format (`auto`), or the one named (ChatEncoderV3 refuses a file
    without v3's control tokens)."""
    return ENCODERS[chat_format_of(sentencepiece_path) if chat_format == "auto" else chat_format](sentencepiece_path)


def encoder_for(recipe: Recipe) -> ChatEncoder:
    """The encoder for a recipe, checked against the model's vocabulary when known (the model itself was
    checked before: finetune.train.preflight)."""
    fallback = "v3" if recipe.chat_format == "v3" else "v1"
    path = find_sentencepiece(recipe.model, recipe.tokenizer, fallback)
    try:
        encoder = chat_encoder(path, recipe.chat_format)
    except ValueError as err:
        raise RecipeError(f"{recipe.source}: chat_format: {err}; set chat_format to auto or v1, or 'tokenizer' "
                          "to a v3 tokenizer.model") from None
    config_file = Path(recipe.model) / "config.json"
    if config_file.is_file():
        vocab = json.loads(config_file.read_text()).get("vocab_size")
        if vocab == V3_VOCAB and encoder.vocab_size < V3_VOCAB:
            # v3 put 768 control pieces before the text pieces: v1's ids mean other words to this model.
            raise RecipeError(
                f"{recipe.source}: model {recipe.model} has Mixtral 8x22B's vocabulary ({V3_VOCAB}) but tokenizer "
                f"{encoder.path} has {encoder.vocab_size} pieces (v1); set 'tokenizer' to the model's v3 "
                "tokenizer.model, or chat_format: v3 for the one bundled with mistral-common")
        if vocab is not None and vocab < encoder.vocab_size:
            raise RecipeError(
                f"{recipe.source}: tokenizer {encoder.path} has {encoder.vocab_size} pieces but model "
                f"{recipe.model} has vocab_size {vocab}; set 'tokenizer' to the model's tokenizer.model"
            )
    return encoder
