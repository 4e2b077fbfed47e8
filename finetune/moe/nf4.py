"""Fused expert stacks stored in 4-bit NF4, quantized one expert at a time, dequantized a layer's stack at a time.

Why by hand: bitsandbytes (and transformers' `BitsAndBytesConfig`) quantize `nn.Linear` modules only.
Mixtral's experts are fused 3-D parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]), 97% of the weights, so a stock "4-bit" Mixtral keeps them in 16 bits. Others dequantize the
whole stack of every layer up front or keep it for backward; here it exists only while its grouped matmul
runs (finetune/moe/expert_lora.py), forward and again in backward.

`NF4ExpertStack` is a tensor that looks like the stack it replaces (shape [E, out, in], the compute dtype,
no gradient), so PEFT's `target_parameters` wraps it like the dense one and adapters keep PEFT's format.
It holds, per expert, the packed 4-bit codes (`quantize_4bit`, NF4, blocksize 64: out*in/2 bytes) and the
fp32 scale of each block of 64 (out*in/64 floats): 4.5 bits per weight, 0.28x bf16. Each expert is
quantized on its own, so its slice of both is all `expert(e)` reads; the blocks of consecutive experts
are consecutive, so `dequantize()` rebuilds the whole stack in one call. Any other use of its values (a
merge, PEFT's own expert path, a copy) raises instead of computing on something that is not the weight.

The routed path dequantizes a layer's whole stack for one grouped matmul (forward, and again in backward:
never kept), not one expert at a time: slicing the routed rows per expert needs each expert's row count
on the host, a GPU sync per layer, and one launch per expert. The cost is one layer's stack in the compute
dtype while it runs (8x7B: 1.75 GiB for gate_up in bf16), which the memory plan counts. bitsandbytes'
NF4 code table is built once per stack and device (`code`), not on every call from a Python list.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from finetune.errors import InputError

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
# Bytes per weight: 4-bit codes plus an fp32 scale per block of 64 here; bitsandbytes' Linear4bit with double
# quantization (attention) stores each block's scale in 8 bits plus an fp32 scale per 256 blocks.
EXPERT_BYTES_PER_WEIGHT = 0.5 + 4 / BLOCKSIZE
LINEAR_BYTES_PER_WEIGHT = 0.5 + 1 / BLOCKSIZE + 4 / (BLOCKSIZE * 256)
INSTALL = 'pip install -e ".[qlora]"  (or: pip install "bitsandbytes>=0.50")'
aten = torch.ops.aten


class QuantizationUnavailable(InputError):
    """A recipe asks for a 4-bit base where bitsandbytes is not installed."""


def bitsandbytes(source: str = ""):
    """The bitsandbytes module, or a clear error naming the install command."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        where = f"{source}: " if source else ""
        raise QuantizationUnavailable(f"{where}quantization: nf4 needs bitsandbytes, which is not installed; "
                                      f"install it with: {INSTALL}") from None
    return bnb


def quantize_expert(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's matrix [out, in] -> (packed codes, uint8 [out*in/2]; block scales, fp32 [out*in/64])."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, quant_type=QUANT_TYPE,
                                  compress_statistics=False, quant_storage=torch.uint8)
    return packed.reshape(-1), state.absmax.float()


class NF4ExpertStack(torch.Tensor):
    """A frozen expert stack [E, out, in] in NF4: `expert(e)` dequantizes expert e alone."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor

    @staticmethod
    def __new__(cls, packed: torch.Tensor, absmax: torch.Tensor, shape: Iterable[int], dtype: torch.dtype,
                code: torch.Tensor | None = None):
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed, absmax, shape, dtype, code=None):
        from bitsandbytes.functional import get_4bit_type

        self.packed, self.absmax = packed, absmax
        self.code = code if code is not None else get_4bit_type(QUANT_TYPE, device=packed.device)

    @classmethod
    def from_experts(cls, experts: Iterable[torch.Tensor], shape: tuple[int, int, int], dtype: torch.dtype,
                     device: torch.device | str) -> NF4ExpertStack:
        """Quantize the experts' matrices as they come, so only one is ever held in 16 bits."""
        count, rows, columns = shape
        if rows * columns % BLOCKSIZE:
            raise ValueError(f"expert matrices of {rows}x{columns} are not a whole number of {BLOCKSIZE}-blocks")
        packed = torch.empty(count, rows * columns // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(count, rows * columns // BLOCKSIZE, dtype=torch.float32, device=device)
        seen = 0
        for index, weight in enumerate(experts):
            if tuple(weight.shape) != (rows, columns):
                raise ValueError(f"expert {index} is {tuple(weight.shape)}, expected {(rows, columns)}")
            packed[index], absmax[index] = quantize_expert(weight.to(device))
            seen += 1
        if seen != count:
            raise ValueError(f"got {seen} experts, expected {count}")
        return cls(packed, absmax, shape, dtype)

    def expert(self, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert `index`'s matrix [out, in], dequantized into a new tensor of `dtype` (default: self's)."""
        return self._dequantize(self.packed[index], self.absmax[index], self.shape[1:], dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole stack [E, out, in] in `dtype`, in one call (the routed path's frozen weights)."""
        return self._dequantize(self.packed.reshape(-1), self.absmax.reshape(-1), self.shape, dtype)

    def _dequantize(self, packed, absmax, shape, dtype) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        state = QuantState(absmax=absmax, shape=torch.Size(shape), code=self.code, blocksize=BLOCKSIZE,
                           quant_type=QUANT_TYPE, dtype=dtype or self.dtype)
        return dequantize_4bit(packed, state)

    @property
    def stored_bytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes

    def __repr__(self) -> str:
        return f"NF4ExpertStack(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stack = args[0]
        if func in (aten.detach.default, aten.alias.default):  # what nn.Parameter and state_dict() do
            return cls(stack.packed, stack.absmax, stack.shape, stack.dtype, stack.code)
        if func is aten._to_copy.default and kwargs.get("layout", torch.strided) == torch.strided:  # .to(device)
            device = kwargs.get("device") or stack.device
            return cls(stack.packed.to(device), stack.absmax.to(device), stack.shape,
                       kwargs.get("dtype") or stack.dtype, stack.code.to(device))
        raise NotImplementedError(
            f"{func} on a 4-bit expert stack: its values exist only dequantized (NF4ExpertStack.dequantize); "
            "with quantization: nf4 the experts run through finetune/moe/expert_lora.py only (lora.expert_kernel: routed)"
        )


def quantized_stacks(model: nn.Module) -> dict[str, NF4ExpertStack]:
    """{parameter name: stack} of every NF4 expert stack in the model."""
    return {name: p for name, p in model.named_parameters() if isinstance(p, NF4ExpertStack)}
