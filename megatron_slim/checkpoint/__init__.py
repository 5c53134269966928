"""Checkpoint formats at the edges: Megatron-Core distributed checkpoints and HF safetensors."""
