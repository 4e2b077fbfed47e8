"""Materialise a tiny random Mixtral checkpoint on disk, for the tiny recipes, the demo and the tests.

    python -m finetune.tiny runs/tiny/base [--layers 2] [--experts 4] [--hidden 64] [--seed 0]

The folder looks like a real Mixtral repository: config, generation config, sharded safetensors in the
original key layout (`model.layers.N.block_sparse_moe.experts.K.w1/w2/w3.weight`), an index file, and
the real Mixtral v1 tokenizer (32000 pieces) with the Mixtral-Instruct chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.chat_format import bundled_sentencepiece_path, save_tokenizer


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


def make_tiny_mixtral(
    out_dir: str | Path,
    seed: int = 0,
    max_shard_size: str = "2MB",
    **config_kwargs,
) -> Path:
    """Write a seeded random Mixtral to out_dir and return the folder."""
    import torch
    from transformers import GenerationConfig, MixtralForCausalLM

    out_dir = Path(out_dir)
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    # Real checkpoints have no all-equal routers; a visible init spread makes routing non-trivial.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=64).save_pretrained(out_dir)
    save_tokenizer(bundled_sentencepiece_path(), out_dir)
    check_original_layout(out_dir)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="2MB", help="e.g. 2MB: small shards exercise sharded loading")
    args = parser.parse_args(argv)
    out = make_tiny_mixtral(
        args.out_dir,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        layers=args.layers,
        experts=args.experts,
        hidden=args.hidden,
        intermediate=args.intermediate,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"tiny Mixtral written to {out} ({len(shards)} safetensors shards, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
