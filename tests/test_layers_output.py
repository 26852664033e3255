"""Output layers: accuracy, argsort / sampling, character and CSV writers."""
import os

import numpy as np
import pytest

from engine.layers.base import REGISTRY, Context, LayerError
from engine.proto import job_pb2 as pb
from layercheck import FakeSrc


def build(layer_type, name, srcs, info=None, **conf_fields):
    conf = pb.LayerProto(name=name, type=layer_type)
    for path, value in conf_fields.items():
        msg_name, field = path.split("__")
        setattr(getattr(conf, msg_name), field, value)
    layer = REGISTRY[layer_type](conf, np, np.float64)
    layer.info = dict(info or {})
    layer.setup(srcs)
    return layer


def srcs(*shapes):
    return [FakeSrc(s) for s in shapes]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------- accuracy

SCORES = np.array([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.9, 0.1]])


def test_accuracy_top1_and_top2_by_hand():
    acc = build(pb.kAccuracy, "acc", srcs((4,), ()))
    assert not acc.differentiable and acc.out_shape == ()
    labels = np.array([1, 2, 3])
    c = Context()
    y, _, _ = acc.forward(c, [SCORES, labels], None)
    np.testing.assert_array_equal(y, [1.0, 0.0, 0.0])
    assert c.metrics["accuracy"] == [1.0, 3.0]
    acc2 = build(pb.kAccuracy, "acc2", srcs((4,), ()), argsort_conf__topk=2)
    c = Context()
    y, _, _ = acc2.forward(c, [SCORES, labels], None)
    np.testing.assert_array_equal(y, [1.0, 1.0, 1.0])
    c = Context(mask=np.array([1.0, 0.0, 1.0]))
    y, _, _ = acc.forward(c, [SCORES, labels], None)
    np.testing.assert_array_equal(y, [1.0, 0.0, 0.0])
    assert c.metrics["accuracy"] == [1.0, 2.0]
    assert acc.backward(c, y, None, None) == ([None, None], None)


def test_accuracy_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "acc1".*topk'):
        build(pb.kAccuracy, "acc1", srcs((4,), ()), argsort_conf__topk=5)
    acc = build(pb.kAccuracy, "acc2", srcs((4,), ()))
    with pytest.raises(LayerError, match=r'layer "acc2": label 4'):
        acc.forward(Context(), [SCORES, np.array([0, 4, 1])], None)


# ------------------------------------------------------------------ argsort

def test_argsort_top_k_order_and_argmax():
    top3 = build(pb.kArgSort, "top", srcs((4,)), argsort_conf__topk=3)
    assert top3.out_shape == (3,)
    s = np.array([[0.3, 0.9, -1.0, 0.5], [2.0, 2.0, 1.0, 3.0]])
    ids, _, _ = top3.forward(Context(), [s], None)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [[1, 3, 0], [3, 0, 1]])  # ties: lower id first
    top1 = build(pb.kArgSort, "arg", srcs((4,)))
    assert top1.out_shape == ()
    ids, _, _ = top1.forward(Context(), [s], None)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [1, 3])
    assert not top1.differentiable
    assert top1.backward(Context(), None, None, None) == ([None], None)


def test_argsort_sampling_frequencies_follow_softmax_over_temperature():
    layer = build(pb.kArgSort, "sample", srcs((5,)), argsort_conf__temperature=0.7)
    assert layer.temperature == pytest.approx(0.7) and layer.out_shape == ()
    s = np.array([0.2, 1.0, -0.5, 0.8, 0.0])
    n = 20000
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(7)), [np.tile(s, (n, 1))], None)
    assert ids.shape == (n,) and ids.dtype == np.int64
    freq = np.bincount(ids, minlength=5) / n
    np.testing.assert_allclose(freq, softmax(s / float(np.float32(0.7))), atol=0.02)
    # temperature set by a sampler after setup; a low one concentrates on the argmax
    layer.temperature = 0.05
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(8)), [np.tile(s, (2000, 1))], None)
    assert np.mean(ids == 1) > 0.95
    layer.temperature = 0.0
    ids, _, _ = layer.forward(Context(), [np.tile(s, (3, 1))], None)
    np.testing.assert_array_equal(ids, [1, 1, 1])


def test_argsort_sampling_restricted_to_top_k():
    layer = build(pb.kArgSort, "sample", srcs((6,)))
    layer.temperature = 5.0  # nearly uniform without the restriction
    layer.sample_topk = 2
    s = np.array([0.0, 0.1, 3.0, 0.2, 2.9, -1.0])
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(3)), [np.tile(s, (5000, 1))], None)
    assert set(np.unique(ids)) == {2, 4}
    freq = np.mean(ids == 2)
    assert abs(freq - 1 / (1 + np.exp(-0.1 / 5.0))) < 0.02
    layer.sample_topk = 0
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(3)), [np.tile(s, (5000, 1))], None)
    assert len(np.unique(ids)) == 6


def test_argsort_reads_probabilities_from_a_softmax_source():
    src = FakeSrc((3,), outputs_probabilities=True)
    layer = build(pb.kArgSort, "sample", [src], argsort_conf__temperature=1.0)
    assert layer.probabilities
    p = np.array([0.6, 0.3, 0.1])
    n = 20000
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(5)), [np.tile(p, (n, 1))], None)
    # T = 1 on log p gives back p itself (softmax of p would be much flatter)
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / n, p, atol=0.02)
    layer.temperature = 0.5  # softmax(log p / 0.5) = p^2 / sum p^2
    ids, _, _ = layer.forward(Context(rng=np.random.default_rng(6)), [np.tile(p, (n, 1))], None)
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / n, p ** 2 / np.sum(p ** 2),
                               atol=0.02)


def test_argsort_errors_name_the_layer():
    with pytest.raises(LayerError, match=r'layer "as1".*topk'):
        build(pb.kArgSort, "as1", srcs((3,)), argsort_conf__topk=4)
    with pytest.raises(LayerError, match=r'layer "as2".*temperature'):
        build(pb.kArgSort, "as2", srcs((3,)), argsort_conf__temperature=-1.0)
    with pytest.raises(LayerError, match=r'layer "as3".*out_shape'):
        build(pb.kArgSort, "as3", srcs(()))
    layer = build(pb.kArgSort, "as4", srcs((3,)), argsort_conf__temperature=1.0)
    with pytest.raises(LayerError, match=r'layer "as4".*rng'):
        layer.forward(Context(rng=None), [np.zeros((2, 3))], None)


# ---------------------------------------------------------- char rnn output

def test_char_output_maps_ids_and_appends_to_a_file(tmp_path):
    layer = build(pb.kCharRNNOutput, "chars", srcs(()),
                  info={"vocab": list("abc\n"), "job_dir": str(tmp_path)},
                  char_rnn_output_conf__path="out/sample.txt")
    assert layer.out_shape == () and not layer.differentiable
    for ids in ([0, 1], [2, 2], [3, 0]):
        y, _, _ = layer.forward(Context(), [np.array(ids)], None)
        np.testing.assert_array_equal(y, ids)
    assert "".join(layer.text) == "ac\n"
    assert ["".join(t) for t in layer.texts] == ["ac\n", "bca"]
    path = tmp_path / "out" / "sample.txt"
    assert path.read_text(encoding="utf-8") == "ac\n"
    layer.forward(Context(), [np.array([[1, 0], [0, 1]])], None)  # top-k input: best column
    assert path.read_text(encoding="utf-8") == "ac\nb"


def test_char_output_reads_a_vocabulary_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("xyé", encoding="utf-8")
    layer = build(pb.kCharRNNOutput, "chars", srcs(()),
                  info={"vocab": list("abc"), "job_dir": str(tmp_path)},
                  char_rnn_output_conf__vocab_path="vocab.txt")
    layer.forward(Context(), [np.array([2])], None)
    layer.forward(Context(), [np.array([0])], None)
    assert layer.text == ["é", "x"]


def test_char_output_errors_name_the_layer(tmp_path):
    with pytest.raises(LayerError, match=r'layer "co1": no vocabulary'):
        build(pb.kCharRNNOutput, "co1", srcs(()))
    with pytest.raises(LayerError, match=r'layer "co2".*vocab_path'):
        build(pb.kCharRNNOutput, "co2", srcs(()), info={"job_dir": str(tmp_path)},
              char_rnn_output_conf__vocab_path="missing.txt")
    layer = build(pb.kCharRNNOutput, "co3", srcs(()), info={"vocab": list("ab")})
    with pytest.raises(LayerError, match=r'layer "co3": id 2 is outside'):
        layer.forward(Context(), [np.array([2])], None)


# ---------------------------------------------------------------- csv output

def test_csv_output_appends_one_line_per_row(tmp_path):
    layer = build(pb.kCSVOutput, "pred", srcs((2, 2)), info={"workspace": str(tmp_path)})
    x = np.array([[[0.1, 2.0], [-3.5, 1e-20]], [[1.0, 0.0], [0.25, 7.0]]])
    y, _, _ = layer.forward(Context(), [x], None)
    assert y is x
    path = tmp_path / "pred.csv"
    lines = path.read_text().splitlines()  # flushed before close
    assert lines == ["0.1,2.0,-3.5,1e-20", "1.0,0.0,0.25,7.0"]
    np.testing.assert_array_equal(np.loadtxt(path, delimiter=","), x.reshape(2, 4))
    layer.forward(Context(), [np.array([[[1, 2], [3, 4]]])], None)
    layer.close()
    assert path.read_text().splitlines()[2] == "1,2,3,4"


def test_csv_output_path_relative_to_job_dir(tmp_path):
    layer = build(pb.kCSVOutput, "pred", srcs((1,)),
                  info={"workspace": str(tmp_path / "ws"), "job_dir": str(tmp_path)},
                  csvoutput_conf__path="res/out.csv")
    layer.forward(Context(), [np.array([[1.5], [2.5]])], None)
    layer.close()
    assert (tmp_path / "res" / "out.csv").read_text() == "1.5\n2.5\n"
    assert not os.path.exists(tmp_path / "ws")


# ------------------------------------------------ SINGA's field placement, bytes

def test_char_output_takes_singas_char_rnn_conf_and_a_byte_vocabulary(tmp_path):
    """SINGA's sample.conf puts char_rnn_conf { vocab_path } on kCharRNNOutput; a vocabulary
    that is not UTF-8 is read as bytes: the file receives the raw bytes, the report
    decodes them (U+FFFD where they do not decode)."""
    vocab = bytes([0x9f, 0xc3, ord("a"), 0xa9, ord("\r"), ord("\n")])
    (tmp_path / "vocab.txt").write_bytes(vocab)
    layer = build(pb.kCharRNNOutput, "chars", srcs(()), info={"job_dir": str(tmp_path)},
                  char_rnn_conf__vocab_path="vocab.txt", char_rnn_output_conf__path="out.txt")
    assert layer.encoding == "bytes" and len(layer.vocab) == 6
    for i in (2, 1, 3, 0, 4, 5):
        layer.forward(Context(), [np.array([i])], None)
    assert (tmp_path / "out.txt").read_bytes() == b"a\xc3\xa9\x9f\r\n"
    assert layer.report() == "a\u00e9\ufffd\r\n"
    with pytest.raises(LayerError, match=r'layer "c2": char_rnn_output_conf.vocab_path .* and '
                                         r"char_rnn_conf.vocab_path .* differ"):
        build(pb.kCharRNNOutput, "c2", srcs(()), info={"job_dir": str(tmp_path)},
              char_rnn_conf__vocab_path="vocab.txt", char_rnn_output_conf__vocab_path="v2.txt")


def test_csv_output_takes_singas_store_conf_path(tmp_path):
    layer = build(pb.kCSVOutput, "pred", srcs((1,)),
                  info={"workspace": str(tmp_path / "ws"), "job_dir": str(tmp_path)},
                  store_conf__path="res/out.csv", store_conf__backend="textfile")
    layer.forward(Context(), [np.array([[1.5], [2.5]])], None)
    layer.close()
    assert (tmp_path / "res" / "out.csv").read_text() == "1.5\n2.5\n"
    with pytest.raises(LayerError, match=r'layer "p2": store_conf.backend "kvfile": kCSVOutput '
                                         r"writes a textfile"):
        build(pb.kCSVOutput, "p2", srcs((1,)), store_conf__path="x", store_conf__backend="kvfile")
