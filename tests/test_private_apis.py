"""The private library APIs we rely on (finetune/private_apis.py) still exist as used in the pinned releases."""

import re
from pathlib import Path

import torch

from finetune.private_apis import (
    USED,
    ddp_ignore_parameters,
    in_backward,
    problems,
    torch_grouped_mm,
)


def test_every_private_api_is_still_there_as_used():
    found = problems()
    assert not found, "a pinned library changed a private API this package uses:\n" + "\n".join(found)


def test_each_seam_still_does_its_job():
    # The grouped-mm kernel multiplies each group of rows by its own matrix.
    x, weight = torch.randn(5, 8), torch.randn(2, 8, 8)  # rows a multiple of 16 bytes, as the kernel needs
    offsets = torch.tensor([2, 5], dtype=torch.int32)
    expected = torch.cat([x[:2] @ weight[0], x[2:] @ weight[1]])
    torch.testing.assert_close(torch_grouped_mm()(x, weight, offs=offsets), expected)
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
    # Every private name the package reaches for is registered in USED with its reason, and nothing else
    # uses one: the package's own sources name no `._x` attribute of torch, transformers, trl or peft
    # outside finetune/private_apis.py and the registered TRL method overrides.
    assert all(reason.strip() for reason in USED.values())
    registered = {re.search(r"\.(_[a-z][a-z_]*)\b", what).group(1) for what in USED}
    package = Path(__file__).resolve().parent.parent / "finetune"
    for path in package.rglob("*.py"):
        if path.name == "private_apis.py":
            continue
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            for private in re.findall(r"(?:torch|transformers|trl|peft|DistributedDataParallel)(?:\.\w+)*\.(_[a-z]\w*)", code):
                assert private in registered, f"{path.name}: {line.strip()} uses {private}, not in private_apis.USED"
        for method in re.findall(r"def (_(?:save|prepare_dataset|precompute_ref_logps|clip_grad_norm|get_grad_norm))\(", path.read_text()):
            assert method in registered, f"{path.name} overrides {method}, not in private_apis.USED"
