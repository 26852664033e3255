"""Connection layers: concatenation, slicing, splitting."""
import numpy as np
import pytest

from engine.layers.base import Context, LayerError
from engine.proto import job_pb2 as pb
from layercheck import make, check_layer



RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ concate

def test_concate_features_values_and_gradient():
    layer = make(pb.kConcate, "cat", [(2,), (3,)], concate_conf__concate_dim=1)
    assert layer.out_shape == (5,)
    a, b = RNG.standard_normal((4, 2)), RNG.standard_normal((4, 3))
    y, _, cache = layer.forward(Context(), [a, b], None)
    np.testing.assert_array_equal(y, np.hstack([a, b]))
    dy = np.arange(20.0).reshape(4, 5)
    (da, db), _ = layer.backward(Context(), dy, None, cache)
    np.testing.assert_array_equal(da, dy[:, :2])
    np.testing.assert_array_equal(db, dy[:, 2:])
    check_layer(layer, [a, b])


def test_concate_inner_feature_dim():
    layer = make(pb.kConcate, "cat", [(2, 3), (2, 1)], concate_conf__concate_dim=2,
                 concate_conf__num_concates=2)
    assert layer.out_shape == (2, 4)
    check_layer(layer, [RNG.standard_normal((3, 2, 3)), RNG.standard_normal((3, 2, 1))])


def test_concate_absent_source_counts_as_zeros():
    layer = make(pb.kConcate, "cat", [(2,), (3,), (1,)], concate_conf__concate_dim=1)
    a, c = RNG.standard_normal((2, 2)), RNG.standard_normal((2, 1))
    y, _, cache = layer.forward(Context(), [a, None, c], None)
    assert y.shape == (2, 6)
    np.testing.assert_array_equal(y, np.hstack([a, np.zeros((2, 3)), c]))
    dxs, _ = layer.backward(Context(), np.ones((2, 6)), None, cache)
    assert dxs[1] is None and dxs[0].shape == (2, 2) and dxs[2].shape == (2, 1)
    check_layer(layer, [a, None, c])


def test_concate_batch_rows():
    layer = make(pb.kConcate, "rows", [(3,), (3,)], concate_conf__concate_dim=0)
    assert layer.out_shape == (3,)
    a, b = RNG.standard_normal((2, 3)), RNG.standard_normal((4, 3))
    y, _, cache = layer.forward(Context(), [a, [b]], None)
    np.testing.assert_array_equal(y, np.vstack([a, b]))
    check_layer(layer, [a, b])
    y, _, cache = layer.forward(Context(), [None, b], None)
    np.testing.assert_array_equal(y, b)
    dxs, _ = layer.backward(Context(), 2 * b, None, cache)
    assert dxs[0] is None
    np.testing.assert_array_equal(dxs[1], 2 * b)


def test_concate_and_slice_defaults_are_singas():
    """SINGA's defaults: concate_dim 0 and slice_dim 0 (batch rows); num_concates
    [1] is checked only when written, so an unset one accepts any number of sources."""
    cat = make(pb.kConcate, "rows", [(3,), (3,), (3,)])
    assert cat.dim == 0 and cat.out_shape == (3,)
    a, b, c = (RNG.standard_normal((k, 3)) for k in (1, 2, 3))
    y, _, _ = cat.forward(Context(), [a, b, c], None)
    np.testing.assert_array_equal(y, np.vstack([a, b, c]))
    sl = make(pb.kSlice, "sl", [(3,)], slice_conf__num_slices=2)
    assert sl.dim == 0 and sl.out_shape == (3,)


def test_concate_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "c1".*num_concates is 3'):
        make(pb.kConcate, "c1", [(2,), (2,)], concate_conf__concate_dim=1,
             concate_conf__num_concates=3)
    with pytest.raises(LayerError, match=r'layer "c2".*must agree'):
        make(pb.kConcate, "c2", [(2, 3), (4, 3)], concate_conf__concate_dim=2)
    with pytest.raises(LayerError, match=r'layer "c3".*different ranks'):
        make(pb.kConcate, "c3", [(2,), (2, 1)], concate_conf__concate_dim=1)
    with pytest.raises(LayerError, match=r'layer "c4".*concate_dim 2 is out of range'):
        make(pb.kConcate, "c4", [(2,), (2,)], concate_conf__concate_dim=2)
    with pytest.raises(LayerError, match=r'layer "c5".*one shape'):
        make(pb.kConcate, "c5", [(2,), (3,)], concate_conf__concate_dim=0)
    layer = make(pb.kConcate, "c6", [(2,), (2,)], concate_conf__concate_dim=1)
    with pytest.raises(LayerError, match=r'layer "c6".*every source is absent at step 3'):
        layer.forward(Context(step=3), [None, None], None)


# -------------------------------------------------------------------- slice

def test_slice_pieces_and_gradient():
    layer = make(pb.kSlice, "sl", [(6,)], slice_conf__num_slices=3, slice_conf__slice_dim=1)
    assert layer.multi_output and layer.out_shape == (2,)
    x = RNG.standard_normal((4, 6))
    pieces, _, cache = layer.forward(Context(), [x], None)
    assert len(pieces) == 3
    for j, p in enumerate(pieces):
        np.testing.assert_array_equal(p, x[:, 2 * j:2 * j + 2])
    g0, g2 = np.ones((4, 2)), 3 * np.ones((4, 2))
    (dx,), _ = layer.backward(Context(), [g0, None, g2], None, cache)
    np.testing.assert_array_equal(dx, np.hstack([g0, np.zeros((4, 2)), g2]))
    check_layer(layer, [x])


def test_slice_batch_rows():
    layer = make(pb.kSlice, "sl", [(3,)], slice_conf__num_slices=2, slice_conf__slice_dim=0)
    assert layer.out_shape == (3,)
    x = RNG.standard_normal((4, 3))
    pieces, _, _ = layer.forward(Context(), [x], None)
    np.testing.assert_array_equal(pieces[1], x[2:])
    check_layer(layer, [x])
    with pytest.raises(LayerError, match=r'layer "sl": size 5 along slice_dim 0'):
        layer.forward(Context(), [np.zeros((5, 3))], None)


def test_slice_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "s1".*num_slices must be >= 2'):
        make(pb.kSlice, "s1", [(6,)], slice_conf__slice_dim=1)
    with pytest.raises(LayerError, match=r'layer "s2".*not divisible by num_slices 4'):
        make(pb.kSlice, "s2", [(6,)], slice_conf__num_slices=4, slice_conf__slice_dim=1)
    with pytest.raises(LayerError, match=r'layer "s3".*slice_dim 2 is out of range'):
        make(pb.kSlice, "s3", [(6,)], slice_conf__num_slices=2, slice_conf__slice_dim=2)
    layer = make(pb.kSlice, "s4", [(6,)], slice_conf__num_slices=2, slice_conf__slice_dim=1)
    _, _, cache = layer.forward(Context(), [np.zeros((1, 6))], None)
    with pytest.raises(LayerError, match=r'layer "s4".*list of 2 gradients'):
        layer.backward(Context(), np.zeros((1, 3)), None, cache)


# -------------------------------------------------------------------- split

def test_split_is_identity():
    layer = make(pb.kSplit, "split", [(3,)], split_conf__num_splits=2)
    assert layer.out_shape == (3,)
    x = RNG.standard_normal((2, 3))
    y, _, cache = layer.forward(Context(), [x], None)
    assert y is x
    check_layer(layer, [x])
    with pytest.raises(LayerError, match=r'layer "sp".*num_splits'):
        make(pb.kSplit, "sp", [(3,)], split_conf__num_splits=0)
