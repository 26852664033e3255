"""A config-driven recurrent-network training engine in the style of Apache SINGA."""
__version__ = "0.1.0"
