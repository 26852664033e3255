"""Every layer family and whole nets on each available backend, compared with NumPy.

NumPy always runs; CuPy runs when it is installed and finds a GPU, and is skipped
cleanly otherwise. On a GPU machine:

    pip install -e '.[test,gpu]' && python -m pytest tests/test_backends.py -v

runs every case on CuPy and requires its losses, gradients and updated params to
equal NumPy's within float32 tolerance (both in float32, same seed and data).
"""
from __future__ import annotations

import numpy as np
import pytest

import test_gradcheck as gc
from engine.backend import BackendError, make_backend, to_host
from engine.config import Phase, load_job
from engine.net import Net
from engine.planner import make_worker
from engine.workspace import net_info
from engine.unroll import unroll
from engine.updaters import Updater


def _gpu_ok() -> bool:
    try:
        make_backend(0)
        return True
    except BackendError:
        return False


GPU = _gpu_ok()
BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(
    not GPU, reason="CuPy with a usable GPU is not available"))]
UPDATER = ('updater { type: kAdam learning_rate { type: kFixed base_lr: 0.01 } '
           'clip_low: -1 clip_high: 1 }')


def run(tmp_path, text, backend, executor, steps=2, dtype=np.float32):
    """(losses, last gradients, params) of ``steps`` training steps on "numpy" or on GPU 0
    ("cupy": CuPy, or the stand-in where tests/standin is installed as cupy)."""
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    be = make_backend(None if backend == "numpy" else 0, dtype)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), be, net_info(path, tmp_path / "ws", 0), seed=1)
    w, _ = make_worker(net, seed=1, executor=executor)
    up = Updater(job.updater, net.params, be.xp)
    losses, grads = [], {}
    for step in range(steps):
        m = w.run_batch(train=True)
        losses.append(w.host_values(m["objective"][0])[0])
        grads = {p.name: to_host(p.grad).copy() for p in net.params}
        up.update(step)
    params = {p.name: to_host(p.data).copy() for p in net.params}
    return losses, grads, params


def char_gru(tmp_path):
    return gc.job_text(gc.char_layers(gc.char_data(tmp_path)) + gc.rec_conf("gru", "rec", "onehot", 8)
                       + gc.ip_loss("rec", gc.vocab_size()), extra=UPDATER)


def char_lstm_stacked(tmp_path):
    return gc.job_text(gc.char_layers(gc.char_data(tmp_path)) + gc.rec_conf("lstm", "l1", "onehot", 6)
                       + gc.rec_conf("rnn", "l2", "l1", 5) + gc.ip_loss("l2", gc.vocab_size()),
                       extra=UPDATER)


def many_to_one(tmp_path):
    path, *_ = gc.masked_store(tmp_path)
    return gc.many_to_one_text(path, "lstm").replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER)


def every_layer(tmp_path):
    rng = np.random.default_rng(4)
    path = gc.save_npz(tmp_path / "e.npz", x=rng.standard_normal((6, 4, 6)),
                       y=rng.integers(0, 3, size=6))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 3 }} }}\n'
              'layer { name: "slice" type: kSlice srclayers: "data" slice_conf { slice_dim: 1 num_slices: 2 } }\n'
              'layer { name: "sig" type: kSigmoid srclayers: "slice" }\n'
              'layer { name: "st" type: kSTanh srclayers: "slice" }\n'
              'layer { name: "cat" type: kConcate srclayers: "sig" srclayers: "st" concate_conf { concate_dim: 1 } }\n'
              'layer { name: "ip0" type: kInnerProduct srclayers: "cat" innerproduct_conf { num_output: 5 } }\n'
              'layer { name: "relu" type: kReLU srclayers: "ip0" relu_conf { negative_slope: 0.1 } }\n'
              'layer { name: "act" type: kActivation srclayers: "relu" activation_conf { type: TANH } }\n'
              'layer { name: "dummy" type: kDummy srclayers: "act" }\n'
              + gc.rec_conf("gru", "rec", "dummy", 4)
              + 'layer { name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "rec" '
                'unroll_conn_type: kUnrollFirstToLast innerproduct_conf { num_output: 3 } }\n'
                'layer { name: "sm" type: kSoftmax unroll_len: 1 srclayers: "ip" }\n'
                'layer { name: "acc" type: kAccuracy unroll_len: 1 srclayers: "ip" srclayers: "data" }\n'
                'layer { name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" srclayers: "data" }\n')
    return gc.job_text(layers, unroll=4, extra=UPDATER)


def embedding_euclid(tmp_path):
    rng = np.random.default_rng(6)
    path = gc.save_npz(tmp_path / "t.npz", x=rng.integers(0, 7, size=(6, 5)),
                       y=rng.standard_normal((6, 5)), lengths=np.array([5, 3, 4, 5, 2, 1]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 3 }} }}\n'
              'layer { name: "emb" type: kEmbedding srclayers: "data" '
              'embedding_conf { vocab_size: 7 feature_dim: 4 } }\n'
              + gc.rec_conf("rnn", "rec", "emb", 4)
              + 'layer { name: "out" type: kInnerProduct srclayers: "rec" innerproduct_conf { num_output: 1 } }\n'
                'layer { name: "loss" type: kEuclideanLoss srclayers: "out" srclayers: "data" '
                'euclideanloss_conf { target: kLabels } }\n')
    return gc.job_text(layers, unroll=5, extra=UPDATER)


def bidirectional(tmp_path):
    """Masked sequences through a forward and a kBackward GRU with recurrent_bias."""
    path, *_ = gc.masked_store(tmp_path)
    return gc.bidir_many_to_one_text(path, "gru-hb").replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER)


def the_rest(tmp_path):
    """The layer types no other net here has: kCSVInput (a textfile store), kDropout,
    kSplit, kMGU and kCSVOutput."""
    rng = np.random.default_rng(8)
    lines = [",".join([str(int(rng.integers(0, 3)))] + [f"{v:.6f}" for v in rng.standard_normal(12)])
             for _ in range(6)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    layers = (f'layer {{ name: "data" type: kCSVInput store_conf {{ backend: "textfile" '
              f'path: "{tmp_path / "d.csv"}" batchsize: 3 shape: 4 shape: 3 }} }}\n'
              'layer { name: "drop" type: kDropout srclayers: "data" dropout_conf { dropout_ratio: 0.3 } }\n'
              'layer { name: "split" type: kSplit srclayers: "drop" split_conf { num_splits: 2 } }\n'
              'layer { name: "mgu" type: kMGU srclayers: "split" mgu_conf { dim_hidden: 4 } }\n'
              'layer { name: "st" type: kSTanh srclayers: "split" }\n'
              'layer { name: "cat" type: kConcate srclayers: "mgu" srclayers: "st" concate_conf { concate_dim: 1 } }\n'
              'layer { name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "cat" '
              'unroll_conn_type: kUnrollFirstToLast innerproduct_conf { num_output: 3 } }\n'
              f'layer {{ name: "out" type: kCSVOutput unroll_len: 1 srclayers: "ip" '
              f'csvoutput_conf {{ path: "{tmp_path / "out.csv"}" }} }}\n'
              'layer { name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" srclayers: "data" }\n')
    return gc.job_text(layers, unroll=4, extra=UPDATER)


NETS = {"char-gru": char_gru, "the-rest": the_rest, "stacked-lstm-rnn": char_lstm_stacked, "many-to-one": many_to_one,
        "every-layer": every_layer, "embedding-euclid": embedding_euclid,
        "bidirectional-gru-hb": bidirectional}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("executor", ["reference", "auto"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_backend_matches_numpy(tmp_path, backend, executor, net):
    text = NETS[net](tmp_path)
    ref = run(tmp_path, text, "numpy", "reference")
    got = run(tmp_path, text, backend, executor)
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-4, atol=1e-6)
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=2e-3, atol=2e-5, err_msg=f"grad {k}")
        np.testing.assert_allclose(got[2][k], ref[2][k], rtol=2e-3, atol=2e-5, err_msg=f"param {k}")


def test_gpu_request_without_gpu_is_a_clear_error():
    if GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="GPU 0"):
        make_backend(0)
