"""Whole-net gradient checks: the BPTT worker's gradients against finite differences.

Every test builds a small float64 net from a job text (data written into
tmp_path), checks every param with engine.gradcheck.check and asserts the worst
relative error of each param is below the checker's default tolerance. The
params are first redrawn from U(-0.6, 0.6) so that gates and activations work
away from their linear regime. The last tests prove the checker fails when a
gradient is wrong, in-process and through its CLI (exit status 1).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cellkinds as ck
from engine import gradcheck
from engine.config import load_job
from engine.proto import job_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4  # the checker's default --tol

# ------------------------------------------------------------------ helpers

TEXT = ("the cat ate a bad bee; a tea cab ebbed at the deck.\n" * 4)


def job_text(layers: str, unroll: int = 5, name: str = "gc", extra: str = "") -> str:
    return (f'name: "{name}"\ntrain_one_batch {{ alg: kBPTT }}\n{extra}\n'
            f"neuralnet {{\n  unroll_len: {unroll}\n{layers}\n}}\n")


def write_job(tmp_path, text: str, fname: str = "job.conf") -> pathlib.Path:
    p = tmp_path / fname
    p.write_text(text, encoding="utf-8")
    return p


def build(tmp_path, text: str, scale: float = 0.6, seed: int = 0, executor: str = "reference"):
    """(net, worker) of the job text, params redrawn from U(-scale, scale)."""
    path = write_job(tmp_path, text)
    job = load_job(path)
    net, w = gradcheck.build(job, str(path), seed=seed, workspace=tmp_path / "ws",
                             executor=executor)
    rng = np.random.default_rng(1234 + seed)
    for p in net.params:
        p.data[...] = rng.uniform(-scale, scale, p.data.shape)
    assert net.dtype == np.float64
    return net, w


def assert_grads_ok(net, w, expect_params=None):
    worst = gradcheck.check(net, w)
    assert worst, "no params were checked"
    if expect_params is not None:
        assert sorted(worst) == sorted(expect_params)
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"params above tolerance {TOL}: {bad}"
    # every param takes part: its analytic gradient (left by check) is not all zeros
    dead = [p.name for p in net.params if not np.abs(p.grad).max() > 0]
    assert not dead, f"params with an all-zero gradient: {dead}"
    return worst


def char_data(tmp_path) -> str:
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


def vocab_size() -> int:
    return len(set(TEXT))


def rec_conf(kind: str, name: str, src: str, hidden: int, extra: str = "",
             conf_extra: str = "") -> str:
    """A recurrent layer; ``kind`` any cell or variant of tests/cellkinds.py (gru, gru-hb,
    lstm, rnn, rnn-relu, mgu, ...); ``conf_extra`` goes inside its conf (e.g.
    "direction: kBackward")."""
    return (f'layer {{ name: "{name}" type: {ck.type_name(kind)} srclayers: "{src}" {extra} '
            f"{ck.conf_text(kind, hidden, conf_extra)} }}\n")


def bidir_level(kind: str, name: str, src: str, hidden: int, extra: str = "") -> str:
    """A bidirectional level: ``<name>_f`` (forward) and ``<name>_b`` (kBackward) over
    ``src``, joined by the kConcate ``<name>`` (features, forward first)."""
    return (rec_conf(kind, f"{name}_f", src, hidden, extra)
            + rec_conf(kind, f"{name}_b", src, hidden, extra, conf_extra="direction: kBackward")
            + f'layer {{ name: "{name}" type: kConcate srclayers: "{name}_f" srclayers: "{name}_b" '
              f"concate_conf {{ concate_dim: 1 }} }}\n")


def bidir_many_to_one_text(path, kind, T=5, batch=3, classes=3, hidden=4) -> str:
    """Lasagne's bidirectional read-out: the forward layer's last copy (first-to-last: with
    masks, its state at each sequence's last valid step) and the backward layer's copy 0
    (one-to-one into one copy), concatenated, into a classifier."""
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: {batch} }} }}\n'
              + rec_conf(kind, "fwd", "data", hidden)
              + rec_conf(kind, "bwd", "data", hidden, conf_extra="direction: kBackward")
              + 'layer { name: "cat" type: kConcate unroll_len: 1 srclayers: "fwd" srclayers: "bwd" '
                "unroll_conn_type: kUnrollFirstToLast unroll_conn_type: kUnrollOneToOne "
                "concate_conf { concate_dim: 1 } }\n"
              + f'layer {{ name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "cat" '
                f"innerproduct_conf {{ num_output: {classes} }} }}\n"
                f'layer {{ name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" '
                f'srclayers: "data" unroll_conn_type: kUnrollOneToOne '
                f"unroll_conn_type: kUnrollFirstToLast }}\n")
    return job_text(layers, unroll=T)


def char_layers(path: str, batch: int = 2, unroll: int = 5) -> str:
    return (f'layer {{ name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf {{ path: "{path}" '
            f"batchsize: {batch} unroll_len: {unroll} }} }}\n"
            'layer { name: "onehot" type: kOneHot srclayers: "data" '
            "unroll_conn_type: kUnrollOneToAll }\n"
            'layer { name: "label" type: kRNNLabel srclayers: "data" '
            "unroll_conn_type: kUnrollOneToAll }\n")


def ip_loss(src: str, n_out: int, labels: str = "label", ip_extra: str = "",
            loss_extra: str = "") -> str:
    return (f'layer {{ name: "ip" type: kInnerProduct srclayers: "{src}" {ip_extra} '
            f"innerproduct_conf {{ num_output: {n_out} }} }}\n"
            f'layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "{labels}" '
            f"{loss_extra} }}\n")


def save_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


# ------------------------------------------------------------- char-rnn nets

@pytest.mark.parametrize("executor", ["reference", "planned"])
@pytest.mark.parametrize("kind", list(ck.VARIANTS))
def test_char_rnn(tmp_path, kind, executor):
    """Every cell's BPTT gradients over 5 steps, from both executors' backward passes."""
    text = job_text(char_layers(char_data(tmp_path)) + rec_conf(kind, "rec", "onehot", 4)
                    + ip_loss("rec", vocab_size()))
    net, w = build(tmp_path, text, executor=executor)
    assert len(net.nodes) == 1 + 5 * 5  # data + 5 copies of onehot, label, rec, ip, loss
    worst = assert_grads_ok(net, w)
    assert any(k.startswith("rec/") for k in worst)


def test_stacked_gru(tmp_path):
    text = job_text(char_layers(char_data(tmp_path), unroll=4)
                    + rec_conf("gru", "gru1", "onehot", 4)
                    + rec_conf("gru", "gru2", "gru1", 3)
                    + ip_loss("gru2", vocab_size()), unroll=4)
    net, w = build(tmp_path, text)
    worst = assert_grads_ok(net, w)
    assert sum(k.startswith("gru2/") for k in worst) == 9
    assert sum(k.startswith("gru1/") for k in worst) == 9


def test_gru_without_bias_and_dropout(tmp_path):
    """Dropout between two layers: the checker replays the same masks every forward."""
    layers = (char_layers(char_data(tmp_path))
              + 'layer { name: "gru" type: kGRU srclayers: "onehot" '
                "gru_conf { dim_hidden: 5 bias_term: false } }\n"
              + 'layer { name: "drop" type: kDropout srclayers: "gru" '
                "dropout_conf { dropout_ratio: 0.4 } }\n"
              + ip_loss("drop", vocab_size()))
    net, w = build(tmp_path, job_text(layers))
    worst = assert_grads_ok(net, w)
    assert "gru/z_b" not in worst
    # dropout really is on: some outputs of a copy are zeroed, the rest scaled by 1/(1-p)
    metrics: dict = {}
    w.forward(True, metrics)
    y, x = w.outs["2#drop"], w.outs["2#gru"]
    dropped = (y == 0) & (x != 0)
    assert dropped.any() and (~dropped).any()
    np.testing.assert_allclose(y[~dropped], x[~dropped] / 0.6)


def test_tied_embedding_and_output(tmp_path):
    """kEmbedding w (V, D) and the output kInnerProduct w (V, H=D) are one param."""
    v = vocab_size()
    layers = (f'layer {{ name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf {{ '
              f'path: "{char_data(tmp_path)}" batchsize: 3 unroll_len: 4 }} }}\n'
              'layer { name: "label" type: kRNNLabel srclayers: "data" '
              "unroll_conn_type: kUnrollOneToAll }\n"
              f'layer {{ name: "embed" type: kEmbedding srclayers: "data" '
              f"unroll_conn_type: kUnrollOneToAll "
              f'embedding_conf {{ vocab_size: {v} feature_dim: 4 }} param {{ name: "tied" }} }}\n'
              + rec_conf("gru", "gru", "embed", 4)
              + f'layer {{ name: "ip" type: kInnerProduct srclayers: "gru" '
                f'innerproduct_conf {{ num_output: {v} }} param {{ name: "out_w" share_from: "tied" }} '
                f'param {{ name: "out_b" }} }}\n'
              + 'layer { name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "label" }\n')
    net, w = build(tmp_path, job_text(layers, unroll=4))
    assert net.layers["embed"].params["w"] is net.layers["ip"].params["w"]
    worst = assert_grads_ok(net, w)
    assert "tied" in worst and "out_w" not in worst and "out_b" in worst


# -------------------------------------------------------- sequence-store nets

def masked_store(tmp_path, n=6, T=5, F=3, classes=3, seed=0, fname="seq.npz"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, F))
    lengths = np.array([2, 5, 3, 4, 1, 5][:n])
    y = rng.integers(0, classes, size=n)
    return save_npz(tmp_path / fname, x=x, y=y, lengths=lengths), x, y, lengths


def many_to_one_text(path, kind, T=5, batch=3, classes=3):
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: {batch} }} }}\n'
              + rec_conf(kind, "rec", "data", 4)
              + f'layer {{ name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "rec" '
                f"unroll_conn_type: kUnrollFirstToLast innerproduct_conf {{ num_output: {classes} }} }}\n"
                f'layer {{ name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" '
                f'srclayers: "data" unroll_conn_type: kUnrollOneToOne '
                f"unroll_conn_type: kUnrollFirstToLast }}\n")
    return job_text(layers, unroll=T)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_many_to_one_masked(tmp_path, kind):
    path, x, y, lengths = masked_store(tmp_path)
    net, w = build(tmp_path, many_to_one_text(path, kind))
    # the batch has rows shorter than the unroll: padding is masked
    assert w.net.inputs[0].maskb.min() == 0
    assert_grads_ok(net, w)


def test_many_to_one_padding_is_ignored(tmp_path):
    """Changing the padded steps changes neither the objective nor any gradient."""
    path, x, y, lengths = masked_store(tmp_path)
    x2 = x.copy()
    pad = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    x2[pad] = 50.0 * np.random.default_rng(7).standard_normal(x2[pad].shape)
    path2 = save_npz(tmp_path / "seq2.npz", x=x2, y=y, lengths=lengths)
    results = []
    for p in (path, path2):
        net, w = build(tmp_path, many_to_one_text(p, "lstm"))
        for q in net.params:
            q.grad[...] = 0
        metrics: dict = {}
        w.forward(True, metrics)
        w.backward()
        results.append((metrics["objective"][0], {q.name: q.grad.copy() for q in net.params}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12, abs=0)
    for k, g in results[0][1].items():
        np.testing.assert_allclose(results[1][1][k], g, rtol=1e-10, atol=1e-14)
    # and the unmasked net does see the padding (the test can tell the difference)
    net, w = build(tmp_path, many_to_one_text(save_npz(tmp_path / "nolen.npz", x=x2, y=y), "lstm"))
    metrics = {}
    w.forward(True, metrics)
    assert metrics["objective"][0] != pytest.approx(results[0][0], rel=1e-6)


def test_many_to_many_masked_ids(tmp_path):
    """Token ids -> kEmbedding -> kGRU -> per-step loss with per-step labels and lengths."""
    rng = np.random.default_rng(3)
    n, T = 4, 5
    x = rng.integers(0, 5, size=(n, T))
    y = rng.integers(0, 2, size=(n, T))
    path = save_npz(tmp_path / "ids.npz", x=x, y=y, lengths=np.array([5, 2, 4, 3]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: 4 }} }}\n'
              'layer { name: "embed" type: kEmbedding srclayers: "data" '
              "embedding_conf { vocab_size: 5 feature_dim: 3 } }\n"
              + rec_conf("gru", "gru", "embed", 4)
              + ip_loss("gru", 2, labels="data", loss_extra="softmaxloss_conf { scale: 1.5 }"))
    net, w = build(tmp_path, job_text(layers, unroll=T))
    assert_grads_ok(net, w)


# ------------------------------------------------------- bidirectional nets

@pytest.mark.parametrize("kind", ["gru", "gru-hb", "lstm", "rnn"])
def test_bidirectional_char_rnn_two_levels(tmp_path, kind):
    """Two stacked bidirectional levels (forward + kBackward, joined by kConcate), every
    step classified: every param of both directions of both levels checks out."""
    text = job_text(char_layers(char_data(tmp_path), unroll=4)
                    + bidir_level(kind, "bi1", "onehot", 3) + bidir_level(kind, "bi2", "bi1", 3)
                    + ip_loss("bi2", vocab_size()), unroll=4)
    net, w = build(tmp_path, text)
    # the backward layers read their later copy as context
    assert net.by_id["1#bi1_b"].ctx_src == "2#bi1_b" and net.by_id["3#bi1_b"].ctx_src is None
    assert net.by_id["1#bi1_f"].ctx_src == "0#bi1_f"
    worst = assert_grads_ok(net, w)
    for layer in ("bi1_f", "bi1_b", "bi2_f", "bi2_b"):
        n = sum(k.startswith(layer + "/") for k in worst)
        assert n == len(net.layers[layer].params) and n > 0
    if kind == "gru-hb":
        assert "bi2_b/c_hb" in worst


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_bidirectional_many_to_one_masked(tmp_path, kind):
    """Masked sequences, the forward layer's last copy and the backward layer's copy 0."""
    path, *_ = masked_store(tmp_path)
    net, w = build(tmp_path, bidir_many_to_one_text(path, kind))
    assert w.net.inputs[0].maskb.min() == 0
    worst = assert_grads_ok(net, w)
    assert any(k.startswith("bwd/") for k in worst) and any(k.startswith("fwd/") for k in worst)


@pytest.mark.parametrize("kind", ["gru-hb", "lstm"])
def test_backward_decoder_takes_the_encoders_state(tmp_path, kind):
    """A first-to-last source of a kBackward layer is the initial state of its LAST copy."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 2))
    path = save_npz(tmp_path / "s.npz", x=x, y=rng.integers(0, 3, size=(3, 4)),
                    lengths=np.array([4, 2, 3]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: 3 }} }}\n'
              + rec_conf(kind, "encoder", "data", 4)
              + rec_conf(kind, "decoder", "data", 4,
                         extra='srclayers: "encoder" unroll_conn_type: kUnrollOneToOne '
                               "unroll_conn_type: kUnrollFirstToLast",
                         conf_extra="direction: kBackward")
              + ip_loss("decoder", 3, labels="data"))
    net, w = build(tmp_path, job_text(layers, unroll=4))
    assert net.by_id["3#decoder"].init_src == "3#encoder"
    assert net.by_id["0#decoder"].init_src is None
    worst = assert_grads_ok(net, w)
    assert any(k.startswith("encoder/") for k in worst)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_encoder_decoder(tmp_path, kind):
    """Encoder (4 steps) -> its last state is the decoder's (3 steps) initial state."""
    rng = np.random.default_rng(5)
    n = 3
    enc = save_npz(tmp_path / "enc.npz", x=rng.integers(0, 6, size=(n, 4)))
    dec = save_npz(tmp_path / "dec.npz", x=rng.integers(0, 6, size=(n, 3)),
                   y=rng.integers(0, 4, size=(n, 3)))
    layers = (f'layer {{ name: "enc_data" type: kRecordInput unroll_len: 4 store_conf {{ '
              f'backend: "npz" path: "{enc}" batchsize: 3 has_label: false }} }}\n'
              f'layer {{ name: "dec_data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{dec}" batchsize: 3 }} }}\n'
              'layer { name: "enc_embed" type: kEmbedding unroll_len: 4 srclayers: "enc_data" '
              'embedding_conf { vocab_size: 6 feature_dim: 3 } param { name: "emb" } }\n'
              'layer { name: "dec_embed" type: kEmbedding srclayers: "dec_data" '
              'embedding_conf { vocab_size: 6 feature_dim: 3 } param { name: "demb" } }\n'
              + rec_conf(kind, "encoder", "enc_embed", 4, extra="unroll_len: 4")
              + rec_conf(kind, "decoder", "dec_embed", 4,
                         extra='srclayers: "encoder" unroll_conn_type: kUnrollOneToOne '
                               "unroll_conn_type: kUnrollFirstToLast")
              + ip_loss("decoder", 4, labels="dec_data"))
    net, w = build(tmp_path, job_text(layers, unroll=3))
    assert net.by_id["0#decoder"].init_src == "3#encoder"
    worst = assert_grads_ok(net, w)
    assert any(k.startswith("encoder/") for k in worst)
    assert "emb" in worst and "demb" in worst


def test_slice_concate_sigmoid_csv_input(tmp_path):
    """kCSVInput -> kSlice into two pieces -> kSigmoid / kActivation(TANH) -> kConcate -> GRU."""
    rng = np.random.default_rng(11)
    n, T, F = 4, 4, 4
    x = rng.standard_normal((n, T * F))
    labels = rng.integers(0, 3, size=n)
    rows = np.concatenate([labels[:, None].astype(float), x], axis=1)
    csv = tmp_path / "seq.csv"
    np.savetxt(csv, rows, delimiter=",")
    layers = (f'layer {{ name: "data" type: kCSVInput store_conf {{ backend: "csv" path: "{csv}" '
              f"batchsize: 2 shape: {T} shape: {F} }} }}\n"
              'layer { name: "slice" type: kSlice srclayers: "data" '
              "slice_conf { slice_dim: 1 num_slices: 2 } }\n"
              'layer { name: "sig" type: kSigmoid srclayers: "slice" }\n'
              'layer { name: "tanh" type: kActivation srclayers: "slice" '
              "activation_conf { type: TANH } }\n"
              'layer { name: "cat" type: kConcate srclayers: "tanh" srclayers: "sig" '
              "concate_conf { concate_dim: 1 num_concates: 2 } }\n"
              + rec_conf("gru", "gru", "cat", 3)
              + 'layer { name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "gru" '
                "unroll_conn_type: kUnrollFirstToLast innerproduct_conf { num_output: 3 } }\n"
                'layer { name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" '
                'srclayers: "data" unroll_conn_type: kUnrollOneToOne '
                "unroll_conn_type: kUnrollFirstToLast }\n")
    net, w = build(tmp_path, job_text(layers, unroll=T))
    # piece 0 of the slice went to "sig" (first consumer in file order), piece 1 to "tanh"
    metrics: dict = {}
    w.forward(True, metrics)
    xin = w.outs["1#data"]
    np.testing.assert_allclose(w.outs["1#sig"], 1 / (1 + np.exp(-xin[:, :2])))
    np.testing.assert_allclose(w.outs["1#cat"][:, :2], np.tanh(xin[:, 2:]))
    assert_grads_ok(net, w)


def test_csv_token_ids(tmp_path):
    """kCSVInput with store_conf.shape [T]: one token id per step -> kEmbedding -> kGRU."""
    rng = np.random.default_rng(4)
    n, T = 4, 5
    rows = np.concatenate([rng.integers(0, 2, size=(n, 1)), rng.integers(0, 4, size=(n, T))], axis=1)
    csv = tmp_path / "ids.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%d")
    layers = (f'layer {{ name: "data" type: kCSVInput store_conf {{ backend: "csv" path: "{csv}" '
              f"batchsize: 4 shape: {T} }} }}\n"
              'layer { name: "embed" type: kEmbedding srclayers: "data" '
              "embedding_conf { vocab_size: 4 feature_dim: 3 } }\n"
              + rec_conf("gru", "gru", "embed", 3)
              + 'layer { name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "gru" '
                "unroll_conn_type: kUnrollFirstToLast innerproduct_conf { num_output: 2 } }\n"
                'layer { name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" '
                'srclayers: "data" unroll_conn_type: kUnrollOneToOne '
                "unroll_conn_type: kUnrollFirstToLast }\n")
    net, w = build(tmp_path, job_text(layers, unroll=T))
    data = net.layers["data"]
    assert data.is_ids and data.x.dtype == np.int64
    np.testing.assert_array_equal(data.x, rows[:, 1:])
    assert_grads_ok(net, w)


def test_every_other_layer(tmp_path):
    """kDummy, kInnerProduct(transpose), kReLU(slope), kSplit, kSTanh, kActivation, kConcate,
    kRNN (no bias, shift 1), kSoftmax, kEuclideanLoss (target from a layer's output, scale),
    kSoftmaxLoss (topk, scale), with kAccuracy and kArgSort as non-differentiable outputs."""
    rng = np.random.default_rng(2)
    n, T, F = 3, 4, 4
    x = rng.standard_normal((n, T, F))
    y = rng.integers(0, 3, size=(n, T))
    path = save_npz(tmp_path / "feat.npz", x=x, y=y, lengths=np.array([4, 3, 2]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: 3 }} }}\n'
              'layer { name: "dummy" type: kDummy srclayers: "data" }\n'
              'layer { name: "ip1" type: kInnerProduct srclayers: "dummy" '
              "innerproduct_conf { num_output: 5 transpose: true } }\n"
              'layer { name: "relu" type: kReLU srclayers: "ip1" relu_conf { negative_slope: 0.2 } }\n'
              'layer { name: "split" type: kSplit srclayers: "relu" split_conf { num_splits: 2 } }\n'
              'layer { name: "stanh" type: kSTanh srclayers: "split" }\n'
              'layer { name: "act" type: kActivation srclayers: "split" '
              "activation_conf { type: SIGMOID } }\n"
              'layer { name: "cat" type: kConcate srclayers: "stanh" srclayers: "act" '
              'concate_conf { concate_dim: 1 } }\n'
              'layer { name: "rnn" type: kRNN srclayers: "cat" shift: 1 '
              "rnn_conf { dim_hidden: 4 bias_term: false } }\n"
              'layer { name: "ip2" type: kInnerProduct srclayers: "rnn" '
              "innerproduct_conf { num_output: 3 } }\n"
              'layer { name: "sm" type: kSoftmax srclayers: "ip2" }\n'
              'layer { name: "ip3" type: kInnerProduct srclayers: "sm" '
              "innerproduct_conf { num_output: 4 bias_term: false } }\n"
              'layer { name: "eu" type: kEuclideanLoss srclayers: "ip3" srclayers: "dummy" '
              "euclideanloss_conf { scale: 0.5 } }\n"
              'layer { name: "loss" type: kSoftmaxLoss srclayers: "ip2" srclayers: "data" '
              "softmaxloss_conf { topk: 2 scale: 2 } }\n"
              'layer { name: "acc" type: kAccuracy srclayers: "ip2" srclayers: "data" }\n'
              'layer { name: "top" type: kArgSort srclayers: "sm" argsort_conf { topk: 2 } }\n')
    net, w = build(tmp_path, job_text(layers, unroll=T))
    assert net.by_id["0#rnn"].srcs == [None]  # shift 1: copy 0 reads nothing
    worst = assert_grads_ok(net, w)
    assert {"ip1/w", "ip1/b", "rnn/w_hx", "rnn/w_hh", "ip2/w", "ip3/w"} <= set(worst)
    types = {pb.LayerType.Name(c.type) for c in net.unrolled.layers}
    assert {"kDummy", "kReLU", "kSplit", "kSTanh", "kActivation", "kConcate", "kRNN", "kSoftmax",
            "kEuclideanLoss", "kAccuracy", "kArgSort"} <= types


# ------------------------------------------------------ the checker can fail

def _scaled_backward(layer, key, factor):
    """Wrap one layer object's backward so the grad it adds to param ``key`` is scaled."""
    orig = layer.backward

    def backward(ctx, dy, dstate, cache):
        g = layer.params[key].grad
        before = g.copy()
        out = orig(ctx, dy, dstate, cache)
        g[...] = before + factor * (g - before)
        return out

    layer.backward = backward


@pytest.mark.parametrize("layer_name, key, pname", [("ip", "w", "ip/w"), ("rec", "c_hh", "rec/c_hh")])
def test_checker_catches_wrong_gradient(tmp_path, layer_name, key, pname):
    text = job_text(char_layers(char_data(tmp_path)) + rec_conf("gru", "rec", "onehot", 4)
                    + ip_loss("rec", vocab_size()))
    net, w = build(tmp_path, text)
    _scaled_backward(net.layers[layer_name], key, 1.01)
    worst = gradcheck.check(net, w)
    assert worst[pname] > TOL
    assert all(v <= TOL for k, v in worst.items() if k != pname)


def cli_job(tmp_path) -> pathlib.Path:
    text = job_text(char_layers(char_data(tmp_path), batch=2, unroll=4)
                    + rec_conf("gru", "rec", "onehot", 3) + ip_loss("rec", vocab_size()),
                    unroll=4, extra=f'cluster {{ workspace: "{tmp_path / "ws"}" }}')
    return write_job(tmp_path, text, "cli.conf")


def test_cli_exit_1_on_wrong_gradient(tmp_path, monkeypatch, capsys):
    from engine.layers.neuron import InnerProduct

    job = cli_job(tmp_path)
    assert gradcheck.main([str(job)]) == 0
    orig = InnerProduct.backward

    def wrong(self, ctx, dy, dstate, cache):
        before = self.params["b"].grad.copy()
        out = orig(self, ctx, dy, dstate, cache)
        g = self.params["b"].grad
        g[...] = before + 1.01 * (g - before)
        return out

    monkeypatch.setattr(InnerProduct, "backward", wrong)
    capsys.readouterr()
    assert gradcheck.main([str(job)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 above" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("ip/b"))
    assert "FAIL" in line


def test_cli_subprocess_passes(tmp_path):
    job = cli_job(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "engine.gradcheck", str(job)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradcheck (reference): 11 params" in r.stdout
    assert "gradcheck (planned): 11 params" in r.stdout
    assert r.stdout.count(" ok") == 2 * (9 + 2)  # 9 GRU params, ip w and b; both executors


def test_cli_catches_a_wrong_gradient_of_the_planned_executor_alone(tmp_path, monkeypatch, capsys):
    """The planned executor's backward is checked too (a fault there alone fails the check)."""
    from engine.planner import PlannedWorker

    job = cli_job(tmp_path)
    orig = PlannedWorker.backward

    def wrong(self):
        orig(self)
        self.net.params[0].grad[...] *= 1.01

    monkeypatch.setattr(PlannedWorker, "backward", wrong)
    assert gradcheck.main([str(job), "--executor", "reference"]) == 0
    capsys.readouterr()
    assert gradcheck.main([str(job)]) == 1
    out = capsys.readouterr().out
    assert "gradcheck (reference): 11 params within tolerance 0.0001, 0 above" in out
    assert "gradcheck (planned): 10 params within tolerance 0.0001, 1 above" in out


# ------------------------------------- bad options, NaN, nothing checked (issue 16)

def one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), cap.err
    assert " ok" not in cap.out
    return err[0]


@pytest.mark.parametrize("eps", ["0", "-1e-3", "nan", "inf"])
def test_cli_eps_must_be_positive_and_finite(tmp_path, capsys, eps):
    job = cli_job(tmp_path)
    assert gradcheck.main([str(job), f"--eps={eps}"]) == 2
    assert "--eps" in one_error_line(capsys)


@pytest.mark.parametrize("tol", ["nan", "-1", "inf"])
def test_cli_tol_must_be_a_finite_number(tmp_path, capsys, tol):
    job = cli_job(tmp_path)
    assert gradcheck.main([str(job), f"--tol={tol}"]) == 2
    assert "--tol" in one_error_line(capsys)


@pytest.mark.parametrize("args, name", [(["--samples", "0", "--max-full", "0"], "--samples"),
                                        (["--samples", "-3"], "--samples"),
                                        (["--max-full", "-1"], "--max-full")])
def test_cli_checking_nothing_is_an_error(tmp_path, capsys, args, name):
    job = cli_job(tmp_path)
    assert gradcheck.main([str(job), *args]) == 2
    assert name in one_error_line(capsys)


def test_check_refuses_options_that_check_nothing(tmp_path):
    net, w = build(tmp_path, job_text(char_layers(char_data(tmp_path))
                                      + ip_loss("onehot", vocab_size())))
    for kw in ({"samples": 0, "max_full": 0}, {"eps": 0.0}, {"eps": float("nan")},
               {"max_full": -1}):
        with pytest.raises(gradcheck.GradcheckError):
            gradcheck.check(net, w, **kw)


def test_more_samples_than_entries_checks_every_entry(tmp_path, capsys):
    job = cli_job(tmp_path)
    assert gradcheck.main([str(job), "--max-full", "2", "--samples", "100000"]) == 0
    assert "0 above" in capsys.readouterr().out


def test_net_without_params_is_an_error(tmp_path, capsys):
    text = job_text(char_layers(char_data(tmp_path))
                    + 'layer { name: "loss" type: kSoftmaxLoss srclayers: "onehot" '
                      'srclayers: "label" }\n')
    job = write_job(tmp_path, text)
    assert gradcheck.main([str(job)]) == 2
    assert "no params" in one_error_line(capsys)


def test_nan_objective_is_a_failure(tmp_path):
    text = job_text(char_layers(char_data(tmp_path)) + rec_conf("gru", "rec", "onehot", 4)
                    + ip_loss("rec", vocab_size()))
    net, w = build(tmp_path, text)
    # a NaN in the recurrent weights reaches every output, loss and gradient (one in W_x
    # would reach only the rows of one token: a one-hot input is gathered, not multiplied)
    hh = next(p for p in net.params if p.name == "rec/z_hh")
    hh.data.reshape(-1)[0] = np.nan
    worst = gradcheck.check(net, w)
    assert worst and all(np.isnan(v) for v in worst.values()), worst


def test_cli_nan_gradient_fails(tmp_path, monkeypatch, capsys):
    from engine.layers.neuron import InnerProduct

    job = cli_job(tmp_path)
    orig = InnerProduct.backward

    def nan_grad(self, ctx, dy, dstate, cache):
        out = orig(self, ctx, dy, dstate, cache)
        self.params["b"].grad[0] = np.nan
        return out

    monkeypatch.setattr(InnerProduct, "backward", nan_grad)
    assert gradcheck.main([str(job)]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("ip/b"))
    assert "FAIL" in line and "not finite" in line
    assert "0 above, 1 not finite" in out


def test_cli_nan_objective_fails(tmp_path, monkeypatch, capsys):
    job = cli_job(tmp_path)
    orig = gradcheck.build

    def poisoned(*a, **kw):
        net, w = orig(*a, **kw)
        net.params[-1].data.reshape(-1)[0] = np.nan
        return net, w

    monkeypatch.setattr(gradcheck, "build", poisoned)
    assert gradcheck.main([str(job)]) == 1
    out = capsys.readouterr().out
    assert " ok" not in out and out.count("FAIL") == 2 * 11  # both executors
