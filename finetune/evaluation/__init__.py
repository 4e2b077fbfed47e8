"""Evaluation: a model or adapter loaded for it (loading.py), a suite and its data (suite.py), what it computes
with the model (scoring.py), each part of a suite as figures (run.py) also per language and task family
(groups.py), verifiable instruction rules (rules.py), and the report and plots it writes (report.py,
plots.py). The `finetune evaluate` and `finetune chat` commands run on it.

May import: finetune.errors, finetune.files, finetune.recipe, finetune.data, finetune.moe, finetune.model.
"""
