"""Model sizes the training kernels need, checked from the config before any weight loads (preflight and the
plan), so a run never fails on them after the data is prepared.

- torch's grouped matmul (the expert kernel, ours and transformers' default) needs every row stride to be a
  multiple of 16 bytes: hidden and intermediate sizes multiples of 4 in fp32, of 8 in bf16. Mixtral's 4096
  and 14336 are; a tiny test model of hidden 30 is not (measured: "strides should be multiple of 16 bytes").
- The attention heads split the hidden size evenly (the loader sets `head_dim` = hidden / heads, which
  DeepSpeed Ulysses and the plan read).
- A 4-bit base (finetune/moe/nf4.py) quantizes each expert's matrix in blocks of 64 weights: 2I x H and H x I
  must be whole numbers of blocks.
"""

from __future__ import annotations

from finetune.moe.nf4 import BLOCKSIZE

STRIDE_BYTES = 16


def shape_problems(config, dtype_bytes: int, quantized: bool) -> list[str]:
    """What the config's sizes would break, each in a sentence naming the sizes and the fix; [] when none."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    problems = []
    multiple = STRIDE_BYTES // dtype_bytes
    odd = [f"{name} {size}" for name, size in (("hidden_size", hidden), ("intermediate_size", intermediate))
           if size % multiple]
    if odd:
        problems.append(f"{' and '.join(odd)} must be multiples of {multiple} in {dtype_bytes * 8}-bit weights: the "
                        f"grouped matmul of the experts needs rows of a multiple of {STRIDE_BYTES} bytes")
    if getattr(config, "head_dim", None) is None and hidden % heads:
        problems.append(f"hidden_size {hidden} does not split into {heads} attention heads")
    if quantized:
        for what, rows, columns in (("gate_up", 2 * intermediate, hidden), ("down", hidden, intermediate)):
            if rows * columns % BLOCKSIZE:
                problems.append(f"the {what} expert matrix ({rows} x {columns}) is not a whole number of "
                                f"{BLOCKSIZE}-weight blocks, which 4-bit NF4 quantizes")
    return problems
