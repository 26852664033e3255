"""A recurrence built from ordinary layers: a layer reads a later layer's (or its own)
output of the previous step through ``shift: 1``. The folded graph has a cycle, the
unrolled one does not; the net is accepted when every cycle has a positive shift, and the
kConcate + kInnerProduct + tanh loop computes exactly what kRNN computes."""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine.config import ConfigError, Phase, load_job
from engine.unroll import unroll

T, B, F, H = 4, 3, 2, 3


def store(tmp_path):
    rng = np.random.default_rng(11)
    return gc.save_npz(tmp_path / "seq.npz", x=rng.standard_normal((6, T, F)),
                       y=rng.standard_normal((6, T)))


def head(src: str) -> str:
    return (f'layer {{ name: "out" type: kInnerProduct srclayers: "{src}" '
            f"innerproduct_conf {{ num_output: 1 }} }}\n"
            'layer { name: "loss" type: kEuclideanLoss srclayers: "out" srclayers: "data" '
            "euclideanloss_conf { target: kLabels } }\n")


def loop_text(path) -> str:
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              'layer { name: "cat" type: kConcate srclayers: "data" srclayers: "h" shift: 0 shift: 1 '
              "concate_conf { concate_dim: 1 } }\n"
              f'layer {{ name: "ip" type: kInnerProduct srclayers: "cat" innerproduct_conf {{ num_output: {H} }} }}\n'
              'layer { name: "h" type: kActivation srclayers: "ip" activation_conf { type: TANH } }\n'
              + head("h"))
    return gc.job_text(layers, unroll=T)


def rnn_text(path) -> str:
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              + gc.rec_conf("rnn", "h", "data", H) + head("h"))
    return gc.job_text(layers, unroll=T)


def test_the_unrolled_loop_reads_the_previous_copy(tmp_path):
    job = load_job(gc.write_job(tmp_path, loop_text(store(tmp_path))))
    g = unroll(job.neuralnet, Phase.TRAIN).graph
    assert {u for u in g.predecessors("0#cat")} == {"0#data"}
    for i in range(1, T):
        assert set(g.predecessors(f"{i}#cat")) == {f"{i}#data", f"{i - 1}#h"}
        assert g.edges[f"{i - 1}#h", f"{i}#cat"]["shift"] == 1


def test_concat_innerproduct_tanh_loop_equals_krnn(tmp_path):
    path = store(tmp_path)
    (tmp_path / "l").mkdir()
    (tmp_path / "r").mkdir()
    net_l, w_l = gc.build(tmp_path / "l", loop_text(path))
    net_r, w_r = gc.build(tmp_path / "r", rnn_text(path))
    ip, rnn = net_l.layers["ip"], net_r.layers["h"]
    W, b = ip.params["w"].data, ip.params["b"].data
    rnn.params["w_hx"].data[...] = W[:, :F]
    rnn.params["w_hh"].data[...] = W[:, F:]
    rnn.params["b"].data[...] = b
    net_r.layers["out"].params["w"].data[...] = net_l.layers["out"].params["w"].data
    net_r.layers["out"].params["b"].data[...] = net_l.layers["out"].params["b"].data
    m_l, m_r = w_l.run_batch(train=True), w_r.run_batch(train=True)
    np.testing.assert_array_equal(w_l.outs["0#data"], w_r.outs["0#data"])
    for t in range(T):
        np.testing.assert_allclose(w_l.outs[f"{t}#h"], w_r.outs[f"{t}#h"], rtol=1e-12, atol=1e-14)
    assert m_l["loss"][0] == pytest.approx(m_r["loss"][0], rel=1e-12)
    gW = ip.params["w"].grad
    np.testing.assert_allclose(gW[:, :F], rnn.params["w_hx"].grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gW[:, F:], rnn.params["w_hh"].grad, rtol=1e-10, atol=1e-13)


def test_loop_gradients_by_finite_differences(tmp_path):
    net, w = gc.build(tmp_path, loop_text(store(tmp_path)))
    gc.assert_grads_ok(net, w)


def test_a_layer_may_list_itself_with_a_shift(tmp_path):
    """Config level: a layer reading its own copy i-1 is a loop with a positive shift."""
    path = store(tmp_path)
    own = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
           'layer { name: "a" type: kConcate srclayers: "data" srclayers: "a" shift: 0 shift: 1 '
           "concate_conf { concate_dim: 1 } }\n")
    job = load_job(gc.write_job(tmp_path, gc.job_text(own, unroll=T)))
    g = unroll(job.neuralnet, Phase.TRAIN).graph
    assert {(u, v) for u, v in g.in_edges("2#a")} == {("2#data", "2#a"), ("1#a", "2#a")}
    assert g.edges["1#a", "2#a"]["shift"] == 1


def test_reading_itself_without_a_shift_is_one_line(tmp_path):
    path = store(tmp_path)
    text = gc.job_text(f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
                       'layer { name: "a" type: kConcate srclayers: "data" srclayers: "a" '
                       "concate_conf { concate_dim: 1 } }\n", unroll=T)
    with pytest.raises(ConfigError, match=r'layer "a": lists itself.*shift >= 1') as e:
        load_job(gc.write_job(tmp_path, text))
    assert "\n" not in str(e.value)


def test_a_loop_without_a_shift_is_a_cycle(tmp_path):
    text = loop_text(store(tmp_path)).replace("shift: 0 shift: 1", "")
    job = load_job(gc.write_job(tmp_path, text))
    with pytest.raises(ConfigError, match=r"cycle: .*#h.*#cat"):
        unroll(job.neuralnet, Phase.TRAIN)


def test_a_loop_whose_width_never_settles_is_one_line(tmp_path):
    path = store(tmp_path)
    text = gc.job_text(f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
                       'layer { name: "a" type: kConcate srclayers: "data" srclayers: "a" shift: 0 shift: 1 '
                       "concate_conf { concate_dim: 1 } }\n" + head("a"), unroll=T)
    with pytest.raises(ConfigError, match=r'layer "a" is read with a delay.*does not settle') as e:
        gc.build(tmp_path, text)
    assert "\n" not in str(e.value)
