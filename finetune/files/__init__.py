"""Files on disk, below every job: safetensors read tensor by tensor, the two Mixtral checkpoint layouts,
output folders that never touch a command's inputs and land whole, and the Hub-id-or-path rule.

May import: finetune.errors only.
"""
