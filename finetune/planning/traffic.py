"""What each device sends per micro-step, by collective, and how long that takes at a stated link speed
(`finetune plan`): ZeRO-3's parameter gathers next to expert parallelism's all-to-alls.

Per micro-step of `tokens` = micro-batch x max_length on each device, N devices sharing the work:
- ZeRO-3 gathers every parameter twice (forward, then backward with its checkpointed recompute), receiving
  the (N-1)/N of each it does not hold: 2 x params x bytes x (N-1)/N (once for a model small enough to stay
  gathered, under stage3_max_reuse_distance); and reduce-scatters the trained gradients: trainable x bytes x
  (N-1)/N.
- Expert parallelism (EP=N, finetune/moe/expert_parallel.py) sends each routed row to its expert's device
  and back, forward, in the checkpointed recompute and in backward: 6 all-to-alls per layer, each of
  tokens x top-k x hidden x bytes, of which (N-1)/N leaves the device when routing is balanced. Dense
  gradients are all-reduced once per optimizer step (DDP), about 2 x (N-1)/N of their bytes, shared here over
  the accumulation steps.
`benchmarks/ep_traffic.py` measures the same collectives on 2 CPU processes and compares the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

NVLINK_BYTES_PER_S = 450e9  # one direction per GPU, NVLink 4 (H100 SXM: 900 GB/s both ways)
NODE_LINK_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand NIC per GPU, between nodes
CHECKPOINTED_ALL_TO_ALLS = 6  # per layer per micro-step: dispatch + combine, forward, recompute and backward


@dataclass(frozen=True)
class Traffic:
    """Bytes one device sends per micro-step, by collective, and the link they cross."""

    rows: tuple[tuple[str, float], ...]
    link_bytes_per_s: float
    link: str

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def seconds(self) -> float:
        return self.total / self.link_bytes_per_s


def link_for(devices_spanned: int, gpus_per_node: int) -> tuple[float, str]:
    """The slowest link a collective over `devices_spanned` consecutive devices crosses."""
    if devices_spanned <= gpus_per_node:
        return NVLINK_BYTES_PER_S, f"NVLink {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s"
    return NODE_LINK_BYTES_PER_S, f"between nodes {NODE_LINK_BYTES_PER_S / 1e9:.0f} GB/s"


def zero3_traffic(total_params: int, trainable: int, world: int, gpus_per_node: int, weight_bytes: int,
                  max_reuse_distance: float = 1e9) -> Traffic:
    share = (world - 1) / world
    # A model within stage3_max_reuse_distance keeps what the forward gathered for its backward (the memory
    # plan's "kept for reuse" row); a larger one, Mixtral's, is gathered again.
    gathers, when = (1, "once, kept for backward") if max_reuse_distance >= total_params else (2, "forward and backward")
    rows = ((f"ZeRO-3 all-gather of every parameter, {when}", gathers * total_params * weight_bytes * share),
            ("ZeRO-3 reduce-scatter of the trained gradients", trainable * weight_bytes * share))
    return Traffic(rows, *link_for(world, gpus_per_node))


def expert_parallel_traffic(config, tokens: int, ep: int, dense_trainable: int, accumulation: int, world: int,
                            gpus_per_node: int, weight_bytes: int) -> Traffic:
    routed = tokens * config.num_experts_per_tok * config.hidden_size * weight_bytes
    sent = CHECKPOINTED_ALL_TO_ALLS * config.num_hidden_layers * routed * (ep - 1) / ep
    dense = 2 * dense_trainable * 4 * (world - 1) / world / accumulation  # fp32 gradients, ring all-reduce
    rows = ((f"EP all-to-all of routed rows ({CHECKPOINTED_ALL_TO_ALLS} per layer)", sent),
            ("DDP all-reduce of the other trained gradients (per step / accumulation)", dense))
    return Traffic(rows, *link_for(ep, gpus_per_node))


def render_traffic(traffic: Traffic, other: Traffic | None = None, other_name: str = "") -> list[str]:
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                       if traffic.total >= s or s == 1)
    lines = [f"sent per device per micro-step{'':<35} {unit}"]
    lines += [f"  {what:<72} {size / scale:8.2f}" for what, size in traffic.rows]
    lines.append(f"  {'total':<72} {traffic.total / scale:8.2f}  = {traffic.seconds * 1e3:,.3g} ms at {traffic.link}")
    if other is not None:
        ratio = other.total / traffic.total
        compared = f"{ratio:.1f}x the bytes" if ratio >= 1 else f"{1 / ratio:.1f}x fewer bytes"
        lines.append(f"  {other_name}: {other.total / scale:.2f} {unit} = {other.seconds * 1e3:,.3g} ms at {other.link} "
                     f"({compared})")
    return lines


def expert_parallel_sizes(experts: int, gpus_per_node: int, world: int) -> list[int]:
    """The EP sizes a setup offers a model, smallest first: above 1, dividing its experts and the processes, and
    within one node (the all-to-all stays on NVLink)."""
    return [n for n in range(2, min(experts, gpus_per_node) + 1) if experts % n == 0 and world % n == 0]


def traffic_lines(config, counts, setup, weight_bytes: int) -> list[str]:
    """The current setup's traffic and, for an MoE under ZeRO-3 or EP, the other one's beside it."""
    if setup.world == 1:
        return []
    tokens = setup.micro_batch * setup.max_length
    dense_trainable = counts.trainable - counts.trainable_experts
    zero3 = zero3_traffic(counts.total, counts.trainable, setup.world, setup.gpus, weight_bytes,
                          setup.max_reuse_distance)
    if setup.expert_parallel > 1:
        ep = expert_parallel_traffic(config, tokens, setup.expert_parallel, dense_trainable, setup.accumulation,
                                     setup.world, setup.gpus, weight_bytes)
        return render_traffic(ep, zero3, "ZeRO-3 on the same devices instead")
    if setup.stage != 3:
        return []
    sizes = expert_parallel_sizes(config.num_local_experts, setup.gpus, setup.world)
    if not sizes:
        return render_traffic(zero3)
    size = sizes[-1]
    ep = expert_parallel_traffic(config, tokens, size, dense_trainable, setup.accumulation, setup.world, setup.gpus,
                                 weight_bytes)
    return render_traffic(zero3, ep, f"expert_parallel={size} instead")
