"""The HTTP API: a Quart-Trio app with one adapter module per dialect."""
