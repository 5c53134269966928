"""Training and distillation on Megatron-Core: config, data, checkpoints, the loop."""
