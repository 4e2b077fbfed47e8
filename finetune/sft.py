"""Supervised fine-tuning of a Mixtral-style MoE model on conversations: the first half of Mixtral-Instruct.

    python -m finetune.sft recipes/tiny/sft.yaml [key.sub=value ...]
    accelerate launch -m finetune.sft recipes/sft.yaml

Writes to `output_dir`: the LoRA adapter (PEFT format), the tokenizer with the Mixtral-Instruct chat
template, the resolved recipe (`recipe.yaml`) and the training log (`trainer_state.json`, with
`aux_loss`). The loss is the mean next-token loss over the assistant replies plus
`moe.aux_loss_coef * load-balancing loss + moe.z_loss_coef * router z-loss` (finetune/moe_trainer.py).
"""

from __future__ import annotations

import sys

from trl import SFTTrainer

from finetune.config import Recipe
from finetune.model import apply_method, load_base_model
from finetune.moe_trainer import MoETrainerMixin
from finetune.runs import TrainingPass


class MoESFTTrainer(MoETrainerMixin, SFTTrainer):
    """TRL's SFTTrainer plus the router losses, router health and throughput of finetune/moe_trainer.py."""


def load_model(recipe: Recipe):
    """Base weights frozen; LoRA (or full training) on attention, experts and router."""
    return apply_method(load_base_model(recipe), recipe)


SFT = TrainingPass("sft", MoESFTTrainer, load_model, __doc__.split("\n")[0])
build, main = SFT.build, SFT.main  # recipe -> (trainer, encoder); the command line


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
