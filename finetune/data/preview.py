"""What `finetune check` prints about a recipe's data: row counts, token-length statistics, and the first
sample with its trained (labelled) tokens marked, so a user sees what the model will learn before training."""

from __future__ import annotations

import statistics

from finetune.data.cache import Prepared, column
from finetune.data.chat_format import IGNORE_INDEX, ChatEncoder
from finetune.data.packing import packed_rows
from finetune.data.rows import bad_rows_message
from finetune.recipe.schema import Recipe

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


def render_sample(encoder: ChatEncoder, input_ids: list[int], labels: list[int]) -> str:
    """The tokens as text, with labelled runs wrapped in ⟦ ⟧."""
    out, inside = [], False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained != inside:
            out.append(MARK_OPEN if trained else MARK_CLOSE)
            inside = trained
        out.append(_token_text(encoder, token))
    if inside:
        out.append(MARK_CLOSE)
    return "".join(out)


def _token_text(encoder: ChatEncoder, token: int) -> str:
    piece = encoder.piece(token)
    if piece.startswith("<0x") and piece.endswith(">"):
        value = int(piece[3:-1], 16)
        return chr(value) if value < 0x80 else piece
    return piece.replace("▁", " ")


def length_stats(lengths: list[int]) -> str:
    if not lengths:
        return "no samples"
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"min {ordered[0]}, mean {statistics.fmean(ordered):.1f}, median {statistics.median(ordered):g}, "
        f"p95 {p95}, max {ordered[-1]} tokens"
    )


FORMATS = {"v1": "Mixtral-Instruct v1 (Mixtral 8x7B): [INST] as text, no tool calls",
           "v3": "Mixtral-Instruct v3 (Mixtral 8x22B): [INST] and tool calls as control tokens"}


def report(recipe: Recipe, encoder: ChatEncoder, prepared: Prepared) -> str:
    data = recipe.data
    lines = [
        f"recipe     {recipe.source} ({recipe.kind})",
        f"model      {recipe.model}",
        f"tokenizer  {encoder.path} ({encoder.vocab_size} pieces, bos {encoder.bos_id}, eos {encoder.eos_id}, "
        f"pad {encoder.pad_id})",
        f"format     {FORMATS[encoder.format]}",
        f"rows       {prepared.rows_read} read, {len(prepared.train)} train samples, "
        f"{len(prepared.eval) if prepared.eval is not None else 0} eval samples",
        f"data cache {prepared.folder} ({'opened' if prepared.cache_hit else 'tokenized and saved'} "
        f"in {prepared.seconds:.2f} s)",
    ]
    too_long = prepared.skipped_by_reason().get("too long", 0)
    lines.append(f"max_length {data.max_length} tokens: {too_long} sample(s) exceed it")
    if prepared.bad_rows:
        lines.append(f"skipped    {len(prepared.bad_rows)} bad row(s) (data.on_bad_rows=skip)")
        lines += ["  " + line for line in bad_rows_message(prepared.bad_rows, with_fix=False).splitlines()]
    train_lengths = prepared.lengths("train")
    lines.append(f"lengths    train: {length_stats(train_lengths)}")
    if prepared.eval is not None:
        lines.append(f"           eval:  {length_stats(prepared.lengths('eval'))}")
    if recipe.kind == "sft":
        trained = sum(column(prepared.train, "num_trained"))
        lines.append(
            f"tokens     {sum(train_lengths)} per epoch, {trained} of them trained "
            f"({100 * trained / max(1, sum(train_lengths)):.1f}% assistant tokens)"
        )
        if data.packing:
            rows = packed_rows(train_lengths, data.max_length)
            lines.append(f"packing    {len(train_lengths)} samples -> {rows} rows of <= {data.max_length} tokens")
        first = prepared.train[0]
        lines += ["", "first training sample (trained tokens inside ⟦ ⟧):",
                  render_sample(encoder, first["input_ids"], first["labels"])]
    else:
        lines.append("packing    off: DPO keeps each pair whole (TRL turns padding-free off for DPO)")
        first = prepared.train[0]
        prompt = first["prompt_ids"]
        lines += [
            "",
            "first preference pair (reply tokens inside ⟦ ⟧):",
            "prompt:   " + render_sample(encoder, prompt, [IGNORE_INDEX] * len(prompt)),
            "chosen:   " + render_sample(encoder, first["chosen_ids"], first["chosen_ids"]),
            "rejected: " + render_sample(encoder, first["rejected_ids"], first["rejected_ids"]),
        ]
    return "\n".join(lines)
