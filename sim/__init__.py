"""The deterministic simulator (run as `python -m sim`)."""
