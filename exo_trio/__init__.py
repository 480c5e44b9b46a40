"""exo-trio: an LLM inference cluster on Trio and MLX that never loses a token."""

__version__ = "0.1.0"
