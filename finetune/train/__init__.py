"""Training passes: everything refused before loading (preflight.py), TRL's arguments (arguments.py), launch
modes in code (launch.py), the steps SFT and DPO share (steps.py), what both trainers add to TRL's
(trainer.py), checkpoints, resume and SIGTERM (checkpoints.py), the run folder (run_folder.py), and what a
finished pass writes and pushes (outputs.py). The `finetune sft` and `finetune dpo` commands call these.

May import: everything below the commands (finetune.errors, files, recipe, data, moe, model, evaluation,
publish), never a command.
"""
