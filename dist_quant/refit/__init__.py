"""Streaming refit: calibrated weights and quantizer state, producer and consumer."""
