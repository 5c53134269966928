"""qwen3_moe family: HF config reader/writer, parameter mapping and surgery table, registered as one record."""
from megatron_slim.models.family import Family
from megatron_slim.models.qwen3_moe import config, surgery_spec, weight_mapping

FAMILY = Family(name=config.NAME, architecture=config.ARCHITECTURE, from_hf=config.from_hf, to_hf=config.to_hf,
                mapping=weight_mapping.MAPPING, surgery=surgery_spec.SPEC)
