"""Materialise a seeded tiny Mixtral checkpoint on disk (briefly pretrained by default), for the tiny
recipes, the demo and the tests.

Written by `python -m finetune.tiny` (finetune/tiny.py), and built in-process by the tests and the demo.

The folder looks like a real Mixtral repository: config, generation config, sharded safetensors in the
original key layout (`model.layers.N.block_sparse_moe.experts.K.w1/w2/w3.weight`), an index file, and
the real Mixtral v1 tokenizer (32000 pieces) with the Mixtral-Instruct chat template, or (`chat_format="v3"`)
Mixtral 8x22B's v3 tokenizer (32768 pieces, function calling) with its template.

A random model predicts a near-uniform distribution that LoRA can hardly move, so by default the base is
first pretrained briefly (all weights, next-token loss) on plain-text renderings of the bundled training
conversations: each document between BOS and EOS as in real pretraining data, but no [INST] markers, so
it learns the content and where a text ends, not the chat format. That is left to SFT, as with a real
base model. The v3 base also reads the bundled function-calling rows, their tool lists, calls and
results between their control tokens but without [INST] (`pretraining_tool_ids`), so that SFT only has to
teach it when to call.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from finetune.data.chat_format import bundled_sentencepiece_path, save_tokenizer
from finetune.data.encoders import ENCODERS, V3_VOCAB

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "chat" / "train.jsonl"
TOOL_CORPUS = DEFAULT_CORPUS.parents[1] / "tools" / "train.jsonl"


def tiny_config(
    layers: int = 2,
    experts: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    top_k: int = 2,
    vocab_size: int = 32000,
    max_positions: int = 4096,
):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )


def pretraining_text(path: Path = DEFAULT_CORPUS) -> list[str]:
    """Plain-text documents from chat rows: the turns' text, one per line, no chat markers."""
    documents = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        documents.append("\n".join(m["content"] for m in messages if m["role"] != "system"))
    return documents


def pretraining_tool_ids(encoder, path: Path = TOOL_CORPUS) -> list[list[int]]:
    """Documents of the v3 base from the function-calling rows: the tool list, question, calls, results and
    answer, each call after `[TOOL_CALLS]` and each list and result between its control tokens, but no
    `[INST]`: the base knows what a call looks like, SFT teaches it when to make one. A tiny base that never
    saw `[TOOL_CALLS]` or `{"name": ...` cannot learn to write them through LoRA alone (its output rows for
    those tokens are untrained), where a real base has read plenty of JSON."""
    from finetune.data.chat_format_v3 import json_text
    from finetune.data.tool_rows import check_tool_conversation

    documents = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        conversation, _ = check_tool_conversation(row["messages"], row["tools"], ends_with="assistant")
        ids = [encoder.tools_start, *encoder.text_ids(json_text(conversation.tools)), encoder.tools_end]
        for message in conversation.messages:
            if message["role"] == "tool":
                ids += encoder.tool_result_ids(message)
            elif "tool_calls" in message:
                ids += encoder.reply_ids(message["tool_calls"])[:-1]  # without its EOS: the document goes on
            elif message["role"] != "system":
                ids += encoder.text_ids(message["content"])
        documents.append(ids)
    return documents


PRETRAIN_BATCH, PRETRAIN_LENGTH = 8, 64  # sequences x tokens per pretraining step
# `finetune.tiny`'s default steps. The v3 base reads the 2000 tool documents besides the chat text. After 300
# steps, its SFT (100 steps) called the same function whatever it was asked: the right one for 13 of 60
# held-out questions, below the 22 that always calling the commonest one gets. After 600, 40 of 60.
DEFAULT_PRETRAIN_STEPS = {"v1": 300, "v3": 600}


def pretrain(model, steps: int, seed: int, batch_size: int = PRETRAIN_BATCH, seq_len: int = PRETRAIN_LENGTH,
             lr: float = 3e-3, chat_format: str = "v1") -> float:
    """Full-parameter next-token training on packed documents; returns the last loss."""
    import torch

    encoder = ENCODERS[chat_format](bundled_sentencepiece_path(chat_format))
    stream = []
    documents = [encoder.text_ids(doc) for doc in pretraining_text()]
    if chat_format == "v3":
        documents += pretraining_tool_ids(encoder)
    for ids in documents:
        stream += [encoder.bos_id] + ids + [encoder.eos_id]  # packed like real pretraining
    tokens = torch.tensor(stream)
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    loss = None
    for _ in tqdm(range(steps), desc="pretraining tiny base", unit=" steps"):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss) if loss is not None else float("nan")


def make_tiny_mixtral(
    out_dir: str | Path,
    seed: int = 0,
    max_shard_size: str = "2MB",
    pretrain_steps: int = 0,
    overwrite: bool = False,
    chat_format: str = "v1",
    **config_kwargs,
) -> Path:
    """Write a seeded tiny Mixtral (optionally pretrained for `pretrain_steps`) to out_dir, which must be
    new or empty (or `overwrite`); it appears only once complete (finetune/files/output_folder.py).
    `chat_format`: `v1` (Mixtral 8x7B's tokenizer) or `v3` (Mixtral 8x22B's, vocabulary 32768)."""
    import torch
    from transformers import GenerationConfig, MixtralForCausalLM

    from finetune.files.output_folder import check_output, staged

    out_dir = Path(out_dir)
    check_output(out_dir, {"bundled training text": DEFAULT_CORPUS, "bundled tool rows": TOOL_CORPUS}, overwrite,
                 option="out_dir")
    if chat_format == "v3":
        config_kwargs.setdefault("vocab_size", V3_VOCAB)
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    # Real checkpoints have no all-equal routers; a visible init spread makes routing non-trivial.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    if pretrain_steps:
        pretrain(model, pretrain_steps, seed, chat_format=chat_format)
    with staged(out_dir) as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=64).save_pretrained(folder)
        save_tokenizer(ENCODERS[chat_format](bundled_sentencepiece_path(chat_format)), folder)
        check_original_layout(folder)
    return out_dir


def checkpoint_keys(model_dir: str | Path) -> list[str]:
    """All tensor names of a (sharded or single-file) safetensors checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def check_original_layout(model_dir: str | Path) -> None:
    """Fail loudly if the checkpoint is not in the per-expert layout that servers load."""
    keys = checkpoint_keys(model_dir)
    if not any(".block_sparse_moe.experts.0.w1.weight" in k for k in keys):
        fused = [k for k in keys if "gate_up_proj" in k][:2]
        raise RuntimeError(f"{model_dir}: expected the original Mixtral expert layout, found {fused}")
