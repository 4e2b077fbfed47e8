"""Data: the Mixtral-Instruct chat format token-exact with mistral_common (chat_format.py), rows read and
validated with every bad row named (rows.py), the tokenized Arrow cache every process maps (cache.py), the
groups a row belongs to (groups.py), packing arithmetic (packing.py), and what `finetune check` shows of it
(preview.py).

May import: finetune.errors, finetune.files, finetune.recipe.
"""
