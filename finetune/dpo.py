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
`train.label_smoothing`) plus the same router losses as SFT, added the same way (finetune/moe.py).
"""

from __future__ import annotations

import functools
import sys

from transformers import set_seed
from trl import DPOTrainer

from finetune.chat_format import ChatEncoder
from finetune.check import encoder_for
from finetune.config import Recipe
from finetune.losses import use_compact_lm_head
from finetune.model import apply_method, load_base_model, use_expert_kernel
from finetune.runs import (
    RouterLossHook,
    Throughput,
    announce,
    load_data,
    run_pass,
    trainer_args,
    trainer_inputs,
)

REFERENCE_ADAPTER = "ref"


class MoEDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on our exact token ids, plus the router losses of finetune.moe and throughput."""

    def __init__(self, *args, moe, **kwargs):
        super().__init__(*args, **kwargs)
        for name, param in self.model.named_parameters():  # TRL's copy of the SFT adapter never trains
            if f".{REFERENCE_ADAPTER}." in name:
                param.requires_grad_(False)
        use_compact_lm_head(self.model)
        self.router_loss = RouterLossHook(self.model, moe)
        self.throughput = Throughput()

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
        # finetune.data already produced prompt_ids / chosen_ids / rejected_ids exactly as mistral_common
        # would; TRL's re-tokenization through the transformers tokenizer is not SentencePiece-exact.
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.router_loss.tap.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self.router_loss.add(
            self, loss, inputs.get("attention_mask"), num_items_in_batch, log_task_loss_as="dpo_loss"
        )
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs, start_time=None):
        logs = self.router_loss.add_router_stats(logs, "train" if self.model.training else "eval",
                                                   self.state.global_step)
        super().log(self.throughput.update(logs, self.state.global_step, self._total_train_tokens), start_time)


def load_policy(recipe: Recipe):
    """Base + SFT adapter as the trainable policy (TRL adds the frozen reference copy). The adapter was
    checked before loading (finetune.model.check_sft_adapter)."""
    base = load_base_model(recipe)
    if recipe.dpo.sft_adapter is None:
        return apply_method(base, recipe)
    from peft import PeftModel

    return use_expert_kernel(PeftModel.from_pretrained(base, recipe.dpo.sft_adapter, is_trainable=True), recipe)


def build(recipe: Recipe) -> tuple[MoEDPOTrainer, ChatEncoder]:
    """Recipe -> data -> model -> trainer, printing what will train."""
    args = trainer_args(recipe)

    # Data: Mixtral-Instruct prompt ids and reply ids (each reply ends with EOS).
    encoder = encoder_for(recipe)
    data = load_data(recipe, args, encoder)

    # Model: policy and reference both start as the SFT policy. Seeded first: PEFT draws the LoRA
    # initialisation of a fresh adapter from the global RNG.
    set_seed(args.seed)
    model = load_policy(recipe)
    announce(model, recipe, args, data)
    trainer = MoEDPOTrainer(model=model, args=args, **trainer_inputs(recipe, data, encoder))
    return trainer, encoder


def main(argv: list[str] | None = None) -> int:
    return run_pass("dpo", build, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
