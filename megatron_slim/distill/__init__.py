"""Knowledge-distillation losses that work on tensor-parallel vocabulary shards."""
