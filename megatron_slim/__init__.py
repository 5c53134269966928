"""megatron-slim: prune, merge and distill large Mixture-of-Experts models on Megatron-Core."""

__version__ = "0.1.0"
