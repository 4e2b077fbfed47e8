"""Mixtral-Instruct chat format, token-exact with `mistral_common`.

Two encoders, one format:

* `ChatEncoder` builds training samples (ids + labels) straight from SentencePiece, the way
  `mistral_common`'s v1 instruct tokenizer does: `<s>`, then `[INST] {user} [/INST]` and
  `{reply}</s>` segments, each encoded on its own. A system message is folded into the first user
  turn as `system + "\n\n" + user`. Text inside messages is always plain text, so `</s>` typed by a
  user never becomes the EOS id. Written by hand because `mistral_common` gives ids but no label
  mask, and transformers' tokenizer is not SentencePiece-exact (see `build_hf_tokenizer`).

* `build_hf_tokenizer` makes the transformers tokenizer saved next to every adapter and export. Its
  `tokenizer.json` reproduces SentencePiece: merges ranked by SentencePiece piece score (transformers'
  converter ranks them by id, which merges whitespace runs too early), SentencePiece's dummy `▁`
  prefix and its split into words. Its chat template carries `{% generation %}` markers.
  Known residual difference: text in a message that spells a special token (`<s>`, `</s>`, `<unk>`)
  becomes that control id in transformers; serve with `mistral_common` (vLLM: `--tokenizer-mode
  mistral`) when users can type those strings.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from finetune.files.hub_ids import is_hub_id

IGNORE_INDEX = -100
SP_FILENAME = "tokenizer.model"
SP_FILENAMES = (SP_FILENAME, "tokenizer.model.v3")
"""Looked for in a model folder, in this order: Mixtral 8x22B's repositories may carry the v3 file under its
`mistral_common` name."""

# Mixtral-Instruct v1 chat template for transformers. Mirrors ChatEncoder: the tokenizer gives every
# segment between special tokens SentencePiece's dummy-prefix space, as mistral_common does.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is not none %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}"
    "{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
)


BUNDLED_FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}
"""The tokenizers shipped inside the `mistral-common` package: v1 is Mixtral 8x7B's (32000 pieces), v3 Mixtral
8x22B's (32768 pieces, with control tokens for [INST] and function calling)."""


def bundled_sentencepiece_path(version: str = "v1") -> Path:
    """A Mixtral tokenizer shipped inside the `mistral-common` package (BUNDLED_FILES)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / BUNDLED_FILES[version]


def find_sentencepiece(model: str, tokenizer: str | None = None, fallback: str = "v1") -> Path:
    """The SentencePiece file to use: the recipe's tokenizer, the model folder's, else the bundled one of
    version `fallback`.

    For a Hub id the file is fetched from the Hub (it is part of every Mixtral repository)."""
    for candidate in (tokenizer, model):
        if candidate is None:
            continue
        path = Path(candidate)
        if path.is_file():
            return path
        for name in SP_FILENAMES:
            if (path / name).is_file():
                return path / name
    if tokenizer is None and is_hub_id(model):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
        )

        try:
            return Path(hf_hub_download(model, SP_FILENAME))
        except (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            # Offline or gated only: a repository without the file (another model family) stays an error.
            same = {"v1": "Mixtral 8x7B's", "v3": "Mixtral 8x22B's"}[fallback]
            warnings.warn(f"cannot fetch {SP_FILENAME} of {model} ({type(err).__name__}); using the Mixtral "
                          f"{fallback} tokenizer bundled with mistral-common, the same file as {same} (set "
                          "chat_format: v3 for Mixtral 8x22B)", stacklevel=2)
    if tokenizer is not None:
        raise FileNotFoundError(f"tokenizer {tokenizer!r}: no {SP_FILENAME} there")
    return bundled_sentencepiece_path(fallback)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


ENCODER_VERSION = 1
"""Bump when the ids or labels this module gives for a conversation change: it keys the tokenized-data cache
(finetune/data/cache.py), so a cache built by an older encoder is never reused."""


class ChatEncoder:
    """Conversation -> token ids and labels, exactly as Mixtral-Instruct (mistral_common v1)."""

    format = "v1"
    chat_template = CHAT_TEMPLATE
    context = 32768
    """Mixtral 8x7B's context, written into the saved tokenizer's `model_max_length`."""

    def __init__(self, sentencepiece_path: str | os.PathLike):
        import sentencepiece

        self.path = Path(sentencepiece_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # Mistral's vocabulary has no pad piece; <unk> (0) is never produced for text thanks to byte
        # fallback, and pad must not be EOS or a collator that masks pads stops teaching EOS.
        self.pad_id = self.sp.unk_id()

    def __reduce__(self):  # rebuilt from its file in the processes that tokenize (datasets' map)
        return ChatEncoder, (self.path,)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def text_ids(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def user_ids(self, content: str) -> list[int]:
        return self.text_ids(f"[INST] {content} [/INST]")

    def reply_ids(self, content: str) -> list[int]:
        return self.text_ids(content) + [self.eos_id]

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> Sample:
        """Ids and labels for a conversation (roles already validated). Labels are the assistant
        replies and their EOS; everything else is IGNORE_INDEX."""
        if tools or not isinstance(messages, list):
            raise ValueError("the v1 chat format has no tool calls; they need the v3 tokenizer (Mixtral 8x22B)")
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "user":
                if i == 0 and system is not None:
                    content = system + "\n\n" + content
                part = self.user_ids(content)
                ids += part
                labels += [IGNORE_INDEX] * len(part)
            else:
                part = self.reply_ids(content)
                ids += part
                labels += part
        return Sample(ids, labels)

    def encode_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Ids of a prompt that ends with a user turn (what generation starts from)."""
        return self.encode(messages, tools).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    @cached_property
    def hf_tokenizer(self):
        return build_hf_tokenizer(self.path, self.chat_template, self.context)


def build_hf_tokenizer(sentencepiece_path: str | os.PathLike, chat_template: str = CHAT_TEMPLATE,
                       model_max_length: int = 32768):
    """A transformers tokenizer that reproduces SentencePiece, with the model's Mixtral-Instruct template.
    Control pieces (`<s>`, `</s>`, and v3's `[INST]`, `[TOOL_CALLS]`, ...) are special tokens; SentencePiece's
    user-defined pieces (v3's `[REFERENCE_DOC_n]`), which it matches inside text, are added tokens matched on
    the normalized text, as SentencePiece does."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sentencepiece_path).read_bytes())
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    return tokenizer_from_pieces(pieces, chat_template, model_max_length)


UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4
"""SentencePiece's piece types (ModelProto); GGUF's token types number them the same."""


def tokenizer_from_pieces(pieces: list[tuple[str, float, int]], chat_template: str = CHAT_TEMPLATE,
                          model_max_length: int = 32768):
    """`build_hf_tokenizer` from the pieces alone: (text, score, type) in id order, as a SentencePiece file or a
    GGUF file's tokenizer metadata holds them."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    scores = {piece: score for piece, score, _ in pieces}
    # SentencePiece merges the pair whose result has the highest score; rank merges the same way.
    merges = generate_merges(vocab, scores)
    unk, bos, eos = (pieces[i][0] for i in (0, 1, 2))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece's word split with allow_whitespace_only_pieces: a run of spaces joins the word after it.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    control = [piece for piece, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(piece, special=False, normalized=True) for piece, _, kind in pieces
                        if kind == USER_DEFINED])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=unk,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tokenizer(encoder: ChatEncoder, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json (+ config, the encoder's chat template) and the SentencePiece file into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentencepiece_path = encoder.path
    tokenizer = build_hf_tokenizer(sentencepiece_path, encoder.chat_template, encoder.context)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # The generic class loads tokenizer.json exactly as written, in transformers 4.x and 5.x alike;
    # transformers 5's LlamaTokenizer would rebuild its own (not SentencePiece-exact) pre-tokenizer.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    target = out_dir / SP_FILENAME
    if Path(sentencepiece_path).resolve() != target.resolve():
        target.write_bytes(Path(sentencepiece_path).read_bytes())
