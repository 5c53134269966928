"""Reference forwards to check converted Megatron-Core models against: transformers on CPU, plus a float64
forward of Qwen3-Next's multi-token-prediction head, which transformers drops on load."""
