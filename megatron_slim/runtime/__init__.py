"""Process-level runtime: torch.distributed and Megatron parallel state, CPU compatibility for tests."""
