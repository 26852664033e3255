"""Neuron layers: values against hand computation, finite-difference gradients, errors."""
import numpy as np
import pytest

from engine.layers.base import REGISTRY, Context, LayerError
from engine.layers import neuron
from engine.proto import job_pb2 as pb
from layercheck import make, FakeSrc, check_layer



def ctx(**kw):
    kw.setdefault("rng", np.random.default_rng(1))
    return Context(**kw)


def away_from_zero(rng, shape):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.3, x)


# ------------------------------------------------------------ inner product

def test_innerproduct_value_and_gradient():
    ip = make(pb.kInnerProduct, "ip1", [(4,)], innerproduct_conf__num_output=3)
    assert ip.out_shape == (3,)
    w, b = ip.params["w"], ip.params["b"]
    assert w.shape == (3, 4) and b.shape == (3,)
    assert (w.fan_in, w.fan_out) == (4, 3)
    assert np.all(b.data == 0) and np.all(np.abs(w.data) <= 0.08)
    b.data[...] = [0.5, -1.0, 2.0]
    x = np.random.default_rng(0).standard_normal((5, 4))
    y, state, _ = ip.forward(ctx(), [x], None)
    assert state is None
    np.testing.assert_allclose(y, x @ w.data.T + b.data)
    check_layer(ip, [x])


@pytest.mark.parametrize("transpose", [False, True])
def test_innerproduct_leaves_its_input_gradient_as_a_product_when_asked(transpose):
    """With ``Context.product_grads`` (the planned executor) the input gradient comes back
    as ProductGrad(dy, W), whose value is the gradient given without it, to the bit; its
    parameter gradients are the same; a sum with another gradient multiplies it out."""
    from engine.layers.base import ProductGrad, add_grads, dense_grad
    rng = np.random.default_rng(3)
    grads = []
    for ask in (False, True):
        ip = make(pb.kInnerProduct, "ip", [(4,)], innerproduct_conf__num_output=3,
                  innerproduct_conf__transpose=transpose)
        ip.params["w"].data[...] = np.random.default_rng(7).standard_normal(ip.params["w"].shape)
        for p in ip.params.values():
            p.grad = np.zeros(p.shape)
        x = rng.standard_normal((6, 4)) if not ask else x
        dy = rng.standard_normal((6, 3)) if not ask else dy
        _, _, cache = ip.forward(ctx(), [x], None)
        (dx,), _ = ip.backward(ctx(product_grads=ask), dy, None, cache)
        grads.append((dx, {k: p.grad.copy() for k, p in ip.params.items()}))
    (plain, g0), (prod, g1) = grads
    assert isinstance(prod, ProductGrad) and not isinstance(plain, ProductGrad)
    assert prod.shape == plain.shape
    np.testing.assert_array_equal(prod.value(), plain)
    np.testing.assert_array_equal(dense_grad(prod), plain)
    for k in g0:
        np.testing.assert_array_equal(g1[k], g0[k])
    np.testing.assert_array_equal(add_grads(prod, plain), plain + plain)
    np.testing.assert_array_equal(add_grads(plain, prod), plain + plain)
    assert add_grads(None, prod) is prod


def test_innerproduct_transpose_matches_plain():
    plain = make(pb.kInnerProduct, "ip", [(4,)], innerproduct_conf__num_output=3)
    tr = make(pb.kInnerProduct, "ipt", [(4,)], innerproduct_conf__num_output=3,
              innerproduct_conf__transpose=True)
    assert tr.params["w"].shape == (4, 3)
    tr.params["w"].data[...] = plain.params["w"].data.T
    x = np.random.default_rng(1).standard_normal((2, 4))
    np.testing.assert_allclose(tr.forward(ctx(), [x], None)[0], plain.forward(ctx(), [x], None)[0])
    check_layer(tr, [x])


def test_innerproduct_no_bias_flattens_rows_and_unwraps_one_to_all():
    ip = make(pb.kInnerProduct, "ip", [(2, 3)], innerproduct_conf__num_output=2,
              innerproduct_conf__bias_term=False)
    assert list(ip.params) == ["w"] and ip.params["w"].shape == (2, 6)
    assert REGISTRY[pb.kInnerProduct].default_param_names(ip.conf) == ["w"]
    x = np.random.default_rng(2).standard_normal((3, 2, 3))
    y, _, _ = ip.forward(ctx(), [[x]], None)  # a one-to-all source with one copy
    np.testing.assert_allclose(y, x.reshape(3, 6) @ ip.params["w"].data.T)
    check_layer(ip, [x])


def test_innerproduct_gradients_accumulate():
    ip = make(pb.kInnerProduct, "ip", [(3,)], innerproduct_conf__num_output=2)
    x = np.random.default_rng(3).standard_normal((4, 3))
    dy = np.random.default_rng(4).standard_normal((4, 2))
    _, _, cache = ip.forward(ctx(), [x], None)
    ip.backward(ctx(), dy, None, cache)
    once = ip.params["w"].grad.copy()
    ip.backward(ctx(), dy, None, cache)
    np.testing.assert_allclose(ip.params["w"].grad, 2 * once)
    np.testing.assert_allclose(once, dy.T @ x)
    np.testing.assert_allclose(ip.params["b"].grad, 2 * dy.sum(0))


def test_innerproduct_absent_input_passes_none():
    ip = make(pb.kInnerProduct, "ip", [(3,)], innerproduct_conf__num_output=2)
    y, _, cache = ip.forward(ctx(), [None], None)
    assert y is None
    assert ip.backward(ctx(), None, None, cache) == ([None], None)


def test_tied_embedding_and_output_weights():
    """Embedding w (V, F) tied to a plain inner product w (V, F): gradients of both add up."""
    emb = make(pb.kEmbedding, "emb", [()], embedding_conf__vocab_size=5,
               embedding_conf__feature_dim=3)
    ip = make(pb.kInnerProduct, "out", [(3,)], innerproduct_conf__num_output=5)
    ip.params["w"] = emb.params["w"]  # what resolve_sharing does
    w = emb.params["w"]
    ids = np.array([1, 4, 1])
    r = np.random.default_rng(5).standard_normal((3, 5))

    def objective():
        h, _, _ = emb.forward(ctx(), [ids], None)
        y, _, _ = ip.forward(ctx(), [h], None)
        return float(np.sum(y * r))

    w.grad[...] = 0
    ip.params["b"].grad[...] = 0
    h, _, ce = emb.forward(ctx(), [ids], None)
    _, _, ci = ip.forward(ctx(), [h], None)
    (dh,), _ = ip.backward(ctx(), r, None, ci)
    emb.backward(ctx(), dh, None, ce)
    num = np.zeros_like(w.data)
    for idx in np.ndindex(*w.data.shape):
        old = w.data[idx]
        w.data[idx] = old + 1e-6
        lp = objective()
        w.data[idx] = old - 1e-6
        lm = objective()
        w.data[idx] = old
        num[idx] = (lp - lm) / 2e-6
    np.testing.assert_allclose(w.grad, num, rtol=1e-6, atol=1e-8)


def test_innerproduct_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "ip1".*num_output'):
        make(pb.kInnerProduct, "ip1", [(4,)])
    with pytest.raises(LayerError, match=r'layer "ip2".*num_output'):
        make(pb.kInnerProduct, "ip2", [(4,)], innerproduct_conf__num_output=-2)
    with pytest.raises(LayerError, match=r'layer "ip3".*takes 1 srclayer'):
        make(pb.kInnerProduct, "ip3", [(4,), (4,)], innerproduct_conf__num_output=2)
    ip = make(pb.kInnerProduct, "ip4", [(4,)], innerproduct_conf__num_output=2)
    with pytest.raises(LayerError, match=r'layer "ip4".*5 features.*expected 4'):
        ip.forward(ctx(), [np.zeros((2, 5))], None)
    with pytest.raises(LayerError, match=r'layer "ip4".*single source copy'):
        ip.forward(ctx(), [[np.zeros((2, 4)), np.zeros((2, 4))]], None)


# ---------------------------------------------------------------- embedding

def test_embedding_lookup_and_scatter_add_with_repeated_ids():
    emb = make(pb.kEmbedding, "emb", [()], embedding_conf__vocab_size=4,
               embedding_conf__feature_dim=2)
    assert emb.out_shape == (2,) and emb.params["w"].shape == (4, 2)
    w = emb.params["w"]
    ids = np.array([2, 0, 2, 2])
    y, _, cache = emb.forward(ctx(), [ids], None)
    np.testing.assert_array_equal(y, w.data[[2, 0, 2, 2]])
    dy = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    dxs, _ = emb.backward(ctx(), dy, None, cache)
    assert dxs == [None]
    expect = np.zeros((4, 2))
    expect[2] = [13.0, 16.0]
    expect[0] = [3.0, 4.0]
    np.testing.assert_array_equal(w.grad, expect)
    emb.backward(ctx(), dy, None, cache)
    np.testing.assert_array_equal(w.grad, 2 * expect)
    check_layer(emb, [ids])


def test_embedding_one_to_all_source_picks_the_step_column():
    emb = make(pb.kEmbedding, "emb", [(3,)], embedding_conf__vocab_size=6,
               embedding_conf__feature_dim=2)
    seq = np.array([[0, 1, 2], [3, 4, 5]])
    y, _, _ = emb.forward(ctx(step=2), [[seq]], None)
    np.testing.assert_array_equal(y, emb.params["w"].data[[2, 5]])
    y, _, _ = emb.forward(ctx(step=0), [np.array([1.0, 3.0])], None)  # whole-number floats
    np.testing.assert_array_equal(y, emb.params["w"].data[[1, 3]])


def test_embedding_errors_name_the_layer_and_id():
    with pytest.raises(LayerError, match=r'layer "emb0".*vocab_size'):
        make(pb.kEmbedding, "emb0", [()], embedding_conf__feature_dim=2)
    emb = make(pb.kEmbedding, "emb1", [()], embedding_conf__vocab_size=4,
               embedding_conf__feature_dim=2)
    with pytest.raises(LayerError, match=r'layer "emb1": id 7 is outside \[0, 4\)'):
        emb.forward(ctx(), [np.array([1, 7])], None)
    with pytest.raises(LayerError, match=r'layer "emb1": id -1'):
        emb.forward(ctx(), [np.array([-1, 0])], None)
    with pytest.raises(LayerError, match=r'layer "emb1".*integer ids'):
        emb.forward(ctx(), [np.array([0.5, 1.0])], None)


# ------------------------------------------------------------------ dropout

def test_dropout_identity_when_not_training():
    d = make(pb.kDropout, "drop", [(5,)], dropout_conf__dropout_ratio=0.5)
    x = np.random.default_rng(0).standard_normal((3, 5))
    y, _, cache = d.forward(ctx(train=False), [x], None)
    np.testing.assert_array_equal(y, x)
    dy = np.ones_like(x)
    np.testing.assert_array_equal(d.backward(ctx(), dy, None, cache)[0][0], dy)


def test_dropout_training_drops_the_ratio_and_preserves_the_mean():
    d = make(pb.kDropout, "drop", [(1000,)], dropout_conf__dropout_ratio=0.3)
    x = np.ones((200, 1000))
    y, _, cache = d.forward(ctx(train=True), [x], None)
    assert abs(np.mean(y == 0) - 0.3) < 0.01
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01
    dx = d.backward(ctx(), np.ones_like(x), None, cache)[0][0]
    np.testing.assert_array_equal(dx, y)  # same mask and scaling


def test_dropout_gradient_in_training():
    d = make(pb.kDropout, "drop", [(4,)], dropout_conf__dropout_ratio=0.4)
    x = np.random.default_rng(0).standard_normal((3, 4))
    check_layer(d, [x])  # each forward gets a context with the same seed, so the same mask


def test_dropout_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "d1".*dropout_ratio'):
        make(pb.kDropout, "d1", [(4,)], dropout_conf__dropout_ratio=1.0)
    d = make(pb.kDropout, "d2", [(4,)])
    with pytest.raises(LayerError, match=r'layer "d2".*rng'):
        d.forward(Context(train=True, rng=None), [np.ones((2, 4))], None)


# -------------------------------------------------------------- activations

def _stanh(x):
    return 1.7159047 * np.tanh(2.0 * x / 3.0)  # SINGA v0.3's constants (singa_op.h)


EXPECT = {
    "RELU": lambda x: np.maximum(x, 0),
    "SIGMOID": lambda x: 1 / (1 + np.exp(-x)),
    "TANH": np.tanh,
    "STANH": _stanh,
    "LINEAR": lambda x: x,
}


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_activation_types(kind):
    layer = make(pb.kActivation, "act", [(3, 2)],
                 activation_conf__type=pb.ActivationType.Value(kind))
    assert layer.out_shape == (3, 2)
    x = away_from_zero(np.random.default_rng(0), (4, 3, 2))
    np.testing.assert_allclose(layer.forward(ctx(), [x], None)[0], EXPECT[kind](x), rtol=1e-12)
    check_layer(layer, [x])


@pytest.mark.parametrize("layer_type,kind", [(pb.kSigmoid, "SIGMOID"), (pb.kSTanh, "STANH"),
                                              (pb.kReLU, "RELU")])
def test_dedicated_types_share_the_activation_table(layer_type, kind):
    layer = make(layer_type, "f", [(5,)])
    x = away_from_zero(np.random.default_rng(1), (3, 5))
    np.testing.assert_allclose(layer.forward(ctx(), [x], None)[0], EXPECT[kind](x), rtol=1e-12)
    check_layer(layer, [x])


def test_relu_negative_slope():
    layer = make(pb.kReLU, "relu", [(4,)], relu_conf__negative_slope=0.1)
    x = np.array([[-2.0, -0.5, 0.5, 3.0]])
    np.testing.assert_allclose(layer.forward(ctx(), [x], None)[0], [[-0.2, -0.05, 0.5, 3.0]])
    check_layer(layer, [away_from_zero(np.random.default_rng(2), (3, 4))])


def test_sigmoid_is_stable_for_large_inputs():
    layer = make(pb.kSigmoid, "s", [(3,)])
    with np.errstate(all="raise"):
        y = layer.forward(ctx(), [np.array([[-1000.0, 0.0, 1000.0]])], None)[0]
    np.testing.assert_allclose(y, [[0.0, 0.5, 1.0]])


def test_activation_rejects_unknown_type():
    conf = pb.LayerProto(name="act9", type=pb.kActivation)
    conf.activation_conf.type = pb.RELU
    layer = REGISTRY[pb.kActivation](conf)
    layer.function = lambda: (99, 0.0)
    with pytest.raises(LayerError, match=r'layer "act9".*not supported'):
        layer.setup([FakeSrc((3,))])


def test_dummy_is_identity_for_floats_and_ids():
    layer = make(pb.kDummy, "dummy", [(3,)])
    x = np.random.default_rng(0).standard_normal((2, 3))
    y, _, cache = layer.forward(ctx(), [x], None)
    assert y is x
    check_layer(layer, [x])
    ids = np.array([1, 2])
    y, _, cache = layer.forward(ctx(), [ids], None)
    assert y is ids
    assert layer.backward(ctx(), np.zeros(2), None, cache)[0] == [None]


def test_softmax_values_gradient_and_stability():
    layer = make(pb.kSoftmax, "sm", [(3,)])
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    y = layer.forward(ctx(), [x], None)[0]
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(y[0], e / e.sum())
    np.testing.assert_allclose(y[1], [0.5, 0.5, 0.0])
    check_layer(layer, [np.random.default_rng(3).standard_normal((4, 3))])


def test_softmax_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "sm1".*feature dimension'):
        make(pb.kSoftmax, "sm1", [()])
    with pytest.raises(LayerError, match=r'layer "sm2".*num_softmax_per_instance'):
        make(pb.kSoftmax, "sm2", [(4,)], softmax_conf__num_softmax_per_instance=2)


def test_helpers_softmax_and_log_softmax_agree():
    x = np.random.default_rng(4).standard_normal((3, 6)) * 50
    np.testing.assert_allclose(np.exp(neuron.log_softmax(np, x)), neuron.softmax(np, x), atol=1e-15)
