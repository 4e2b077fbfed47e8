"""Fine-tune Mixtral-style sparse Mixture-of-Experts models into chat models: SFT, then DPO."""

__version__ = "0.1.0"
