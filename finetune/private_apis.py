"""The private library APIs this package relies on, each named once with the reason, and checked.

Only where nothing public does the job. `problems()` says which of them a pinned library release has
changed (tests/test_private_apis.py runs it), so an upgrade fails with the API's name, not deep inside
a training run. The method overrides (`_save`, `_prepare_dataset`, `_precompute_ref_logps`) live in
finetune/dpo.py, `_clip_grad_norm` and `_get_grad_norm` in finetune/train/trainer.py; the functions below
are the only way the rest of the package reaches the others.
"""

from __future__ import annotations

import inspect

import torch

# (what, why): the table the README points to.
USED = {
    "trl DPOTrainer._save(output_dir, state_dict)": "save the policy adapter only, not TRL's frozen `ref` copy "
    "(Trainer.save_model, the public entry, gathers ZeRO-3 shards and then calls it)",
    "trl DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)": "skip TRL's re-tokenization: "
    "our ids are mistral_common's exactly, the transformers tokenizer's are not",
    "trl DPOTrainer._precompute_ref_logps(dataset, name, batch_size)": "put the compact LM head in place before TRL "
    "precomputes reference log-probs inside its __init__",
    "trl trainer._total_train_tokens": "non-pad tokens seen on all ranks, for tokens/s in the log",
    "trl.kernels.chunked_logprob._use_triton(device)": "whether TRL's fused LM head runs its Triton kernel; "
    "elsewhere finetune/model/lm_head.py replaces the slow fallback",
    "torch._grouped_mm(mat_a, mat_b, offs=...)": "torch's grouped-mm kernel on a torch older than 2.10, which has "
    "no public `torch.nn.functional.grouped_mm` (the device machines' torch may be older than ours)",
    "torch DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)": "keep the 4-bit "
    "expert stacks out of DDP's start-up broadcast, which cannot send them (every rank quantized the same "
    "checkpoint, and they never train)",
    "torch.Tensor._make_wrapper_subclass(cls, shape, dtype, device, requires_grad)": "the 4-bit expert stack "
    "(finetune/moe/nf4.py) is a tensor subclass that holds no dense storage; this is how torch's own subclasses "
    "(and torchao's NF4Tensor) make one",
    "torch._subclasses.fake_tensor.is_fake(tensor)": "whether a tensor has values to read: the routed expert "
    "products read their group ends on a CPU (free there, and faster), never on a fake tensor, which stands in "
    "for a GPU in tests/test_host_syncs.py",
    "transformers Trainer._clip_grad_norm(model)": "under expert parallelism, clip by one norm over every expert "
    "(each process holds different ones, so each process's own norm would clip the shared weights differently)",
    "transformers Trainer._get_grad_norm(model, grad_norm)": "under expert parallelism without clipping, log the "
    "one norm over every expert, not the main process's share",
    "torch._C._current_graph_task_id()": "whether a forward is a gradient-checkpointing recompute inside backward, "
    "so router logits are not collected twice",
}


def trl_uses_triton(device: torch.device) -> bool:
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device)


def torch_grouped_mm():
    """torch's grouped-mm kernel: the public function where it exists, else the private op; None without one."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def ddp_ignore_parameters(model: torch.nn.Module, names: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def is_fake_tensor(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def problems() -> list[str]:
    """One line per private API above that the installed libraries no longer provide as used."""
    from trl import DPOTrainer, SFTTrainer

    found = []
    for method, parameters in (("_save", ["output_dir", "state_dict"]),
                               ("_prepare_dataset", ["dataset", "processing_class", "args", "dataset_name"]),
                               ("_precompute_ref_logps", ["dataset", "name", "batch_size"])):
        function = getattr(DPOTrainer, method, None)
        if function is None:
            found.append(f"trl DPOTrainer.{method} is gone")
        elif list(inspect.signature(function).parameters)[1:] != parameters:
            found.append(f"trl DPOTrainer.{method} now takes {list(inspect.signature(function).parameters)[1:]}, "
                         f"expected {parameters}")
    for trainer in (SFTTrainer, DPOTrainer):
        if "self._total_train_tokens" not in inspect.getsource(trainer):
            found.append(f"trl {trainer.__name__} no longer keeps self._total_train_tokens")
    try:
        from trl.kernels.chunked_logprob import _use_triton

        _use_triton(torch.device("cpu"))
    except (ImportError, TypeError) as err:
        found.append(f"trl.kernels.chunked_logprob._use_triton(device) failed: {err}")
    if torch_grouped_mm() is None:
        found.append("torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm "
                     "(expert products fall back to one matmul per expert)")
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            fake = torch.empty(2)
        if not is_fake_tensor(fake) or is_fake_tensor(torch.empty(2)):
            found.append("torch._subclasses.fake_tensor.is_fake no longer tells a fake tensor from a real one")
    except (ImportError, AttributeError) as err:
        found.append(f"torch._subclasses.fake_tensor.is_fake failed: {err}")
    try:
        in_backward()
    except AttributeError:
        found.append("torch._C._current_graph_task_id is gone")
    if not callable(getattr(torch.Tensor, "_make_wrapper_subclass", None)):
        found.append("torch.Tensor._make_wrapper_subclass is gone (the 4-bit expert stacks cannot be built)")
    from transformers import Trainer

    clip = getattr(Trainer, "_clip_grad_norm", None)
    if clip is None or list(inspect.signature(clip).parameters) != ["self", "model"]:
        found.append("transformers Trainer._clip_grad_norm(model) is gone or changed (expert-parallel clipping)")
    elif "self._clip_grad_norm(" not in inspect.getsource(Trainer):
        found.append("transformers Trainer no longer clips through self._clip_grad_norm (expert-parallel clipping)")
    norm = getattr(Trainer, "_get_grad_norm", None)
    if norm is None or list(inspect.signature(norm).parameters) != ["self", "model", "grad_norm"]:
        found.append("transformers Trainer._get_grad_norm(model, grad_norm) is gone or changed (expert-parallel norm)")
    elif "self._get_grad_norm(" not in inspect.getsource(Trainer):
        found.append("transformers Trainer no longer logs its norm through self._get_grad_norm (expert-parallel norm)")
    from torch.nn.parallel import DistributedDataParallel

    setter = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:
        found.append("torch DistributedDataParallel._set_params_and_buffers_to_ignore_for_model is gone")
    elif "_ddp_params_and_buffers_to_ignore" not in inspect.getsource(DistributedDataParallel.__init__):
        found.append("torch DistributedDataParallel no longer reads module._ddp_params_and_buffers_to_ignore")
    return found
