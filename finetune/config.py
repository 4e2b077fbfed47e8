"""Typed recipes: a YAML file plus dotted command-line overrides become dataclasses.

    python -m finetune.sft recipes/tiny/sft.yaml model=path/to/dir train.max_steps=3

Every field below is documented once, here. The `lora` and `train` sections also accept the fields of
PEFT's `LoraConfig` and TRL's `SFTConfig` / `DPOConfig` by their own names; they are checked against
those classes (name and type) instead of being declared again. Unknown keys, wrong types and
impossible combinations raise `RecipeError` naming the recipe file and the key, before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import InputError
from finetune.redaction import is_secret_key, redact, secret_values
from finetune.typed_yaml import (
    build_dataclass,
    describe,
    enum_choices,
    parse_yaml,
    read_yaml_mapping,
    safe_type_hints,
    type_matches,
)

SECRET_FIX = ("recipes are copied into every output and pushed to the Hub, so remove it and use "
              "`huggingface-cli login` or the HF_TOKEN environment variable instead")


class RecipeError(InputError):
    """A recipe that cannot run; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------
# Sections


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
class DataConfig:
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
    """Which parameter groups train, and how. Any other key here is a `peft.LoraConfig` field
    (`r`, `lora_alpha`, `lora_dropout`, `use_rslora`, ...)."""

    method: Literal["lora", "full"] = "lora"
    """`lora`: adapters on the chosen groups, base frozen. `full`: every chosen group's weights train
    (small models only)."""
    targets: list[Literal["attention", "experts", "router"]] = field(
        default_factory=lambda: ["attention", "experts", "router"]
    )
    """Groups that train: attention q/k/v/o projections, the fused expert weights
    (gate_up_proj, down_proj), the router (mlp.gate, trained in full: it is small)."""
    expert_kernel: Literal["routed", "peft"] = "routed"
    """How expert LoRA runs. `routed`: on the tokens routed to each expert (finetune/expert_lora.py),
    PEFT's parameters and format; `peft`: PEFT's own path, which rebuilds every expert's weight each
    forward. Same numbers either way."""
    peft: dict[str, Any] = field(default_factory=dict)
    """The `LoraConfig` fields given in this section (filled by the parser)."""


@dataclass
class MoEConfig:
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


@dataclass
class Recipe:
    """A whole recipe; `kind` says which pass it is for."""

    model: str
    """Base model: Hub id (`mistralai/Mixtral-8x7B-v0.1`) or local folder."""
    output_dir: str
    """Where the adapter, tokenizer, resolved recipe and logs are written."""
    data: DataConfig
    quantization: Literal["none", "nf4"] = "none"
    """`nf4`: load the base in 4-bit (QLoRA) so Mixtral 8x7B trains on one GPU (finetune.plan says which):
    attention through bitsandbytes, each expert's weights NF4 per expert, dequantized one expert at a time
    (finetune/nf4.py); router, norms, embeddings and LM head in the training dtype. LoRA only (the adapter
    is a plain PEFT adapter of the unquantized base, and export merges into that base); one whole 4-bit
    copy per process (plain data parallel, no DeepSpeed). Needs `pip install -e ".[qlora]"`."""
    sequence_parallel: int = 1
    """Split each row's tokens across this many processes (DeepSpeed Ulysses, through accelerate's
    ParallelismConfig): for samples longer than one GPU holds. Attention exchanges heads for tokens, so the
    model's query heads must divide by it (Mixtral's 32: 2, 4, 8); the processes must divide by it too.
    SFT under a DeepSpeed launch only."""
    kind: Literal["sft", "dpo"] = "sft"
    """Which pass the recipe is for; `python -m finetune.sft` refuses a `dpo` recipe and vice versa."""
    tokenizer: str | None = None
    """Folder or file holding `tokenizer.model` (SentencePiece). None: the model folder's, else the
    Mixtral v1 tokenizer bundled with `mistral-common`."""
    lora: LoraSection = field(default_factory=LoraSection)
    moe: MoEConfig = field(default_factory=MoEConfig)
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
OWNED_LORA_KEYS = {
    "target_modules": "lora.targets",
    "target_parameters": "lora.targets",
    "modules_to_save": "lora.targets",
    "task_type": "nothing: it is always CAUSAL_LM",
}


# ----------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] = (), expect_kind: str | None = None) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides, build and validate the Recipe."""
    path = Path(path)
    raw = read_yaml_mapping(path, overrides, "recipe", RecipeError)
    if "source" in raw:
        raise RecipeError(f"{path}: unknown key 'source'")
    _refuse_secret_values(raw, path, "", secret_values())
    raw["source"] = str(path)
    collect = {LoraSection: ("peft", _lora_fields)}
    recipe = build_dataclass(Recipe, raw, str(path), "", RecipeError, collect)
    if expect_kind is not None and recipe.kind != expect_kind:
        raise RecipeError(
            f"{path}: this is a {recipe.kind!r} recipe (key 'kind'); run it with python -m finetune.{recipe.kind}"
        )
    validate(recipe)
    return recipe


def _refuse_secret_values(node: Any, path: Path, key: str, secrets: list[str]) -> None:
    """A value that is (or holds) a token would be copied into every output: refuse it, naming the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_secret_values(v, path, f"{key}.{k}" if key else str(k), secrets)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_secret_values(v, path, f"{key}[{i}]", secrets)
    elif isinstance(node, str) and redact(node, secrets) != node:
        raise RecipeError(f"{path}: {key} holds what looks like a secret (a Hub token, or the value of HF_TOKEN / "
                          f"WANDB_API_KEY); {SECRET_FIX}")


def _lora_fields(extra: dict, source: str, prefix: str) -> dict:
    """The `lora` section's LoraConfig fields; null unsets a key (an override can drop `r` for full)."""
    extra = {k: v for k, v in extra.items() if v is not None}
    return _check_foreign(extra, _lora_config_class(), OWNED_LORA_KEYS, source, prefix)


def _check_foreign(values: dict, config_cls, owned: dict, source: str, prefix: str) -> dict:
    """Check keys destined for a library config class (LoraConfig, SFTConfig) by name and type."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = safe_type_hints(config_cls)
    for key, value in values.items():
        if key in owned:
            raise RecipeError(f"{source}: {prefix}{key} is set by the recipe itself; use {owned[key]}")
        if is_secret_key(key):
            raise RecipeError(f"{source}: {prefix}{key} holds a secret; {SECRET_FIX}")
        if key not in fields or not fields[key].init:
            raise RecipeError(
                f"{source}: unknown key {prefix + key!r} (not a recipe field and not a "
                f"{config_cls.__name__} field)"
            )
        annotation = hints.get(key, Any)
        if not type_matches(value, annotation):
            raise RecipeError(f"{source}: {prefix}{key} must be {describe(annotation)}, got {value!r}")
        choices = enum_choices(annotation)
        if choices and isinstance(value, str) and value not in choices:
            raise RecipeError(f"{source}: {prefix}{key} must be one of {', '.join(choices)}, got {value!r}")
    return dict(values)


def _lora_config_class():
    from peft import LoraConfig

    return LoraConfig


def trainer_config_class(kind: str):
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import SFTConfig

    return SFTConfig


# ----------------------------------------------------------------------------------------------
# Validation of combinations


def validate(recipe: Recipe) -> None:
    src = recipe.source
    _check_foreign(recipe.train, trainer_config_class(recipe.kind), OWNED_TRAIN_KEYS, src, "train.")
    data = recipe.data
    if not data.train:
        raise RecipeError(f"{src}: data.train must name at least one source")
    for group in ("train", "eval"):
        for i, s in enumerate(getattr(data, group)):
            if s.weight <= 0:
                raise RecipeError(f"{src}: data.{group}[{i}].weight must be > 0, got {s.weight}")
    if not 0 <= data.eval_fraction < 1:
        raise RecipeError(f"{src}: data.eval_fraction must be in [0, 1), got {data.eval_fraction}")
    if data.num_proc is not None and data.num_proc < 1:
        raise RecipeError(f"{src}: data.num_proc must be >= 1 (or left out for automatic), got {data.num_proc}")
    if data.max_length < 8:
        raise RecipeError(f"{src}: data.max_length must be at least 8 tokens, got {data.max_length}")
    if data.packing and recipe.kind == "dpo":
        raise RecipeError(f"{src}: data.packing is for SFT only; DPO keeps each pair whole")
    lora = recipe.lora
    if not lora.targets:
        raise RecipeError(f"{src}: lora.targets is empty: nothing would train")
    if len(set(lora.targets)) != len(lora.targets):
        raise RecipeError(f"{src}: lora.targets lists a group twice: {lora.targets}")
    if lora.method == "full" and lora.peft:
        key = next(iter(lora.peft))
        raise RecipeError(f"{src}: lora.{key} has no meaning with lora.method: full")
    if lora.method == "lora":
        for key in ("r", "lora_alpha"):
            if key in lora.peft and lora.peft[key] <= 0:
                raise RecipeError(f"{src}: lora.{key} must be > 0, got {lora.peft[key]}")
        dropout = lora.peft.get("lora_dropout", 0.0)
        if "experts" in lora.targets and dropout:
            raise RecipeError(
                f"{src}: lora.lora_dropout={dropout} is impossible with 'experts' in lora.targets: "
                "PEFT's LoRA on fused expert parameters (target_parameters) has no dropout. "
                "Set lora.lora_dropout: 0 or drop 'experts' from lora.targets."
            )
        for key in ("use_dora", "lora_bias"):
            if "experts" in lora.targets and lora.peft.get(key):
                raise RecipeError(f"{src}: lora.{key} is not supported on fused expert parameters")
    for key in ("aux_loss_coef", "z_loss_coef"):
        if getattr(recipe.moe, key) < 0:
            raise RecipeError(f"{src}: moe.{key} must be >= 0, got {getattr(recipe.moe, key)}")
    if recipe.hub.repo_id is not None and recipe.hub.repo_id.count("/") != 1:
        raise RecipeError(f"{src}: hub.repo_id must look like ORG/NAME, got {recipe.hub.repo_id!r}")
    if recipe.launch is not None and not Path(recipe.launch).is_file():
        raise RecipeError(f"{src}: launch={recipe.launch!r}: no such accelerate config")
    if recipe.stop_after_steps is not None and recipe.stop_after_steps < 1:
        raise RecipeError(f"{src}: stop_after_steps must be >= 1, got {recipe.stop_after_steps}")
    if recipe.kind == "sft" and recipe.dpo.sft_adapter is not None:
        raise RecipeError(f"{src}: dpo.sft_adapter belongs in a DPO recipe")
    if recipe.quantization != "none":
        _validate_quantization(recipe)
    if recipe.sequence_parallel != 1:
        _validate_sequence_parallel(recipe)
    if recipe.kind == "dpo" and recipe.lora.method == "full":
        raise RecipeError(f"{src}: lora.method: full is not supported for DPO (the reference would be a copy)")


def _validate_quantization(recipe: Recipe) -> None:
    src, what = recipe.source, f"quantization: {recipe.quantization}"
    if recipe.lora.method == "full":
        raise RecipeError(f"{src}: {what} needs lora.method: lora (4-bit weights cannot train); "
                          "use quantization: none for full training")
    if recipe.lora.expert_kernel != "routed":
        raise RecipeError(f"{src}: {what} needs lora.expert_kernel: routed (PEFT's expert path rebuilds every "
                          "expert's 16-bit weight on each forward, which is what 4-bit is meant to avoid)")
    if recipe.launch is not None and uses_deepspeed(recipe.launch):
        raise RecipeError(f"{src}: {what} does not run under DeepSpeed (launch={recipe.launch}): ZeRO cannot "
                          "partition or broadcast the 4-bit expert stacks. Use one whole 4-bit copy per GPU: "
                          "launch: recipes/accelerate/single.yaml, or recipes/accelerate/ddp.yaml for several GPUs")


def _validate_sequence_parallel(recipe: Recipe) -> None:
    src, sp = recipe.source, recipe.sequence_parallel
    if sp < 1:
        raise RecipeError(f"{src}: sequence_parallel must be >= 1, got {sp}")
    if recipe.kind != "sft":
        raise RecipeError(f"{src}: sequence_parallel is for SFT; DPO keeps each pair whole on one process")
    if recipe.launch is None:  # `accelerate launch` itself may bring DeepSpeed: checked at preflight
        return
    if not uses_deepspeed(recipe.launch):
        raise RecipeError(f"{src}: sequence_parallel: {sp} runs under DeepSpeed (Ulysses); set launch to a DeepSpeed "
                          f"config, e.g. recipes/accelerate/zero3.yaml (launch={recipe.launch})")
    processes = parse_yaml(Path(recipe.launch).read_text()).get("num_processes", 1)
    if processes % sp:
        raise RecipeError(f"{src}: sequence_parallel: {sp} must divide the processes of {recipe.launch} "
                          f"(num_processes: {processes})")


def uses_deepspeed(launch: str | Path) -> bool:
    """Whether an accelerate config runs DeepSpeed."""
    config = parse_yaml(Path(launch).read_text())
    if not isinstance(config, dict):
        return False
    return str(config.get("distributed_type", "")).upper() == "DEEPSPEED" or bool(config.get("deepspeed_config"))


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (what gets written next to the adapter)."""
    out = dataclasses.asdict(recipe)
    peft_keys = out["lora"].pop("peft")
    out["lora"].update(peft_keys)
    out.pop("source")
    if recipe.kind == "sft":
        out.pop("dpo")
    return out


def dump_yaml(recipe: Recipe, path: str | Path) -> None:
    header = f"# Resolved {recipe.kind.upper()} recipe (from {recipe.source}, overrides applied).\n"
    Path(path).write_text(redact(header + yaml.safe_dump(to_dict(recipe), sort_keys=False)))
