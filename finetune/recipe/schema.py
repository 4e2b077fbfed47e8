"""What a recipe is: one typed dataclass per section, every field documented once, here.

    python -m finetune.sft recipes/tiny/sft.yaml model=path/to/dir train.max_steps=3

A YAML file plus dotted command-line overrides become a `Recipe` (finetune/recipe/loading.py). The `lora`
and `train` sections also accept the fields of PEFT's `LoraConfig` and TRL's `SFTConfig` / `DPOConfig` by
their own names; those are checked against the library classes (name and type) instead of being declared
again here. The keys of those classes that the recipe sets itself are listed below with the key to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.errors import InputError


class RecipeError(InputError):
    """A recipe that cannot run; the message names the file and the key."""


@dataclass
class DataSource:
    """One dataset file or Hub dataset."""

    path: str
    """Local .jsonl / .json / .parquet file (relative to the working directory) or a Hub dataset name."""
    split: str = "train"
    """Split to read from a Hub dataset (ignored for local files)."""
    subset: str | None = None
    """Hub dataset configuration name, if it has several."""
    weight: float = 1.0
    """Share of this source in the mix: rows used = round(weight * rows). 0.5 takes a seeded half,
    2.0 repeats every row twice."""


@dataclass
class DataSection:
    """Where the conversations or preference pairs come from and how they become samples."""

    train: list[DataSource]
    """Training sources, mixed by their weights."""
    eval: list[DataSource] = field(default_factory=list)
    """Held-out sources. When empty, `eval_fraction` of the training mix is split off instead."""
    eval_fraction: float = 0.05
    """Fraction of the training mix held out for evaluation when `eval` is empty (0 = no eval)."""
    max_length: int = 2048
    """Longest sample in tokens. Longer samples are bad rows: never silently truncated."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error`: stop and list the bad rows. `skip`: drop them and report how many and why."""
    packing: bool = False
    """Pack several samples into one row of `max_length` tokens (SFT only)."""
    seed: int = 0
    """Seed for mixing, sub-sampling and the eval split."""
    cache_dir: str | None = None
    """Where tokenized data is kept (Arrow, memory-mapped by every rank), so a rerun, a resume or a second
    process reads it instead of tokenizing again. Default: `$MIXTRAL_FINETUNE_CACHE`, else
    `~/.cache/mixtral-finetune/data`. Use a folder every process of a node can read."""
    num_proc: int | None = None
    """Processes that tokenize (datasets' `map`). Default: one per 2000 rows, at most 8 and the CPU count."""


@dataclass
class LoraSection:
    """How LoRA runs (with `method: lora`). Any other key here is a `peft.LoraConfig` field (`r`, `lora_alpha`,
    `lora_dropout`, `use_rslora`, ...)."""

    expert_kernel: Literal["routed", "peft"] = "routed"
    """How expert LoRA runs. `routed`: on the tokens routed to each expert (finetune/moe/expert_lora.py),
    PEFT's parameters and format; `peft`: PEFT's own path, which rebuilds every expert's weight each
    forward. Same numbers either way."""
    peft: dict[str, Any] = field(default_factory=dict)
    """The `LoraConfig` fields given in this section (filled by the parser)."""


@dataclass
class MoESection:
    """Auxiliary router losses."""

    aux_loss_coef: float = 0.02
    """Weight of the Switch-Transformer load-balancing loss (Mixtral's default 0.02; 0 turns it off)."""
    z_loss_coef: float = 0.0
    """Weight of the ST-MoE router z-loss, mean of logsumexp(router logits)^2 (0 = off)."""


@dataclass
class DPOSection:
    """Where DPO starts."""

    sft_adapter: str | None = None
    """Folder of the SFT LoRA adapter the policy and the reference start from (None: start from
    `model` itself, e.g. an already merged SFT model)."""


@dataclass
class HubSection:
    """Push the output folder to the Hugging Face Hub at the end of the pass (main process only)."""

    repo_id: str | None = None
    """ORG/NAME to push to; None: no push."""
    private: bool = False
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push to (created if missing); None: main."""
    base_id: str | None = None
    """The base model's Hub id, written into the pushed adapter_config.json when `model` is a local folder (the
    pushed adapter must name a base that loads anywhere; the local copy keeps the folder, for resume and export)."""


@dataclass
class Recipe:
    """A whole recipe; `kind` says which pass it is for."""

    model: str
    """Base model: Hub id (`mistralai/Mixtral-8x7B-v0.1`) or local folder."""
    output_dir: str
    """Where the adapter, tokenizer, resolved recipe and logs are written."""
    data: DataSection
    quantization: Literal["none", "nf4"] = "none"
    """`nf4`: load the base in 4-bit (QLoRA) so Mixtral 8x7B trains on one GPU (finetune.plan says which):
    attention through bitsandbytes, each expert's weights NF4 per expert, a layer's stack dequantized only while it runs
    (finetune/moe/nf4.py); router, norms, embeddings and LM head in the training dtype. LoRA only (the adapter
    is a plain PEFT adapter of the unquantized base, and export merges into that base); one whole 4-bit
    copy per process (plain data parallel, no DeepSpeed). Needs `pip install -e ".[qlora]"`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the pass trains. `auto`: the GPU when there is one (bf16 where it supports it), else the CPU in
    fp32. `cpu`: the CPU in fp32 even on a GPU machine, so a tiny recipe (and every CPU test tier) means the
    same run everywhere. `cuda`: refuse to start where there is no GPU, rather than train on the CPU."""
    attn_implementation: str = "sdpa"
    """The attention kernel (transformers' `attn_implementation`). `sdpa`: torch's, anywhere; a packed row then
    attends through a block-diagonal mask of max_length^2 bytes (finetune.plan counts it). `flash_attention_2`,
    `flash_attention_3`: flash-attention's variable-length kernels, CUDA and bf16 only, which take packed rows'
    sequence boundaries (`cu_seq_lens`) and need no mask; from the `flash-attn` package, else the `kernels`
    package's Hub build. `eager`, or a Hub kernel `org/name` (needs `kernels`). Checked before loading."""
    sequence_parallel: int = 1
    """Split each row's tokens across this many processes (DeepSpeed Ulysses, through accelerate's
    ParallelismConfig): for samples longer than one GPU holds. Attention exchanges heads for tokens, so the
    model's query heads must divide by it (Mixtral's 32: 2, 4, 8); the processes must divide by it too.
    SFT under a DeepSpeed launch only."""
    expert_parallel: int = 1
    """Split every layer's experts across this many processes (expert parallelism): each keeps E/N experts
    and the routed tokens travel to them and back (finetune/moe/expert_parallel.py), where ZeRO-3 would have
    every process gather every expert each micro-step. Runs under plain data parallel (DDP:
    recipes/accelerate/ep8.yaml for one node of 8 GPUs, ep_multinode.yaml past one node), which carries the
    attention, router and embeddings; N must divide the model's experts and the processes. SFT, with LoRA
    (the saved adapter is the one-process adapter) or full training."""
    kind: Literal["sft", "dpo"] = "sft"
    """Which pass the recipe is for; `python -m finetune.sft` refuses a `dpo` recipe and vice versa."""
    tokenizer: str | None = None
    """Folder or file holding `tokenizer.model` (SentencePiece). None: the model folder's, else the
    Mixtral tokenizer bundled with `mistral-common` of the `chat_format` named (v1 for `auto`)."""
    chat_format: Literal["auto", "v1", "v3"] = "auto"
    """The Mixtral-Instruct format conversations are encoded in. `auto` reads it from the tokenizer: v3 (Mixtral
    8x22B, control tokens for [INST], function calling, 64k) when it has `[INST]` as a control token, else v1
    (Mixtral 8x7B). Tool rows need v3. `v3` on a v1 tokenizer is refused (finetune/data/encoders.py)."""
    method: Literal["lora", "full"] = "lora"
    """`lora`: LoRA adapters on the `trainable` groups, base frozen. `full`: every `trainable` group's weights
    train (small models only)."""
    trainable: list[Literal["attention", "experts", "router"]] = field(
        default_factory=lambda: ["attention", "experts", "router"]
    )
    """Groups that train: attention q/k/v/o projections, the fused expert weights (gate_up_proj, down_proj),
    the router (mlp.gate, trained in full even with LoRA: it is E x H per layer). The router losses reach the
    router only when it is here (finetune/model/trainable_report.py warns otherwise)."""
    lora: LoraSection = field(default_factory=LoraSection)
    moe: MoESection = field(default_factory=MoESection)
    dpo: DPOSection = field(default_factory=DPOSection)
    """DPO only: start point."""
    hub: HubSection = field(default_factory=HubSection)
    train: dict[str, Any] = field(default_factory=dict)
    """TRL `SFTConfig` / `DPOConfig` fields (learning_rate, max_steps, ...), checked by name and type."""
    launch: str | None = None
    """accelerate config this recipe is meant for (recipes/accelerate/*.yaml). `python -m finetune.sft`
    relaunches itself under `accelerate launch` with it; `finetune.plan` reads its ZeRO stage."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in output_dir if it belongs to the same recipe
    (refuse if the recipe changed); `never`: start a fresh run (refused where checkpoints of an earlier
    run exist, so they never resurface later); `restart`: delete those checkpoints and start over; or a
    checkpoint folder to continue from."""
    stop_after_steps: int | None = None
    """Stop cleanly (with a checkpoint) after this many optimizer steps, as if interrupted; the schedule
    still follows train.max_steps. For time-limited jobs: run again to continue."""
    source: str = ""
    """The recipe file this came from (for messages; set by the parser)."""


# Keys of the foreign config classes that the recipe owns elsewhere, with the key to use instead.
OWNED_TRAIN_KEYS = {
    "output_dir": "output_dir",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "router_aux_loss_coef": "moe.aux_loss_coef",
    "assistant_only_loss": "nothing: SFT always trains on the assistant replies only",
    "completion_only_loss": "nothing: SFT always trains on the assistant replies only",
    "dataset_text_field": "nothing: samples are built by finetune.data",
    "truncation_mode": "data.max_length (longer samples are bad rows, never truncated)",
    "chat_template_path": "nothing: the Mixtral-Instruct template is built in",
    "pad_token": "nothing: pad is <unk>, never EOS",
    "eos_token": "nothing: EOS comes from the tokenizer",
    "resume_from_checkpoint": "resume",
    "push_to_hub": "hub.repo_id",
    "parallelism_config": "sequence_parallel",
    "hub_model_id": "hub.repo_id",
}
# Keys that may differ between an interrupted run and the run that continues it.
RUN_CONTROL_KEYS = ("resume", "stop_after_steps", "launch")
# Keys that may grow between a finished run and the run that trains it further (from its last checkpoint).
CONTINUABLE_KEYS = ("train.max_steps", "train.num_train_epochs")
OWNED_LORA_KEYS = {
    "method": "method (a top-level key: lora or full)",
    "targets": "trainable (a top-level key)",
    "target_modules": "trainable",
    "target_parameters": "trainable",
    "modules_to_save": "trainable",
    "task_type": "nothing: it is always CAUSAL_LM",
}
