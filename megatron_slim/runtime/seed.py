"""The seed every run starts from unless told otherwise: one constant, so a training run, a randomly initialised
student, fresh MTP depths and the model-parallel RNG of a job agree on it (and a recipe stage that names no
`train.seed` initialises what `megatron-slim train` would)."""
from __future__ import annotations

DEFAULT_SEED = 1234
