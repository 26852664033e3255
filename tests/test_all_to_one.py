"""kUnrollAllToOne: every copy of a source into a one-copy layer, joined along the features
in time order (TMVA/Keras "flatten the time steps into one dense layer")."""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine.backend import make_backend
from engine.config import ConfigError, Phase, load_job
from engine.net import Net
from engine.planner import PlannedWorker, make_worker
from engine.unroll import unroll
from engine.workspace import net_info
from test_planner import UPDATER, assert_same

T, B, F = 4, 3, 2


def flat_text(path, T=T, ip_len=1) -> str:
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: {B} }} }}\n'
              + gc.rec_conf("lstm", "rec", "data", 3)
              + f'layer {{ name: "flat" type: kInnerProduct unroll_len: {ip_len} srclayers: "rec" '
                "unroll_conn_type: kUnrollAllToOne innerproduct_conf { num_output: 2 } }\n"
                'layer { name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "flat" srclayers: "data" '
                "unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollFirstToLast }\n")
    return gc.job_text(layers, unroll=T)


def store(tmp_path):
    rng = np.random.default_rng(31)
    return gc.save_npz(tmp_path / "seq.npz", x=rng.standard_normal((6, T, F)),
                       y=rng.integers(0, 2, size=6))


def test_unrolls_every_copy_into_the_one_copy():
    from engine.config import normalise, parse_job, validate
    text = ('name: "t" neuralnet { unroll_len: 3 layer { name: "a" type: kDummy } '
            'layer { name: "b" type: kDummy unroll_len: 1 srclayers: "a" unroll_conn_type: kUnrollAllToOne } }')
    job = parse_job(text, "job.conf")
    normalise(job, "job.conf")
    validate(job, "job.conf")
    g = unroll(job.neuralnet, Phase.TRAIN, where="job.conf").graph
    assert {(u, v, d["conn"]) for u, v, d in g.edges(data=True)} == \
        {(f"{j}#a", "0#b", "kUnrollAllToOne") for j in range(3)}


def test_a_reader_of_several_copies_is_one_line(tmp_path):
    job = load_job(gc.write_job(tmp_path, flat_text(store(tmp_path), ip_len=2)))
    with pytest.raises(ConfigError, match=r'layer "flat": it reads "rec" kUnrollAllToOne.*set its '
                                          r"unroll_len: 1") as e:
        unroll(job.neuralnet, Phase.TRAIN)
    assert "\n" not in str(e.value)


def test_the_one_copy_reads_the_copies_joined_in_time_order(tmp_path):
    net, w = gc.build(tmp_path, flat_text(store(tmp_path)))
    flat = net.layers["flat"]
    W, b = flat.params["w"].data, flat.params["b"].data
    assert W.shape == (2, T * 3)
    w.run_batch(train=False)
    joined = np.concatenate([w.outs[f"{t}#rec"] for t in range(T)], axis=1)
    np.testing.assert_allclose(w.outs["0#flat"], joined @ W.T + b, rtol=1e-12)


def test_gradients_by_finite_differences(tmp_path):
    net, w = gc.build(tmp_path, flat_text(store(tmp_path)))
    gc.assert_grads_ok(net, w)


def test_planned_equals_reference(tmp_path):
    text = flat_text(store(tmp_path)).replace("train_one_batch { alg: kBPTT }",
                                              "train_one_batch { alg: kBPTT }\n" + UPDATER)
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), net_info(path, tmp_path, 0))
    w, note = make_worker(net)
    assert type(w) is PlannedWorker, note
    assert_same(tmp_path, text)
