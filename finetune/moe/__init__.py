"""Mixture-of-Experts mechanics, model-agnostic below the model loading: the routers watched by forward hooks
(router.py), the router losses (router_losses.py) and statistics (router_stats.py), expert LoRA computed on
the routed tokens only (expert_lora.py) as grouped matmuls with no host sync (grouped_mm.py), and fused expert
stacks stored in 4-bit NF4, dequantized a layer's stack at a time (nf4.py).

May import: finetune.errors, finetune.private_apis, finetune.files.
"""
