"""Grouped matrix products over rows sorted by expert, with the group ends on the device.

Why by hand: transformers' dispatcher (`integrations.moe._grouped_mm`) takes only the 3-D form (rows x
[E, in, out]) and on CPU calls the kernel whatever the strides. The routed expert path also needs the
weight-gradient form (a 2-D [in, rows] x [rows, out] per group -> [E, in, out]), and a fallback only where
torch's kernel cannot run.

Both forms take `offsets`, the int32 end of each group, as a device tensor: no value is read back to the
host, so a training step queues its expert products without waiting for the GPU (torch's kernel reads
the offsets on the device). The fallback, one matmul per group, reads them once; it runs only where the
kernel cannot: fp32 on CUDA (the kernel is bf16-only there), a GPU older than sm80, a torch without a CPU
kernel, or strides that are not multiples of 16 bytes (finetune/model/shapes.py refuses such models for
training on a GPU).
"""

from __future__ import annotations

import torch

from finetune.private_apis import torch_grouped_mm

_kernel = torch_grouped_mm()


def group_ends(sorted_ids: torch.Tensor, groups: int) -> torch.Tensor:
    """int32 [groups]: where each group of the sorted ids ends, computed on their device (not `bincount`,
    which reads its minimum and maximum back to the host on CUDA)."""
    values = torch.arange(groups, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, values, right=True).to(torch.int32)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per group g (rows offsets[g-1]:offsets[g]):
    - a [rows, in] x b [E, in, out] -> [rows, out]: each group's rows times b[g];
    - a [in, rows] x b [rows, out] -> [E, in, out]: each group's columns of a times its rows of b (a
      weight gradient; an empty group gives zeros).
    b is cast to a's dtype."""
    b = b.to(a.dtype)
    if _kernel is not None and kernel_takes(a, b):
        return _kernel(a, b, offs=offsets)
    return _one_group_at_a_time(a, b, offsets)


def kernel_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped-mm kernel runs on these operands (else `grouped_mm` loops)."""
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (8, 0):
            return False
    elif a.device.type != "cpu" or not CPU_KERNEL:
        return False
    return all(aligned(t) for t in (a, b))


def aligned(t: torch.Tensor) -> bool:
    """torch's rule for the kernel's operands: every stride but the unit one a multiple of 16 bytes."""
    size = t.element_size()
    return all(stride == 1 or stride * size % 16 == 0 for stride in t.stride())


def _one_group_at_a_time(a, b, offsets):
    ends = offsets.tolist()  # the one host read, where the kernel cannot run
    starts = [0, *ends[:-1]]
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for group, (start, end) in enumerate(zip(starts, ends)):
            if end > start:
                out[start:end] = a[start:end] @ b[group]
        return out
    return torch.stack([a[:, start:end] @ b[start:end] for start, end in zip(starts, ends)])


def _cpu_kernel() -> bool:
    """torch's CPU grouped-mm kernel exists from 2.9 (transformers' check, integrations/moe.py)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 9)


CPU_KERNEL = _cpu_kernel()
