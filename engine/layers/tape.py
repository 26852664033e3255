"""A cell's backward, derived from its forward formula: a small tape, micrograd-style.

A recurrent cell writes its step once, as ``formula(f, x, state, U)`` (see
``engine/layers/recurrent.py``): ``x`` the per-gate input projections, ``state``
the state parts, ``U(gates, v)`` the recurrent product of those gates' rows of
W_h with a vector ``v``, and ``f`` the element-wise functions. The same formula
runs two ways:

* on plain arrays, with ``f = Direct(xp)``: the forward value only;
* on ``Var``s, with ``f = Taped(tape)``: every operation is recorded with its
  inputs and the local derivative rule, so ``Tape.backward`` walks the records in
  reverse and accumulates (``+=``) each input's gradient.

The operations are the dozen a cell needs: ``+ - *`` between arrays and with
numbers, negation, and ``f.sigmoid``, ``f.tanh``, ``f.relu``, ``f.identity``;
``U`` is recorded as one more operation whose backward the caller supplies (the
product's transpose, and the bookkeeping of the W_h gradient). Nothing here
knows about gates, layers or buffers.
"""
from __future__ import annotations


class Var:
    """An array in a taped computation: its ``value`` and the tape that records what is
    computed from it."""

    __slots__ = ("value", "tape")

    def __init__(self, tape: "Tape", value):
        self.tape = tape
        self.value = value

    # arithmetic builds records on the tape
    def __add__(self, other):
        return self.tape.binary("add", self, other)

    def __radd__(self, other):
        return self.tape.binary("add", other, self)

    def __sub__(self, other):
        return self.tape.binary("sub", self, other)

    def __rsub__(self, other):
        return self.tape.binary("sub", other, self)

    def __mul__(self, other):
        return self.tape.binary("mul", self, other)

    def __rmul__(self, other):
        return self.tape.binary("mul", other, self)

    def __neg__(self):
        return self.tape.binary("mul", -1.0, self)


def _value(a):
    return a.value if isinstance(a, Var) else a


class Tape:
    """The records of one taped computation, in the order they ran (a topological order)."""

    def __init__(self, xp):
        self.xp = xp
        self.records: list = []   # (output Var, inputs tuple, rule)

    def leaf(self, value) -> Var:
        """An input of the computation (its gradient is read after ``backward``)."""
        return Var(self, value)

    def record(self, value, inputs: tuple, rule) -> Var:
        """A new Var computed from ``inputs``; ``rule(g)`` gives each input's gradient
        contribution (a tuple aligned with ``inputs``; None where nothing flows)."""
        out = Var(self, value)
        self.records.append((out, inputs, rule))
        return out

    def binary(self, op: str, a, b) -> Var:
        xp = self.xp
        va, vb = _value(a), _value(b)
        if op == "add":
            return self.record(va + vb, (a, b), lambda g: (g, g))
        if op == "sub":
            return self.record(va - vb, (a, b), lambda g: (g, -g))
        if op == "mul":
            return self.record(xp.multiply(va, vb), (a, b), lambda g: (g * vb, g * va))
        raise ValueError(op)

    def backward(self, seeds) -> None:
        """Gradients of every Var that reaches the outputs (read them with ``grad``):
        ``seeds`` gives (output Var, its incoming gradient) pairs; the records then run in
        reverse, each adding its inputs' shares (gradients always accumulate)."""
        grads: dict = {}
        for v, g in seeds:
            if isinstance(v, Var) and g is not None:
                grads[id(v)] = g if id(v) not in grads else grads[id(v)] + g
        for out, inputs, rule in reversed(self.records):
            g = grads.get(id(out))
            if g is None:
                continue
            shares = rule(g)
            for inp, share in zip(inputs, shares):
                if share is None or not isinstance(inp, Var):
                    continue
                key = id(inp)
                prev = grads.get(key)
                grads[key] = share if prev is None else prev + share
        self._grads = grads

    def grad(self, v: Var):
        """The gradient that reached ``v`` in the last ``backward`` (None: none did)."""
        return self._grads.get(id(v))


class Direct:
    """The element-wise functions a formula uses, on plain arrays of ``xp``."""

    def __init__(self, xp):
        self.xp = xp

    def sigmoid(self, a):
        """σ(a) = 1 / (1 + exp(−a)), as 0.5 tanh(a / 2) + 0.5 (no overflow)."""
        return 0.5 * self.xp.tanh(0.5 * a) + 0.5

    def tanh(self, a):
        return self.xp.tanh(a)

    def relu(self, a):
        return self.xp.maximum(a, 0)

    def identity(self, a):
        return a


class Taped(Direct):
    """The same functions on ``Var``s, each recorded with its derivative."""

    def __init__(self, tape: Tape):
        super().__init__(tape.xp)
        self.tape = tape

    def sigmoid(self, a):
        y = Direct.sigmoid(self, _value(a))
        return self.tape.record(y, (a,), lambda g: (g * (y - y * y),))

    def tanh(self, a):
        y = self.xp.tanh(_value(a))
        return self.tape.record(y, (a,), lambda g: (g * (1 - y * y),))

    def relu(self, a):
        v = _value(a)
        y = self.xp.maximum(v, 0)
        return self.tape.record(y, (a,), lambda g: (g * (v > 0),))

    def identity(self, a):
        return a
