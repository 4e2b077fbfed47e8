"""What leaves this machine: model cards that name bases and data by Hub id or folder name, never by this
machine's paths (card.py), and the Hub upload that leaves the local folder intact when it fails (hub.py).

May import: finetune.errors, finetune.files, finetune.recipe, finetune.model.
"""
