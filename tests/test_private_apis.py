"""The private library APIs we rely on (finetune/private_apis.py) still exist as used in the pinned releases."""

import torch

from finetune.private_apis import (
    USED,
    ddp_ignore_parameters,
    in_backward,
    problems,
    transformers_grouped_mm,
)


def test_every_private_api_is_still_there_as_used():
    found = problems()
    assert not found, "a pinned library changed a private API this package uses:\n" + "\n".join(found)


def test_each_seam_still_does_its_job():
    # The grouped-mm dispatcher multiplies each group of rows by its own matrix.
    x, weight = torch.randn(5, 8), torch.randn(2, 8, 8)  # rows a multiple of 16 bytes, as the kernel needs
    offsets = torch.tensor([2, 5], dtype=torch.int32)
    expected = torch.cat([x[:2] @ weight[0], x[2:] @ weight[1]])
    torch.testing.assert_close(transformers_grouped_mm()(x, weight, offsets), expected)
    # The graph-task id tells a forward run inside backward (a checkpoint recompute) from a plain one.
    seen = []
    leaf = torch.ones(2, requires_grad=True)
    hook = leaf.register_hook(lambda grad: seen.append(in_backward()) or grad)
    (leaf * 2).sum().backward()
    hook.remove()
    assert seen == [True] and in_backward() is False
    # DDP leaves the named parameters out of its start-up broadcast.
    model = torch.nn.Linear(2, 2)
    ddp_ignore_parameters(model, ["weight"])
    assert model._ddp_params_and_buffers_to_ignore == ["weight"] and model.weight._ddp_ignored
    assert len(USED) == 8  # each named once, with its reason
