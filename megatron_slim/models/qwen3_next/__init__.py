"""qwen3_next family: HF config reader/writer, parameter mapping and surgery table, registered as one record."""
from megatron_slim.models.family import Family
from megatron_slim.models.qwen3_next import config, surgery_spec, weight_mapping

# The HF Qwen3-Next layout has one set of MTP fc/norm tensors, so one MTP depth.
FAMILY = Family(name=config.NAME, architecture=config.ARCHITECTURE, from_hf=config.from_hf, to_hf=config.to_hf,
                mapping=weight_mapping.MAPPING, surgery=surgery_spec.SPEC, max_mtp_layers=1)
