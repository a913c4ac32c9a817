"""Hugging Face checkpoint writer (ModelOpt unified format, as vLLM loads it)."""
