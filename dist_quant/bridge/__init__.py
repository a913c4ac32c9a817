"""Megatron <-> Hugging Face name and tensor mappings, model bridges, quant-state mappings."""
