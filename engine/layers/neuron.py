"""Layer family: neuron (being written)."""
