"""The merged export: adapters merged into the base one shard at a time in the original Mixtral layout
(streaming.py), which adapters may be merged together onto which base (lineage.py), and the verification of
the result against base + adapters applied by PEFT, one decoder layer at a time (verify.py). The
`finetune export` command (finetune/export.py) runs them.

May import: finetune.errors, finetune.files, finetune.recipe.
"""
