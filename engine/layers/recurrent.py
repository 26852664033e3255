"""Layer family: recurrent (being written)."""
