"""The merged export: adapters merged into the base one shard at a time in the original Mixtral layout
(streaming.py), and its verification, the merged model against base + adapters applied by PEFT, one decoder
layer at a time (verify.py). The `finetune export` command (finetune/export.py) runs both.

May import: finetune.errors, finetune.files.
"""
