"""Model configs, layer specs and Megatron-Core model builders for the supported MoE families."""
