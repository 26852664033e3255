"""Layer families, each registered under its LayerType by ``@register``.

Importing this package imports every family so that ``REGISTRY`` is complete.
"""
from engine.layers.base import REGISTRY, Context, Layer, LayerError, Param, register  # noqa: F401
from engine.layers import input, neuron, recurrent, loss, output, connection  # noqa: F401,E402


def layer_class(layer_type: int):
    """The Layer subclass registered for a LayerType value, or None."""
    return REGISTRY.get(layer_type)
