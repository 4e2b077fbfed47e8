"""Fine-tune Mixtral-style sparse Mixture-of-Experts models into chat models: SFT, then DPO.

The commands are the modules at this level (`python -m finetune.X`, or `finetune X` through cli.py); below
them, one folder per job, lowest first: files, recipe, data, moe, model, then train, merge, evaluation,
planning and publish. Each folder's __init__ says what it may import; no folder imports a command
(tests/test_architecture.py). errors.py and private_apis.py serve every folder.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import (which PEFT triggers whenever it is installed) that the optional
# `kernels` package, a Hub download, is missing. Its kernel serves only the bf16 inference repacking that
# finetune/model/quantized.py turns off, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
