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
`train.label_smoothing`) plus the same router losses as SFT, added the same way (finetune/moe_trainer.py).
"""

from __future__ import annotations

import functools
import sys

from trl import DPOTrainer

from finetune.config import Recipe
from finetune.lm_head import use_compact_lm_head
from finetune.model import apply_method, load_base_model, use_expert_kernel
from finetune.moe_trainer import MoETrainerMixin
from finetune.runs import TrainingPass

REFERENCE_ADAPTER = "ref"


class MoEDPOTrainer(MoETrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on our exact token ids, plus the router losses, router health and throughput of
    finetune/moe_trainer.py (the DPO loss itself logged as `dpo_loss`)."""

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
        # finetune.data already produced prompt_ids / chosen_ids / rejected_ids exactly as mistral_common
        # would; TRL's re-tokenization through the transformers tokenizer is not SentencePiece-exact.
        return dataset


def load_policy(recipe: Recipe):
    """Base + SFT adapter as the trainable policy (TRL adds the frozen reference copy). The adapter was
    checked before loading (finetune.model.check_sft_adapter)."""
    base = load_base_model(recipe)
    if recipe.dpo.sft_adapter is None:
        return apply_method(base, recipe)
    from peft import PeftModel

    return use_expert_kernel(PeftModel.from_pretrained(base, recipe.dpo.sft_adapter, is_trainable=True), recipe)


DPO = TrainingPass("dpo", MoEDPOTrainer, load_policy, __doc__.split("\n")[0])
build, main = DPO.build, DPO.main  # recipe -> (trainer, encoder); the command line


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
