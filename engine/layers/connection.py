"""Layer family: connection (being written)."""
