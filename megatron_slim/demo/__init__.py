"""The embedded default job (`make demo`): its recipe (recipe.yaml) and `run_demo`, which builds the teacher and
data splits from the embedded assets (megatron_slim/data/assets.py, megatron_slim/data/wiki.py) once and runs it.
"""
