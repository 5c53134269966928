"""Model configs, the family registry (one folder per family), mapping and surgery vocabulary, layer specs and
Megatron-Core model builders for the supported MoE families."""
