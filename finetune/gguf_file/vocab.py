"""The tokenizer metadata of the GGUF file, from the model's SentencePiece file: the pieces, their scores and
types, the special ids and the model's Mixtral-Instruct chat template, so llama.cpp and Ollama tokenize
and format chats as training did.

The pieces come from the `gguf` package's vocab classes (`SentencePieceVocab` for a `tokenizer.model`,
`MistralVocab` for a folder holding only Mistral's versioned files such as `tokenizer.model.v3`). Both
leave SentencePiece's user-defined pieces (v3's `[REFERENCE_DOC_n]`) typed NORMAL; their type is set here
from the file itself, because SentencePiece (and llama.cpp, for USER_DEFINED) matches such pieces inside
text before any merge, where a NORMAL piece is only reached by merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from finetune.data.chat_format import find_sentencepiece
from finetune.data.encoders import chat_encoder
from finetune.errors import InputError


@dataclass
class TokenizerMetadata:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    chat_template: str
    format: str
    """v1 or v3 (the chat format read from the tokenizer)."""


def tokenizer_metadata(model_dir: str | Path, vocab_size: int) -> TokenizerMetadata:
    """The metadata for a model folder whose embedding has `vocab_size` rows."""
    from sentencepiece import sentencepiece_model_pb2

    folder = Path(model_dir)
    path = find_sentencepiece(str(folder))
    encoder = chat_encoder(path)
    vocab = gguf.SentencePieceVocab(folder) if (folder / "tokenizer.model").is_file() else gguf.MistralVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if [p.piece.encode() for p in proto.pieces] != tokens[:len(proto.pieces)]:
        raise InputError(f"{folder}: the gguf package read other pieces than {path.name} holds")
    for index, piece in enumerate(proto.pieces):
        if piece.type == piece.USER_DEFINED:
            types[index] = int(gguf.TokenType.USER_DEFINED)
    if len(tokens) > vocab_size:
        raise InputError(f"{folder}: the tokenizer has {len(tokens)} pieces but the model only {vocab_size} "
                         "embedding rows; this tokenizer is not the model's")
    for index in range(len(tokens), vocab_size):  # a padded embedding: unused rows, named as llama.cpp does
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return TokenizerMetadata(tokens, scores, types, encoder.bos_id, encoder.eos_id, encoder.sp.unk_id(),
                             encoder.chat_template, encoder.format)


def add_tokenizer(writer: gguf.GGUFWriter, metadata: TokenizerMetadata) -> None:
    writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece (SPM) tokenizer
    writer.add_tokenizer_pre("default")
    writer.add_token_list(metadata.tokens)
    writer.add_token_scores(metadata.scores)
    writer.add_token_types(metadata.types)
    writer.add_bos_token_id(metadata.bos_id)
    writer.add_eos_token_id(metadata.eos_id)
    writer.add_unk_token_id(metadata.unk_id)
    writer.add_pad_token_id(metadata.unk_id)  # as the saved tokenizer: Mistral has no pad piece, and pad != EOS
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(metadata.chat_template)
