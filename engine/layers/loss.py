"""Layer family: loss (being written)."""
