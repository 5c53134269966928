"""The SlimQwen paper's ablation suite (`make ablate`, `megatron-slim ablate`): findings as variants of one small
recipe, run once each and judged by paired differences (suite.py)."""
