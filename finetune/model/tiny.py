"""Materialise a seeded tiny Mixtral checkpoint on disk (briefly pretrained by default), for the tiny
recipes, the demo and the tests.

Written by `python -m finetune.tiny` (finetune/tiny.py), and built in-process by the tests and the demo.

The folder looks like a real Mixtral repository: config, generation config, sharded safetensors in the
original key layout (`model.layers.N.block_sparse_moe.experts.K.w1/w2/w3.weight`), an index file, and
the real Mixtral v1 tokenizer (32000 pieces) with the Mixtral-Instruct chat template.

A random model predicts a near-uniform distribution that LoRA can hardly move, so by default the base is
first pretrained briefly (all weights, next-token loss) on plain-text renderings of the bundled training
conversations: each document between BOS and EOS as in real pretraining data, but no [INST] markers, so
it learns the content and where a text ends, not the chat format. That is left to SFT, as with a real
base model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from finetune.data.chat_format import bundled_sentencepiece_path, save_tokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "chat" / "train.jsonl"


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


PRETRAIN_BATCH, PRETRAIN_LENGTH = 8, 64  # sequences x tokens per pretraining step


def pretrain(model, steps: int, seed: int, batch_size: int = PRETRAIN_BATCH, seq_len: int = PRETRAIN_LENGTH,
             lr: float = 3e-3) -> float:
    """Full-parameter next-token training on packed documents; returns the last loss."""
    import torch

    from finetune.data.chat_format import ChatEncoder

    encoder = ChatEncoder(bundled_sentencepiece_path())
    stream = []
    for doc in pretraining_text():
        stream += [encoder.bos_id] + encoder.text_ids(doc) + [encoder.eos_id]  # packed like real pretraining
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
    **config_kwargs,
) -> Path:
    """Write a seeded tiny Mixtral (optionally pretrained for `pretrain_steps`) to out_dir, which must be
    new or empty (or `overwrite`); it appears only once complete (finetune/files/output_folder.py)."""
    import torch
    from transformers import GenerationConfig, MixtralForCausalLM

    from finetune.files.output_folder import check_output, staged

    out_dir = Path(out_dir)
    check_output(out_dir, {"bundled training text": DEFAULT_CORPUS}, overwrite, option="out_dir")
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    # Real checkpoints have no all-equal routers; a visible init spread makes routing non-trivial.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    if pretrain_steps:
        pretrain(model, pretrain_steps, seed)
    with staged(out_dir) as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=64).save_pretrained(folder)
        save_tokenizer(bundled_sentencepiece_path(), folder)
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
