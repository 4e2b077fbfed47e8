"""The memory plan before any weight loads: what a recipe needs per device (memory.py), ZeRO-3's gathers and
prefetch (prefetch.py), as printed (report.py), and the nearest setups that fit when it does not
(alternatives.py); the `finetune plan` command (finetune/plan.py) runs them. What evaluation needs on one GPU
(evaluation.py), for `finetune evaluate --plan`.

May import: finetune.errors, finetune.files, finetune.recipe, finetune.moe, finetune.model.
"""
