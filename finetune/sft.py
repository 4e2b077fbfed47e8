"""Supervised fine-tuning of a Mixtral-style MoE model on conversations: the first half of Mixtral-Instruct.

    python -m finetune.sft recipes/tiny/sft.yaml [key.sub=value ...]
    accelerate launch -m finetune.sft recipes/sft.yaml

Writes to `output_dir`: the LoRA adapter (PEFT format), the tokenizer with the Mixtral-Instruct chat
template, the resolved recipe (`recipe.yaml`) and the training log (`trainer_state.json`, with
`aux_loss`). The loss is the mean next-token loss over the assistant replies plus
`moe.aux_loss_coef * load-balancing loss + moe.z_loss_coef * router z-loss` (see finetune/moe.py).
"""

from __future__ import annotations

import sys

from transformers import set_seed
from trl import SFTTrainer

from finetune.chat_format import ChatEncoder
from finetune.check import encoder_for
from finetune.config import Recipe
from finetune.losses import use_compact_lm_head
from finetune.model import apply_method, load_base_model
from finetune.runs import (
    RouterLossHook,
    Throughput,
    announce,
    load_data,
    run_pass,
    trainer_args,
    trainer_inputs,
)


class MoESFTTrainer(SFTTrainer):
    """TRL's SFTTrainer plus the router losses of finetune.moe, and throughput in the logs."""

    def __init__(self, *args, moe, **kwargs):
        super().__init__(*args, **kwargs)
        use_compact_lm_head(self.model)
        self.router_loss = RouterLossHook(self.model, moe)
        self.throughput = Throughput()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.router_loss.tap.capture():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        loss = self.router_loss.add(self, loss, inputs.get("attention_mask"), num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs, start_time=None):
        logs = self.router_loss.add_router_stats(logs, "train" if self.model.training else "eval",
                                                   self.state.global_step)
        super().log(self.throughput.update(logs, self.state.global_step, self._total_train_tokens), start_time)


def build(recipe: Recipe) -> tuple[MoESFTTrainer, ChatEncoder]:
    """Recipe -> data -> model -> trainer, printing what will train."""
    args = trainer_args(recipe)

    # Data: Mixtral-Instruct token ids with labels on the assistant replies only.
    encoder = encoder_for(recipe)
    data = load_data(recipe, args, encoder)

    # Model: base weights frozen, LoRA (or full training) on attention, experts and router. Seeded
    # first: PEFT draws the LoRA initialisation from the global RNG.
    set_seed(args.seed)
    model = apply_method(load_base_model(recipe), recipe)
    announce(model, recipe, args, data)
    trainer = MoESFTTrainer(model=model, args=args, **trainer_inputs(recipe, data, encoder))
    return trainer, encoder


def main(argv: list[str] | None = None) -> int:
    return run_pass("sft", build, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
