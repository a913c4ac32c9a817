"""Built-in data: a small calibration text."""
