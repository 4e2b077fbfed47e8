"""The model: its config read before any weight (config.py), where and in which dtype it trains (device.py),
its attention kernel (attention.py), the base loaded for training (loading.py), 4-bit (quantized.py), where
LoRA targets are chosen and what trains (lora_targets.py), fp32 master weights for what trains in full
(master_weights.py) and what the pass prints about it (trainable_report.py), the LM head that scores only
trained positions (lm_head.py), and the seeded tiny Mixtral for tests and the demo (tiny.py).

May import: finetune.errors, finetune.private_apis, finetune.files, finetune.recipe, finetune.data,
finetune.moe.
"""
