"""Direct Preference Optimisation from the SFT adapter: the second half of Mixtral-Instruct.

    python -m finetune.dpo recipes/tiny/dpo.yaml [key.sub=value ...]
    accelerate launch -m finetune.dpo recipes/dpo.yaml

Start point and reference: the base model is loaded once with the SFT adapter (`dpo.sft_adapter`) as the
trainable policy adapter (`default`); TRL's DPOTrainer copies it into a frozen `ref` adapter that it
uses for the reference forward. So the policy starts as the SFT policy, the reference IS the SFT policy
(never the raw base), at step 0 the loss is exactly ln 2, there is one copy of the base weights,
nothing is merged (ZeRO-3 partitions stay valid), and the result is one adapter on the base.
Without `dpo.sft_adapter`, `model` itself must be the SFT policy (e.g. merged) and a fresh adapter
trains on it, the adapter-free model being the reference. `train.precompute_ref_log_probs: true`
computes the reference log-probs once before training.

The loss is TRL's DPO loss (`train.loss_type`: sigmoid, ipo, hinge, robust, ...; `train.beta`,
`train.label_smoothing`) plus the same router losses as SFT, added the same way (finetune/train/trainer.py).
"""

from __future__ import annotations

import functools
import sys

import torch
from transformers import set_seed
from trl import DPOTrainer

from finetune.cli import invoked_as
from finetune.data.encoders import encoder_for
from finetune.errors import CheckFailed
from finetune.model.lm_head import use_compact_lm_head
from finetune.model.loading import load_base_model
from finetune.model.lora_targets import make_trainable, select_expert_kernel
from finetune.recipe.schema import Recipe
from finetune.train.arguments import trainer_args
from finetune.train.checkpoints import resume_checkpoint
from finetune.train.launch import is_main_process, prepare_for_launch, relaunch_with_accelerate, should_relaunch
from finetune.train.outputs import push_outputs, save_outputs
from finetune.train.preflight import preflight
from finetune.train.run_folder import already_complete
from finetune.train.steps import announce, load_data, recipe_from_command_line, train, trainer_inputs
from finetune.train.trainer import MoETrainerMixin

REFERENCE_ADAPTER = "ref"


class MoEDPOTrainer(MoETrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on our exact token ids, plus the router losses, router health and throughput of
    finetune/train/trainer.py (the DPO loss itself logged as `dpo_loss`)."""

    task_loss_name = "dpo_loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, param in self.model.named_parameters():  # TRL's copy of the SFT adapter never trains
            if f".{REFERENCE_ADAPTER}." in name:
                param.requires_grad_(False)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        use_compact_lm_head(self.model)  # TRL precomputes inside __init__, after patching its own head
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _save(self, output_dir=None, state_dict=None):
        # Save the policy adapter only: the reference is the SFT adapter the recipe names. (Under ZeRO-3 the
        # gathered state dict holds the trainable parameters only, so PEFT could not save the frozen copy.)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=["default"])
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # finetune/data/rows.py already produced prompt_ids / chosen_ids / rejected_ids exactly as
        # mistral_common would; TRL's re-tokenization through the transformers tokenizer is not SentencePiece-exact.
        return dataset


def load_policy(recipe: Recipe):
    """Base + SFT adapter as the trainable policy (TRL adds the frozen reference copy); without
    `dpo.sft_adapter`, a fresh adapter on `model`. The adapter was checked at preflight."""
    base = load_base_model(recipe)
    if recipe.dpo.sft_adapter is None:
        return make_trainable(base, recipe)
    from peft import PeftModel

    return select_expert_kernel(PeftModel.from_pretrained(base, recipe.dpo.sft_adapter, is_trainable=True), recipe)


def reference_for(recipe: Recipe) -> str:
    """What the DPO reference is, in words: the SFT policy, never the raw base."""
    if recipe.dpo.sft_adapter is None:
        return f"{recipe.model} itself (the model without the fresh adapter, which starts at zero)"
    return f"the SFT policy {recipe.dpo.sft_adapter} (a frozen copy of the adapter the policy starts from)"


def check_reference(trainer, recipe: Recipe, reference: str) -> None:
    """After the trainer is built, before any step: with `dpo.sft_adapter`, TRL must have copied the policy adapter
    into a frozen `ref` adapter, so the reference is the SFT policy and the first loss ln 2. Some TRL / PEFT
    versions skip the copy and silently use the adapter-disabled base instead: refuse that here, by name."""
    if trainer.is_world_process_zero():
        print(f"reference: {reference}")
    if recipe.dpo.sft_adapter is None:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        raise CheckFailed(f"{recipe.source}: TRL made no frozen '{REFERENCE_ADAPTER}' copy of the SFT adapter "
                          f"{recipe.dpo.sft_adapter}, so its reference would be the base model, not the SFT policy; "
                          "use the trl and peft versions pinned in pyproject.toml")
    parameters = dict(model.named_parameters())
    for name, param in parameters.items():
        if ".default." in name:
            copy = parameters.get(name.replace(".default.", f".{REFERENCE_ADAPTER}."))
            if copy is None or not torch.equal(copy, param.to(copy.dtype)):  # the policy's may be fp32 masters
                raise CheckFailed(f"{recipe.source}: the reference adapter differs from the SFT policy at {name}")


def build(recipe: Recipe, args=None):
    """Data, policy and trainer for a DPO recipe: (trainer, encoder). `args`: its TRL arguments, when built."""
    args = args or trainer_args(recipe)
    # Data: prompt, chosen and rejected ids exactly as mistral_common encodes them; pairs are never packed.
    encoder = encoder_for(recipe)
    pairs = load_data(recipe, args, encoder)
    # Policy = reference = the SFT policy at step 0 (TRL copies the adapter), so the first loss is ln 2.
    set_seed(args.seed)
    policy = prepare_for_launch(load_policy(recipe), recipe)
    announce(policy, recipe, args, pairs)
    trainer = MoEDPOTrainer(model=policy, args=args, **trainer_inputs(recipe, pairs, encoder))
    return trainer, encoder


def main(argv: list[str] | None = None) -> int:
    # Recipe, and everything refused before any weight loads (output folder, model config, the SFT adapter).
    recipe, command = recipe_from_command_line(invoked_as("dpo"), "dpo", __doc__, argv)
    args = preflight(recipe)
    # Under the recipe's `launch` file, unless already launched: the child runs the steps below.
    if should_relaunch(recipe):
        return relaunch_with_accelerate(recipe, command.recipe, command.overrides)
    reference = reference_for(recipe)
    # The same command after a finished run changes nothing.
    if already_complete(recipe):
        return 0
    # Resume: the newest complete checkpoint of this same run, if output_dir holds one.
    resume_from = resume_checkpoint(recipe, is_main_process())
    trainer, encoder = build(recipe, args)
    # Reference: TRL's frozen copy of the SFT adapter, never the raw base (checked before any step).
    check_reference(trainer, recipe, reference)
    interrupted = train(trainer, recipe, resume_from)
    if interrupted:
        return interrupted
    save_outputs(trainer, recipe, encoder)  # the policy adapter only, tokenizer, recipe, log, model card
    return push_outputs(recipe, trainer.is_world_process_zero())


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
