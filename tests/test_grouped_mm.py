"""The two paths of finetune/moe/grouped_mm.py give the same products.

On a CPU the expert products loop over groups (the ends are free to read there); the GPU takes torch's
kernel with the ends on the device. The CPU kernel computes what the GPU's does, so each form is checked
here on both paths, with empty groups, `alpha`, and `into`, and the choice between them is pinned."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from finetune.moe.grouped_mm import CPU_KERNEL, ends_are_free, grouped_mm, one_group_at_a_time
from finetune.private_apis import torch_grouped_mm

pytestmark = pytest.mark.skipif(not CPU_KERNEL, reason="torch has no CPU grouped-mm kernel before 2.9")

ENDS = [3, 3, 9, 16]  # group 1 is empty


def operands(form: str):
    torch.manual_seed(0)
    if form == "rows":  # [rows, in] x [E, in, out]
        return torch.randn(16, 8), torch.randn(4, 8, 12)
    return torch.randn(8, 16), torch.randn(16, 12)  # [in, rows] x [rows, out] -> [E, in, out]


def by_hand(a, b, form):
    starts = [0, *ENDS[:-1]]
    if form == "rows":
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ENDS))])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ENDS)])


@pytest.mark.parametrize("form", ["rows", "weight_gradient"])
def test_the_loop_and_the_kernel_give_the_same_products(form):
    a, b = operands(form)
    offsets = torch.tensor(ENDS, dtype=torch.int32)
    kernel = torch_grouped_mm()(a, b, offs=offsets)
    expected = by_hand(a, b, form)
    torch.testing.assert_close(kernel, expected)
    torch.testing.assert_close(one_group_at_a_time(a, b, ENDS), expected)
    torch.testing.assert_close(one_group_at_a_time(a, b, ENDS, alpha=0.5), 0.5 * expected)
    base = torch.randn(expected.shape)
    into = base.clone()
    assert one_group_at_a_time(a, b, ENDS, into=into, alpha=2.0) is into
    torch.testing.assert_close(into, base + 2.0 * expected)
    torch.testing.assert_close(grouped_mm(a, b, offsets, alpha=3.0), 3.0 * expected)
    into = base.clone()
    torch.testing.assert_close(grouped_mm(a, b, offsets, into=into, alpha=-1.0), base - expected)


def test_into_in_another_dtype_is_added_to_in_its_own():
    a, b = operands("weight_gradient")
    into = torch.zeros(4, 8, 12, dtype=torch.float64)
    one_group_at_a_time(a, b, ENDS, into=into)
    assert into.dtype == torch.float64
    torch.testing.assert_close(into, by_hand(a, b, "weight_gradient").double())


def test_only_a_real_cpu_tensor_has_free_ends():
    assert ends_are_free(torch.tensor(ENDS))
    with FakeTensorMode():
        assert not ends_are_free(torch.tensor(ENDS))  # the GPU's stand-in takes the kernel
        assert not ends_are_free(torch.empty(4, device="cuda"))
