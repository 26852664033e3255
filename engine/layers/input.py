"""Layer family: input (being written)."""
