"""What fits instead, when `finetune.plan` says DOES NOT FIT: the nearest changes that do, each planned again.

Each axis that lowers memory per device (more devices, expert parallelism, ZeRO-3, ZeRO-3 with offload, a
4-bit base, a smaller micro-batch at the same global batch, a shorter `data.max_length`) is walked from the
nearest setup outwards, and the first setup that fits is kept. When no single change fits, pairs of changes are tried. Every
suggestion is printed with the `finetune.plan` command that plans it, so it can be checked, and a test does
exactly that. A 4-bit base runs without DeepSpeed, so it is never combined with ZeRO or more devices.
"""

from __future__ import annotations

from dataclasses import replace

from finetune.planning.memory import GIB, Plan, Setup
from finetune.planning.traffic import expert_parallel_sizes

MAX_NODES = 64


def axes(setup: Setup, experts: int = 0) -> dict[str, list[Setup]]:
    """For each way to need less memory per device, its candidate setups, nearest first. `experts`: the model's
    experts per layer, which expert parallelism splits (within a node)."""
    more_devices = [replace(setup, gpus=g) for g in (2, 4, 8) if g > setup.gpus]
    nodes = setup.nodes * 2
    while nodes <= MAX_NODES:
        more_devices.append(replace(setup, gpus=max(setup.gpus, 8), nodes=nodes))
        nodes *= 2
    shorter, length = [], setup.max_length // 2
    while length >= 256:
        shorter.append(replace(setup, max_length=length))
        length //= 2
    smaller, batch = [], setup.micro_batch // 2
    while batch >= 1:  # the same global batch, through more accumulation steps
        smaller.append(replace(setup, micro_batch=batch, accumulation=setup.accumulation * setup.micro_batch // batch))
        batch //= 2
    if setup.quantization != "none":  # one whole 4-bit copy per GPU: only the activations can shrink
        return {"micro_batch": smaller, "max_length": shorter}
    if setup.expert_parallel > 1:  # plain data parallel with the experts split: no ZeRO, no 4-bit
        return {"devices": more_devices, "micro_batch": smaller, "max_length": shorter}
    ep = [replace(setup, stage=0, offload_optimizer=False, offload_parameters=False, expert_parallel=n)
          for n in expert_parallel_sizes(experts, setup.gpus, setup.world)]
    return {
        "devices": more_devices,
        "expert_parallel": ep,
        "zero3": [replace(setup, stage=3)] if setup.stage < 3 else [],
        "offload": [replace(setup, stage=3, offload_optimizer=True, offload_parameters=True)]
        if not (setup.stage == 3 and setup.offload_optimizer and setup.offload_parameters) else [],
        "nf4": [replace(setup, stage=0, offload_optimizer=False, offload_parameters=False, quantization="nf4")],
        "micro_batch": smaller,
        "max_length": shorter,
    }


def fitting_setups(setup: Setup, fits, limit: int = 5, experts: int = 0) -> list[Setup]:
    """Setups that fit (`fits(setup)`): the nearest along each axis alone; when none does, the nearest pair
    of changes on two axes. At most `limit`, fewest GPUs first."""
    options = axes(setup, experts)
    found = [next((c for c in candidates if fits(c)), None) for candidates in options.values()]
    if not any(found):
        names = list(options)
        found = [next((s for first in options[a] for s in axes(first, experts).get(b, []) if fits(s)), None)
                 for i, a in enumerate(names) for b in names[i + 1:]]
    unique = list(dict.fromkeys(s for s in found if s is not None))
    return sorted(unique, key=lambda s: (s.world, s.stage, s.offload_parameters))[:limit]


def plan_command(args, old: Setup, setup: Setup) -> str:
    """The `finetune.plan` call that plans `setup`: the recipe values it changes as dotted overrides."""
    changed = {}
    if setup.quantization != old.quantization:
        changed["quantization"] = setup.quantization
        changed["launch"] = "recipes/accelerate/single.yaml" if setup.world == 1 else "recipes/accelerate/ddp.yaml"
    if setup.expert_parallel != old.expert_parallel:
        changed["expert_parallel"] = setup.expert_parallel
        changed["launch"] = "recipes/accelerate/ep8.yaml" if setup.nodes == 1 else "recipes/accelerate/ep_multinode.yaml"
    if setup.max_length != old.max_length:
        changed["data.max_length"] = setup.max_length
    if setup.micro_batch != old.micro_batch:
        changed["train.per_device_train_batch_size"] = setup.micro_batch
        changed["train.gradient_accumulation_steps"] = setup.accumulation
    overrides = [o for o in args.overrides if o.split("=")[0] not in changed]
    overrides += [f"{key}={value}" for key, value in changed.items()]
    flags = ["--gpus", setup.gpus, "--nodes", setup.nodes, "--zero", setup.stage,
             "--offload" if setup.offload_parameters else "--no-offload", "--gpu-memory", f"{args.gpu_memory:g}"]
    if args.device != "gpu":
        flags += ["--device", args.device]
    return " ".join(["python -m finetune.plan", args.recipe, *overrides, *map(str, flags)])


def changes(old: Setup, new: Setup) -> str:
    said = []
    if new.world != old.world:
        said.append(f"{new.world} devices ({new.nodes} node(s) x {new.gpus})")
    if new.quantization != old.quantization:
        said.append(f"a 4-bit base (quantization={new.quantization}, a whole copy per GPU, no DeepSpeed; "
                    "recipes/sft_qlora.yaml)")
    elif new.expert_parallel != old.expert_parallel:
        said.append(f"expert parallelism over {new.expert_parallel} GPUs, no ZeRO (expert_parallel={new.expert_parallel}, "
                    "recipes/accelerate/ep8.yaml)")
    elif (new.stage, new.offload_parameters) != (old.stage, old.offload_parameters):
        said.append("ZeRO-3 with optimizer and parameters offloaded to CPU (recipes/accelerate/zero3_offload.yaml)"
                    if new.offload_parameters else f"ZeRO-{new.stage} (recipes/accelerate/zero3.yaml)")
    if new.micro_batch != old.micro_batch:
        said.append(f"micro-batch {new.micro_batch} with {new.accumulation} accumulation steps (same global batch)")
    if new.max_length != old.max_length:
        said.append(f"data.max_length {new.max_length}")
    return " + ".join(said)


def render_suggestions(args, setup: Setup, planned: dict[Setup, Plan], device_word: str) -> str:
    if not planned:
        return (f"nothing within {MAX_NODES} nodes, ZeRO-3 with offload, micro-batch 1 and data.max_length 256 "
                f"fits in {args.gpu_memory:g} GiB per {device_word}")
    lines = ["nearest setups that fit:"]
    for new, plan in planned.items():
        cpu = f", {plan.cpu_bytes_per_node / GIB:.0f} GiB CPU memory per node" if plan.cpu_bytes_per_node else ""
        lines += [f"  - {changes(setup, new)}: {plan.total / GIB:.2f} GiB per {device_word}{cpu}",
                  f"      {plan_command(args, setup, new)}"]
    return "\n".join(lines)


