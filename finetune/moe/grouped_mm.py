"""Grouped matrix products over rows sorted by expert, with the group ends on the device.

Why by hand: transformers' dispatcher (`integrations.moe._grouped_mm`) takes only the 3-D form (rows x
[E, in, out]) and on CPU calls the kernel whatever the strides. The routed expert path also needs the
weight-gradient form (a 2-D [in, rows] x [rows, out] per group -> [E, in, out]), products added in place
into an existing tensor, and a loop where torch's kernel cannot run or is not the faster choice.

Two paths, chosen per call:
- **The kernel** (torch's grouped mm) takes `offsets`, the int32 end of each group, as a device tensor: no
  value is read back to the host, so a training step queues its expert products without waiting for the GPU.
  This is the GPU path. It is also what runs under `FakeTensorMode`, where tensors have no values:
  tests/test_host_syncs.py runs the MoE layer there as the GPU's stand-in.
- **One matmul per group** reads the ends once. On a real CPU tensor that read waits for nothing, and the
  loop is the faster path there: it adds into the output in place (`addmm_`), where the kernel returns a
  fresh tensor to add, and on the CPU a fresh tensor of the routed rows' size is fresh pages from the OS
  (benchmarks/README.md, "sft_step": one layer's forward and backward, 0.87 s with the kernel, 0.80 s
  looping). Elsewhere it runs only where the kernel cannot: fp32 on CUDA (the kernel is bf16-only there),
  a GPU older than sm80, or strides that are not multiples of 16 bytes (finetune/model/shapes.py refuses
  such models on a GPU).
"""

from __future__ import annotations

import torch

from finetune.private_apis import is_fake_tensor, torch_grouped_mm

_kernel = torch_grouped_mm()


def group_ends(sorted_ids: torch.Tensor, groups: int) -> torch.Tensor:
    """int32 [groups]: where each group of the sorted ids ends, computed on their device (not `bincount`,
    which reads its minimum and maximum back to the host on CUDA)."""
    values = torch.arange(groups, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, values, right=True).to(torch.int32)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, into: torch.Tensor | None = None,
               alpha: float = 1.0) -> torch.Tensor:
    """Per group g (rows offsets[g-1]:offsets[g]):
    - a [rows, in] x b [E, in, out] -> [rows, out]: each group's rows times b[g];
    - a [in, rows] x b [rows, out] -> [E, in, out]: each group's columns of a times its rows of b (a
      weight gradient; an empty group gives zeros).
    b is cast to a's dtype. With `into`, alpha times the product is added to it in place, and it is returned."""
    b = b.to(a.dtype)
    if ends_are_free(offsets) or not (_kernel is not None and kernel_takes(a, b)):
        return one_group_at_a_time(a, b, offsets.tolist(), into, alpha)
    product = _kernel(a, b, offs=offsets)
    if into is None:
        return product if alpha == 1.0 else product.mul_(alpha)
    return into.add_(product, alpha=alpha)


def ends_are_free(offsets: torch.Tensor) -> bool:
    """Whether reading the group ends costs nothing: a CPU tensor that holds values (not a fake one)."""
    return offsets.device.type == "cpu" and not is_fake_tensor(offsets)


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


def one_group_at_a_time(a, b, ends: list[int], into=None, alpha: float = 1.0) -> torch.Tensor:
    """`grouped_mm` as one matmul per group, with the ends read: written into a new tensor, or added in
    place (`addmm_`) into `into`."""
    rows_form = b.dim() == 3
    fresh = into is None
    if fresh:
        shape = (a.shape[0], b.shape[-1]) if rows_form else (len(ends), a.shape[0], b.shape[-1])
        into = a.new_empty(shape)
        if rows_form:
            into[ends[-1] if ends else 0:].zero_()  # rows past the last group (none when the ends cover all)
    for group, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        target = into[start:end] if rows_form else into[group]
        if end <= start:
            if fresh:
                target.zero_()  # an empty group: no rows (rows form), or a zero weight gradient
            continue
        left, right = (a[start:end], b[group]) if rows_form else (a[:, start:end], b[start:end])
        if target.dtype == left.dtype:
            target.addmm_(left, right, beta=0.0 if fresh else 1.0, alpha=alpha)  # beta 0: the empty memory is ignored
        else:  # `into` kept in another dtype (a float32 gradient of bf16 products)
            target.add_(left @ right, alpha=alpha)
    return into


def _cpu_kernel() -> bool:
    """torch's CPU grouped-mm kernel exists from 2.9 (transformers' check, integrations/moe.py)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 9)


CPU_KERNEL = _cpu_kernel()
