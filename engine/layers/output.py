"""Layer family: output (being written)."""
