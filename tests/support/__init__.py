"""Helpers shared by the tests; `tests/conftest.py` puts `tests/` on sys.path, so they import as `support.*`.

Which to use for what:
- tiny HF configs, one function per family (`FAMILIES` drives the parametrised tests): `support.tiny_models`
- tiny random HF checkpoints in memory or on disk, hub-like shards and Qwen3-Next MTP tensors, and reading every
  tensor of a checkpoint back: `support.hf_checkpoints`
- running a function on several gloo CPU ranks: `support.dist.run_distributed`; the rank functions that several
  test files share (save/load at a layout, train steps, verify sweeps, parameter counts): `support.workers`
- the toy language the training tests learn (the one writer of toy data): `support.toy_data`
- assets made in the test process with the CLI (teacher/student Megatron checkpoints, the toy dataset, run configs,
  `cli`, `metrics`): `support.train_assets`
- assets built in one subprocess, megatron-core imported once and torch kept out of the test process (the
  launch.sh and recipe-run tests): `support.run_assets`
- programs launch.sh starts by path: `slurm_allreduce.py` (a two-rank all-reduce), `slurm_preemptible.py` (a
  trainer that saves and exits for requeue on a signal), `slurm_stage_probe.sh` (stands in for the interpreter of
  a recipe stage)
"""
