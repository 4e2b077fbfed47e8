"""Supervised fine-tuning of a Mixtral-style MoE model on conversations: the first half of Mixtral-Instruct.

    python -m finetune.sft recipes/tiny/sft.yaml [key.sub=value ...]
    accelerate launch -m finetune.sft recipes/sft.yaml

Writes to `output_dir`: the LoRA adapter (PEFT format), the tokenizer with the Mixtral-Instruct chat
template, the resolved recipe (`recipe.yaml`) and the training log (`trainer_state.json`, with
`aux_loss`). The loss is the mean next-token loss over the assistant replies plus
`moe.aux_loss_coef * load-balancing loss + moe.z_loss_coef * router z-loss` (finetune/train/trainer.py).
"""

from __future__ import annotations

import sys

from transformers import set_seed
from trl import SFTTrainer

from finetune.cli import invoked_as
from finetune.data.encoders import encoder_for
from finetune.model.loading import load_base_model
from finetune.model.lora_targets import make_trainable
from finetune.recipe.schema import Recipe
from finetune.train.arguments import trainer_args
from finetune.train.checkpoints import resume_checkpoint
from finetune.train.launch import is_main_process, prepare_for_launch, relaunch_with_accelerate, should_relaunch
from finetune.train.outputs import push_outputs, save_outputs
from finetune.train.preflight import preflight
from finetune.train.run_folder import already_complete
from finetune.train.steps import announce, load_data, recipe_from_command_line, train, trainer_inputs
from finetune.train.trainer import MoETrainerMixin


class MoESFTTrainer(MoETrainerMixin, SFTTrainer):
    """TRL's SFTTrainer plus the router losses, router health and throughput of finetune/train/trainer.py."""


def build(recipe: Recipe, args=None):
    """Data, model and trainer for an SFT recipe: (trainer, encoder). `args`: its TRL arguments, when built."""
    args = args or trainer_args(recipe)
    # Data: Mixtral-Instruct token ids, labels on the assistant replies and their EOS (packed if asked).
    encoder = encoder_for(recipe)
    data = load_data(recipe, args, encoder)
    # Model: the base frozen, LoRA (or full training) on the `trainable` groups. Seeded first: PEFT draws a
    # fresh adapter's initialisation from the global RNG.
    set_seed(args.seed)
    model = prepare_for_launch(make_trainable(load_base_model(recipe), recipe), recipe)
    announce(model, recipe, args, data)
    return MoESFTTrainer(model=model, args=args, **trainer_inputs(recipe, data, encoder)), encoder


def main(argv: list[str] | None = None) -> int:
    # Recipe, and everything refused before any weight loads (output folder, model config, TRL's arguments).
    recipe, command = recipe_from_command_line(invoked_as("sft"), "sft", __doc__, argv)
    args = preflight(recipe)
    # Under the recipe's `launch` file, unless already launched: the child runs the steps below.
    if should_relaunch(recipe):
        return relaunch_with_accelerate(recipe, command.recipe, command.overrides)
    # The same command after a finished run changes nothing.
    if already_complete(recipe):
        return 0
    # Resume: the newest complete checkpoint of this same run, if output_dir holds one.
    resume_from = resume_checkpoint(recipe, is_main_process())
    trainer, encoder = build(recipe, args)
    interrupted = train(trainer, recipe, resume_from)
    if interrupted:
        return interrupted
    save_outputs(trainer, recipe, encoder)  # adapter, tokenizer, recipe, log, model card
    return push_outputs(recipe, trainer.is_world_process_zero())


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
