"""Connection layers: concatenation, slicing and splitting of arrays.

Dimensions count the batch: dim 0 is the batch rows, dim 1 the first feature
dimension (``out_shape[0]``). No params.
"""
from __future__ import annotations

from engine.layers.base import Layer, register
from engine.proto import job_pb2 as pb


@register(pb.kConcate)
class Concate(Layer):
    """y = concatenate(x_1, ..., x_n) along concate_conf.concate_dim [0].

    concate_dim 1 (or higher): features; the sources' shapes must agree on the
    other dims. A source absent at this copy counts as zeros of its shape, so
    the width stays out_shape. concate_dim 0: batch rows; absent sources are
    skipped. num_concates, when set, must equal the number of sources.
    Backward: dy split back into the sources' pieces (None for absent ones).
    """

    @property
    def rowwise(self):
        """Joining features keeps rows independent; joining rows (dim 0) does not."""
        return int(self.conf.concate_conf.concate_dim) != 0

    def setup(self, srcs):
        c = self.conf.concate_conf
        if not srcs:
            raise self.error("kConcate needs at least one srclayer")
        if c.HasField("num_concates") and c.num_concates != len(srcs):
            raise self.error(f"concate_conf.num_concates is {c.num_concates} but the layer has "
                             f"{len(srcs)} srclayers; make them agree (or leave num_concates out)")
        self.dim = int(c.concate_dim)
        shapes = [tuple(s.out_shape) for s in srcs]
        rank = len(shapes[0])
        if any(len(s) != rank for s in shapes):
            raise self.error(f"sources have shapes {shapes} of different ranks; they must agree")
        if not 0 <= self.dim <= rank:
            raise self.error(f"concate_conf.concate_dim {self.dim} is out of range for sources "
                             f"of shape {shapes[0]} (0 = batch rows, 1..{rank} = features)")
        if self.dim == 0:
            if any(s != shapes[0] for s in shapes):
                raise self.error(f"concatenating batch rows needs sources of one shape, got "
                                 f"{shapes}")
            self.out_shape = shapes[0]
        else:
            a = self.dim - 1
            rest = [s[:a] + s[a + 1:] for s in shapes]
            if any(r != rest[0] for r in rest):
                raise self.error(f"sources have shapes {shapes}; all dims except concate_dim "
                                 f"{self.dim} must agree")
            self.sizes = [s[a] for s in shapes]
            self.out_shape = shapes[0][:a] + (sum(self.sizes),) + shapes[0][a + 1:]
        self.src_shapes = shapes

    def forward(self, ctx, xs, state):
        xp = self.xp
        arrs = [self.src_input(xs, k) for k in range(len(xs))]
        present = [a for a in arrs if a is not None]
        if not present:
            raise self.error(f"every source is absent at step {ctx.step}; at least one "
                             f"srclayer must feed each copy")
        if self.dim == 0:
            y = xp.concatenate(present, axis=0)
            return y, None, [None if a is None else a.shape[0] for a in arrs]
        b = present[0].shape[0]
        parts = [xp.zeros((b,) + self.src_shapes[k], dtype=present[0].dtype) if a is None else a
                 for k, a in enumerate(arrs)]
        y = xp.concatenate(parts, axis=self.dim)
        return y, None, [None if a is None else self.sizes[k] for k, a in enumerate(arrs)]

    def backward(self, ctx, dy, dstate, cache):
        dxs = []
        start = 0
        for k, n in enumerate(cache):
            if self.dim == 0 and n is None:  # a skipped source took no rows
                dxs.append(None)
                continue
            width = n if self.dim == 0 else self.sizes[k]
            idx = [slice(None)] * dy.ndim
            idx[self.dim] = slice(start, start + width)
            dxs.append(None if n is None else dy[tuple(idx)])
            start += width
        return dxs, None


@register(pb.kSlice)
class Slice(Layer):
    """y_j = x[..., j*n:(j+1)*n, ...] along slice_conf.slice_dim [0], j < num_slices.

    num_slices (>= 2, required) equal pieces; the size along slice_dim must be
    divisible by it. forward returns the list of pieces (consumer j of a copy
    gets piece j); backward takes the list of their gradients (None = zeros)
    and returns their concatenation. out_shape is the shape of one piece.
    """

    required = (("slice_conf", "num_slices"),)

    multi_output = True

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        c = self.conf.slice_conf
        self.n = int(c.num_slices)
        self.dim = int(c.slice_dim)
        if self.n < 2:
            raise self.error(f"slice_conf.num_slices must be >= 2 (got {self.n}); set it to "
                             f"the number of pieces")
        shape = tuple(srcs[0].out_shape)
        if not 0 <= self.dim <= len(shape):
            raise self.error(f"slice_conf.slice_dim {self.dim} is out of range for a source of "
                             f"shape {shape} (0 = batch rows, 1..{len(shape)} = features)")
        if self.dim == 0:
            self.out_shape = shape
        else:
            size = shape[self.dim - 1]
            if size % self.n:
                raise self.error(f"size {size} along slice_dim {self.dim} is not divisible by "
                                 f"num_slices {self.n}")
            self.out_shape = shape[:self.dim - 1] + (size // self.n,) + shape[self.dim:]

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            raise self.error("source 0 gives nothing at this step")
        size = x.shape[self.dim]
        if size % self.n:
            raise self.error(f"size {size} along slice_dim {self.dim} is not divisible by "
                             f"num_slices {self.n}")
        w = size // self.n
        pieces = []
        for j in range(self.n):
            idx = [slice(None)] * x.ndim
            idx[self.dim] = slice(j * w, (j + 1) * w)
            pieces.append(x[tuple(idx)])
        return pieces, None, x.shape

    def backward(self, ctx, dy, dstate, cache):
        shape = cache
        if not isinstance(dy, (list, tuple)) or len(dy) != self.n:
            raise self.error(f"backward expects a list of {self.n} gradients, one per piece")
        w = shape[self.dim] // self.n
        piece = shape[:self.dim] + (w,) + shape[self.dim + 1:]
        parts = [self.xp.zeros(piece, dtype=self.dtype) if g is None else g for g in dy]
        return [self.xp.concatenate(parts, axis=self.dim)], None


@register(pb.kSplit)
class Split(Layer):
    """y = x, fed to split_conf.num_splits [1] consumers; dx = dy (the worker sums
    the gradients of all consumers before calling backward)."""

    rowwise = True

    def setup(self, srcs):
        self.need_srcs(srcs, 1)
        n = int(self.conf.split_conf.num_splits)
        if n < 1:
            raise self.error(f"split_conf.num_splits must be >= 1 (got {n})")
        self.out_shape = tuple(srcs[0].out_shape)

    def forward(self, ctx, xs, state):
        x = self.src_input(xs, 0)
        if x is None:
            return None, None, None
        return x, None, x.dtype.kind == "f"

    def backward(self, ctx, dy, dstate, cache):
        return [dy if cache else None], None
