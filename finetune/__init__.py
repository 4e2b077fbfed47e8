"""Fine-tune Mixtral-style sparse Mixture-of-Experts models into chat models: SFT, then DPO."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import (which PEFT triggers whenever it is installed) that the optional
# `kernels` package, a Hub download, is missing. Its kernel serves only the bf16 inference repacking that
# finetune/model/quantized.py turns off, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
