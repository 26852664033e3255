"""Loss layers: metrics against hand computation, gradients against finite differences."""
import math

import numpy as np
import pytest

from engine.layers.base import Context, LayerError
from engine.layers.loss import topk_correct
from engine.proto import job_pb2 as pb
from layercheck import make, rel_err

SCORES = np.array([[1.0, 2.0, 3.0], [2.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
LABELS = np.array([2, 1, 0])



def nll(row, label):
    return -(row[label] - math.log(sum(math.exp(v) for v in row)))


def objective_grad_check(layer, xs, ctx_kw, scale, eps=1e-6):
    """Compare backward's gradient with d/dx [scale * metrics['loss'].sum / B]."""
    b = xs[0].shape[0]

    def objective():
        c = Context(**ctx_kw)
        layer.forward(c, xs, None)
        return scale * c.metrics["loss"][0] / b

    c = Context(**ctx_kw)
    _, _, cache = layer.forward(c, xs, None)
    dxs, dstate = layer.backward(c, np.full((b,) + layer.out_shape, np.nan), None, cache)
    assert dstate is None and all(d is None for d in dxs[1:])
    x = xs[0]
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        lp = objective()
        x[idx] = old - eps
        lm = objective()
        x[idx] = old
        num[idx] = (lp - lm) / (2 * eps)
    assert rel_err(dxs[0], num) < 1e-6
    return dxs[0]


# ------------------------------------------------------------- softmax loss

def test_softmax_loss_metrics_and_output_by_hand():
    layer = make(pb.kSoftmaxLoss, "loss", [(3,), ()])
    assert layer.is_loss and layer.out_shape == (3,)
    c = Context()
    y, state, _ = layer.forward(c, [SCORES.copy(), LABELS], None)
    assert state is None
    e = np.exp(SCORES)
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True))
    expect = sum(nll(r, lab) for r, lab in zip(SCORES, LABELS))
    assert c.metrics["loss"] == [pytest.approx(expect), 3.0]
    assert c.metrics["accuracy"] == [1.0, 3.0]  # only row 0's label is the argmax


def test_softmax_loss_top2_accuracy_and_ties():
    layer = make(pb.kSoftmaxLoss, "loss", [(3,), ()], softmaxloss_conf__topk=2)
    c = Context()
    layer.forward(c, [SCORES.copy(), LABELS], None)
    # row 1: label 1 ties with id 2 behind id 0 -> rank 1, in the top 2; row 2: rank 2
    assert c.metrics["accuracy"] == [2.0, 3.0]
    # the tied id ranked after the lower id: label 2 in row 1 has rank 2
    assert topk_correct(np, SCORES, np.array([1, 2, 1]), 2).tolist() == [True, False, True]
    assert topk_correct(np, np.zeros((2, 4)), np.array([0, 3]), 1).tolist() == [True, False]


def test_top1_is_the_rank_rule_with_ties():
    """k = 1 takes the argmax shortcut; it must agree with the rank rule (ties go to
    the lower id) on scores full of ties."""
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 3, size=(200, 5)).astype(float)
    labels = rng.integers(0, 5, size=200)
    s_lab = scores[np.arange(200), labels][:, None]
    rank = (scores > s_lab).sum(1) + ((scores == s_lab) & (np.arange(5)[None] < labels[:, None])).sum(1)
    got = topk_correct(np, scores, labels, 1)
    assert got.tolist() == (rank < 1).tolist()
    assert 0 < got.sum() < 200


def test_softmax_loss_gradient_by_hand_and_finite_differences():
    layer = make(pb.kSoftmaxLoss, "loss", [(3,), ()], softmaxloss_conf__scale=2.5)
    x = SCORES.copy()
    g = objective_grad_check(layer, [x, LABELS], {}, 2.5)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    p[np.arange(3), LABELS] -= 1
    np.testing.assert_allclose(g, 2.5 * p / 3)


def test_softmax_loss_mask_skips_rows_and_their_bad_labels():
    layer = make(pb.kSoftmaxLoss, "loss", [(3,), ()])
    x = SCORES.copy()
    labels = np.array([2, -1, 0])  # row 1 is padding
    mask = np.array([1.0, 0.0, 1.0])
    c = Context(mask=mask)
    layer.forward(c, [x, labels], None)
    assert c.metrics["loss"] == [pytest.approx(nll(x[0], 2) + nll(x[2], 0)), 2.0]
    assert c.metrics["accuracy"] == [1.0, 2.0]
    g = objective_grad_check(layer, [x, labels], {"mask": mask}, 1.0)
    assert np.all(g[1] == 0)
    assert np.all(g[0] != 0)


def test_softmax_loss_labels_from_aux_and_from_a_sequence():
    layer = make(pb.kSoftmaxLoss, "loss", [(3,), (4,)])
    seq = np.array([[0, 0, 2, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    c = Context(step=2)
    layer.forward(c, [SCORES.copy(), [seq]], None)  # one-to-all source: column `step`
    assert c.metrics["loss"][0] == pytest.approx(sum(nll(r, lab) for r, lab in
                                                     zip(SCORES, LABELS)))
    c = Context(aux=[None, LABELS.astype(np.float64)])  # aux labels win over the data
    layer.forward(c, [SCORES.copy(), np.zeros((3, 7))], None)
    assert c.metrics["accuracy"] == [1.0, 3.0]


def test_softmax_loss_errors_name_the_layer():
    layer = make(pb.kSoftmaxLoss, "sl1", [(3,), ()])
    with pytest.raises(LayerError, match=r'layer "sl1": label 3 is outside \[0, 3\)'):
        layer.forward(Context(), [SCORES.copy(), np.array([0, 3, 1])], None)
    with pytest.raises(LayerError, match=r'layer "sl1": label -2'):
        layer.forward(Context(), [SCORES.copy(), np.array([0, -2, 1])], None)
    with pytest.raises(LayerError, match=r'layer "sl1": labels have shape \(2,\)'):
        layer.forward(Context(), [SCORES.copy(), np.array([0, 1])], None)
    with pytest.raises(LayerError, match=r'layer "sl1": mask has 2 rows'):
        layer.forward(Context(mask=np.ones(2)), [SCORES.copy(), LABELS], None)
    with pytest.raises(LayerError, match=r'layer "sl2".*takes 2 srclayer'):
        make(pb.kSoftmaxLoss, "sl2", [(3,)])
    with pytest.raises(LayerError, match=r'layer "sl3".*topk'):
        make(pb.kSoftmaxLoss, "sl3", [(3,), ()], softmaxloss_conf__topk=4)
    with pytest.raises(LayerError, match=r'layer "sl4".*out_shape \(3, 2\)'):
        make(pb.kSoftmaxLoss, "sl4", [(3, 2), ()])


# ----------------------------------------------------------- euclidean loss

def test_euclidean_loss_metrics_by_hand():
    layer = make(pb.kEuclideanLoss, "euc", [(2,), (2,)])
    p = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    t = np.array([[0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    c = Context()
    y, _, _ = layer.forward(c, [p, t], None)
    assert y is p or np.array_equal(y, p)
    # squared errors per row: 1, 2, 8
    assert c.metrics["loss"] == [pytest.approx(0.5 * (1 + 2 + 8)), 3.0]
    assert c.metrics["mse"] == [pytest.approx(11.0), 6.0]
    c = Context(mask=np.array([1.0, 1.0, 0.0]))
    layer.forward(c, [p, t], None)
    assert c.metrics["loss"] == [pytest.approx(1.5), 2.0]
    assert c.metrics["mse"] == [pytest.approx(3.0), 4.0]


def test_euclidean_loss_gradient_with_scale_and_mask():
    layer = make(pb.kEuclideanLoss, "euc", [(3,), (3,)], euclideanloss_conf__scale=0.5)
    rng = np.random.default_rng(0)
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    mask = np.array([1.0, 0.0, 1.0, 1.0])
    g = objective_grad_check(layer, [p, t], {"mask": mask}, 0.5)
    np.testing.assert_allclose(g, 0.5 * (p - t) * mask[:, None] / 4)


def test_euclidean_loss_vector_target_for_one_output():
    layer = make(pb.kEuclideanLoss, "euc", [(1,), ()])
    c = Context()
    layer.forward(c, [np.array([[1.0], [2.0]]), np.array([0.0, 4.0])], None)
    assert c.metrics["loss"] == [pytest.approx(0.5 * (1 + 4)), 2.0]
    assert c.metrics["mse"] == [pytest.approx(5.0), 2.0]


def test_euclidean_loss_errors_name_the_layer():
    layer = make(pb.kEuclideanLoss, "eu1", [(2,), (2,)])
    with pytest.raises(LayerError, match=r'layer "eu1": target has shape \(3, 3\)'):
        layer.forward(Context(), [np.zeros((3, 2)), np.zeros((3, 3))], None)
    with pytest.raises(LayerError, match=r'layer "eu1": source 0 gives nothing'):
        layer.forward(Context(), [None, np.zeros((3, 2))], None)
    with pytest.raises(LayerError, match=r'layer "eu2".*takes 2 srclayer'):
        make(pb.kEuclideanLoss, "eu2", [(2,)])
