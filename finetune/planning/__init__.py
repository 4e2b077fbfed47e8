"""The memory plan before any weight loads: what a recipe needs per device (memory.py), as printed
(report.py), and the nearest setups that fit when it does not (alternatives.py). The `finetune plan` command
(finetune/plan.py) runs them.

May import: finetune.errors, finetune.files, finetune.recipe, finetune.moe, finetune.model.
"""
