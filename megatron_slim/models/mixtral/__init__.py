"""mixtral family: HF config parsing (and, with the conversion work, its state-dict adapter)."""
