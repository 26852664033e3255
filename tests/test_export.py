"""ONNX export: onnxruntime runs the exported model and matches the engine's own forward;
the CLI's formats, messages and exit codes; nets that cannot be exported."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from charjobs import run_cli
import cellkinds as ck
from exportjobs import (CLASSES, F, ID_VOCAB, V_CHAR, bidir, cell, engine_forward, make_checkpoint,
                        model_job)
from engine import checkpoint as ckpt
from engine import export

TOL = 1e-5


def _onnx():
    """The onnx package (the test extra), or the test is skipped."""
    return pytest.importorskip("onnx")


def run_onnx(path, inputs, h0, c0=None):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {("ids" if inputs.dtype.kind == "i" else "x"): inputs, "h0": h0.astype(np.float32)}
    if c0 is not None:
        feed["c0"] = c0.astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed)))


def random_state(kind, L, B, H, seed=3):
    rng = np.random.default_rng(seed)
    h0 = rng.uniform(-0.9, 0.9, (L, B, H))
    c0 = rng.uniform(-0.9, 0.9, (L, B, H)) if kind == "lstm" else None
    return h0, c0


def check_against_engine(job, checkpoint, model_path, kind, L, H, B=3, seed=3):
    """The exported model and the engine agree on logits and final state from a nonzero h0."""
    h0, c0 = random_state(kind, L, B, H, seed)
    inputs, logits, hT, cT, _ = engine_forward(job, checkpoint, h0, c0)
    got = run_onnx(model_path, inputs, h0, c0)
    assert got["logits"].shape == logits.shape
    np.testing.assert_allclose(got["logits"], logits, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got["hT"], hT, rtol=TOL, atol=TOL)
    if kind == "lstm":
        np.testing.assert_allclose(got["cT"], cT, rtol=TOL, atol=TOL)
    # the state really moved away from h0 (the comparison is not vacuous)
    assert np.abs(hT - h0).max() > 0.05
    return got


def export_onnx(tmp_path, job):
    _onnx()
    cp = make_checkpoint(job)
    out = tmp_path / "model.onnx"
    r = run_cli("engine.export", cp, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: ONNX")
    return cp, out


@pytest.mark.parametrize("kind", ["gru", "gru-hb", "lstm", "rnn", "rnn-relu"])
def test_onehot_char_net(tmp_path, kind):
    """gru-hb: recurrent_bias, a nonzero c_hb, is ONNX's Rb_h (linear_before_reset=1)."""
    job = model_job(tmp_path, kind=kind)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, kind, 1, 6)
    onnx = _onnx()
    m = onnx.load(str(out))
    if kind == "gru-hb":
        assert np.abs(ckpt.load(cp)[0]["param/rec1/c_hb"]).min() > 0
        b = onnx.numpy_helper.to_array([i for i in m.graph.initializer if i.name == "B0"][0])
        np.testing.assert_array_equal(b[0, 3 * 6 + 2 * 6:], ckpt.load(cp)[0]["param/rec1/c_hb"])
        kind = "gru"
    op = ck.cls_of(kind).export.torch_name
    (node,) = [n for n in m.graph.node if n.op_type == op]  # ONNX's own operator
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if kind == "gru":
        assert attrs["linear_before_reset"] == 1
    if kind.startswith("rnn"):
        assert attrs["activations"] == [b"Relu" if kind == "rnn-relu" else b"Tanh"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["input"] == "onehot" and meta["input_size"] == str(V_CHAR)
    assert len(json.loads(meta["vocab"])) == V_CHAR  # the char vocabulary, id order
    assert meta["vocab_unit"] == "utf-8"  # characters (a byte vocabulary says "bytes")


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_stacked_two_layers_with_dropout_between(tmp_path, kind):
    job = model_job(tmp_path, kind=kind, layers=2, dropout=True)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, kind, 2, 6)


@pytest.mark.parametrize("kind", ["gru", "gru-hb", "lstm", "rnn", "rnn-relu"])
def test_bidirectional_two_levels(tmp_path, kind):
    """Two bidirectional levels: one ONNX node each with direction="bidirectional", its
    output [T, 2, B, H] joined to [T, B, 2H] forward first, h0/hT rows 2k, 2k+1 for level k;
    equal to the engine from a nonzero state in all four directions."""
    job = model_job(tmp_path, kind=kind, layers=2, bidirectional=True)
    cp, out = export_onnx(tmp_path, job)
    got = check_against_engine(job, cp, out, "lstm" if kind == "lstm" else "gru", 4, 6)
    assert got["hT"].shape == (4, 3, 6)
    onnx = _onnx()
    m = onnx.load(str(out))
    cells = [n for n in m.graph.node if n.op_type in ("GRU", "LSTM", "RNN")]
    assert [n.name for n in cells] == ["rec1", "rec2"]
    for n in cells:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["direction"] == b"bidirectional"
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["bidirectional"] == "true" and meta["num_layers"] == "2"
    W1 = onnx.numpy_helper.to_array([i for i in m.graph.initializer if i.name == "W1"][0])
    assert W1.shape[0] == 2 and W1.shape[2] == 12          # level 1 reads [forward; backward]


def test_bidirectional_features_with_dropout(tmp_path):
    body = (bidir("lstm", 1, "data", 5)
            + 'layer { name: "drop" type: kDropout srclayers: "cat1" dropout_conf { dropout_ratio: 0.5 } }\n'
            + f'layer {{ name: "ip" type: kInnerProduct srclayers: "drop" '
              f"innerproduct_conf {{ num_output: {CLASSES} }} }}\n")
    job = model_job(tmp_path, inp="features", body=body)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, "lstm", 2, 5)


def test_embedding_char_net(tmp_path):
    job = model_job(tmp_path, kind="gru", inp="embedding", layers=2)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, "gru", 2, 6)
    onnx = _onnx()
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["ids", "h0"]
    assert "Gather" in {n.op_type for n in m.graph.node}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float_feature_record_net(tmp_path, kind):
    job = model_job(tmp_path, kind=kind, inp="features", hidden=5)
    cp, out = export_onnx(tmp_path, job)
    got = check_against_engine(job, cp, out, kind, 1, 5)
    assert got["logits"].shape[-1] == CLASSES
    onnx = _onnx()
    m = onnx.load(str(out))
    x = m.graph.input[0]
    assert x.name == "x" and x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert x.type.tensor_type.shape.dim[2].dim_value == F


def test_record_ids_onehot_without_vocab_size(tmp_path):
    """kOneHot takes its width from the data (max id + 1); the export, which does not read
    the data, takes it from the checkpoint's first recurrent layer."""
    job = model_job(tmp_path, kind="rnn", inp="ids")
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, "rnn", 1, 6)
    onnx = _onnx()
    m = onnx.load(str(out))
    assert {p.key: p.value for p in m.metadata_props}["input_size"] == str(ID_VOCAB)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_dynamic_time_and_batch(tmp_path, kind):
    """One exported model runs at two sequence lengths and batch sizes, matching the engine
    built at each."""
    job = model_job(tmp_path, kind=kind, layers=2, T=5, B=3)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, kind, 2, 6)
    other = model_job(tmp_path, kind=kind, layers=2, T=8, B=2, fname="job2.conf")
    got = check_against_engine(other, cp, out, kind, 2, 6, B=2, seed=4)
    assert got["logits"].shape == (8, 2, V_CHAR)


def test_zero_h0_is_the_engine_start(tmp_path):
    job = model_job(tmp_path, kind="gru")
    cp, out = export_onnx(tmp_path, job)
    inputs, logits, hT, _, _ = engine_forward(job, cp)
    got = run_onnx(out, inputs, np.zeros((1, 3, 6)))
    np.testing.assert_allclose(got["logits"], logits, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got["hT"], hT, rtol=TOL, atol=TOL)


def test_export_needs_no_data_files(tmp_path):
    """The corpus and the store may be gone: the export rebuilds the net from the checkpoint."""
    _onnx()
    for inp in ("onehot", "features"):
        d = tmp_path / inp
        job = model_job(d, kind="lstm", inp=inp, layers=2)
        cp = make_checkpoint(job)
        inputs, logits, hT, cT, _ = engine_forward(job, cp)
        (d / "text.txt").unlink()
        (d / "feat.npz").unlink()
        net = export.inference_net(*ckpt.load(cp), str(cp))
        export.export(net, d / "m.onnx")
        got = run_onnx(d / "m.onnx", inputs, np.zeros_like(hT), np.zeros_like(cT))
        np.testing.assert_allclose(got["logits"], logits, rtol=TOL, atol=TOL)


def test_transposed_head_and_no_biases(tmp_path):
    body = (f'layer {{ name: "onehot" type: kOneHot srclayers: "data" '
            f"unroll_conn_type: kUnrollOneToAll }}\n"
            'layer { name: "rec1" type: kGRU srclayers: "onehot" '
            "gru_conf { dim_hidden: 6 bias_term: false } }\n"
            'layer { name: "dummy" type: kDummy srclayers: "rec1" }\n'
            f'layer {{ name: "ip" type: kInnerProduct srclayers: "dummy" '
            f"innerproduct_conf {{ num_output: {V_CHAR} transpose: true bias_term: false }} }}\n")
    job = model_job(tmp_path, body=body)
    cp, out = export_onnx(tmp_path, job)
    check_against_engine(job, cp, out, "gru", 1, 6)


# ------------------------------------------------------------------ the CLI
def test_help():
    r = run_cli("engine.export", "--help")
    assert r.returncode == 0 and ".onnx" in r.stdout and ".safetensors" in r.stdout


def one_error_line(r, *parts):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def test_bad_extension_missing_and_corrupt_checkpoint(tmp_path):
    job = model_job(tmp_path)
    cp = make_checkpoint(job)
    one_error_line(run_cli("engine.export", cp, tmp_path / "m.pt"), "'.pt'", ".onnx, .safetensors or .bin")
    one_error_line(run_cli("engine.export", tmp_path / "nope.npz", tmp_path / "m.onnx"),
                   "nope.npz", "no such checkpoint")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(cp.read_bytes()[:200])
    one_error_line(run_cli("engine.export", bad, tmp_path / "m.onnx"), "bad.npz", "corrupted")
    one_error_line(run_cli("engine.export", cp, tmp_path / "no" / "dir" / "m.safetensors"),
                   "cannot write")
    assert not list(tmp_path.glob("m.*"))


_ONEHOT = 'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
_HEAD = 'layer {{ name: "ip" type: kInnerProduct srclayers: "{}" innerproduct_conf {{ num_output: %d }} }}\n' % V_CHAR

UNEXPORTABLE = {
    "lone backward layer": (
        _ONEHOT + cell("gru", "rec1", "onehot", 4, backward=True) + _HEAD.format("rec1"),
        'layer "rec1" (kGRU) runs backwards (direction: kBackward) alone'),
    "backward first in the join": (
        _ONEHOT + cell("gru", "f", "onehot", 4) + cell("gru", "b", "onehot", 4, backward=True)
        + 'layer { name: "cat" type: kConcate srclayers: "b" srclayers: "f" concate_conf { concate_dim: 1 } }\n'
        + _HEAD.format("cat"),
        'layer "cat" (kConcate) cannot be exported: a kConcate is exported only as the join of a '
        "bidirectional level"),
    "two forward layers joined": (
        _ONEHOT + cell("gru", "f", "onehot", 4) + cell("gru", "g", "onehot", 4)
        + 'layer { name: "cat" type: kConcate srclayers: "f" srclayers: "g" concate_conf { concate_dim: 1 } }\n'
        + _HEAD.format("cat"),
        'layer "cat" (kConcate) cannot be exported'),
    "bidirectional then one direction": (
        _ONEHOT + bidir("gru", 1, "onehot", 4) + cell("gru", "rec2", "cat1", 4) + _HEAD.format("rec2"),
        'layer "rec2" (kGRU) differs from "rec1" in direction ("rec1" and "rec1r" are a '
        'bidirectional level, "rec2" is not)'),
    "backward layer read by the head too": (
        _ONEHOT + bidir("gru", 1, "onehot", 4)
        + 'layer { name: "side" type: kDummy srclayers: "rec1r" }\n' + _HEAD.format("cat1"),
        'layer "rec1r" (kGRU) feeds cat1, side; the two directions of a bidirectional level '
        '("rec1", "rec1r") feed one kConcate and nothing else'),
    "concate": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        'layer { name: "d1" type: kDummy srclayers: "onehot" }\n'
        'layer { name: "d2" type: kDummy srclayers: "onehot" }\n'
        'layer { name: "cat" type: kConcate srclayers: "d1" srclayers: "d2" }\n'
        + cell("gru", "rec1", "cat", 4) +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "cat" (kConcate) cannot be exported'),
    "branch": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        'layer { name: "side" type: kDummy srclayers: "onehot" }\n'
        + cell("gru", "rec1", "onehot", 4) +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "onehot" (kOneHot) feeds 2 layers (side, rec1)'),
    "activation": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        + cell("gru", "rec1", "onehot", 4) +
        'layer { name: "act" type: kActivation srclayers: "rec1" activation_conf { type: TANH } }\n'
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "act" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "act" (kActivation) cannot be exported'),
    "shift": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        + cell("gru", "rec1", "onehot", 4, extra="shift: 1") +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "rec1" (kGRU) reads "onehot" with shift 1'),
    "mixed cells": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        + cell("gru", "rec1", "onehot", 4) + cell("lstm", "rec2", "rec1", 4) +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec2" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "rec2" (kLSTM) differs from "rec1" in cell type'),
    "mixed sizes": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        + cell("gru", "rec1", "onehot", 4) + cell("gru", "rec2", "rec1", 5) +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec2" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "rec2" (kGRU) differs from "rec1" in hidden size'),
    "no head": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        + cell("gru", "rec1", "onehot", 4) + cell("gru", "ip", "rec1", V_CHAR),
        'layer "ip" (kGRU) is the last model layer; the export needs a kInnerProduct head'),
    "projection before the cells": (
        'layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
        'layer { name: "proj" type: kInnerProduct srclayers: "onehot" innerproduct_conf { num_output: 4 } }\n'
        + cell("gru", "rec1", "proj", 4) +
        f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n',
        'layer "proj" (kInnerProduct) comes before any recurrent layer'),
}


@pytest.mark.parametrize("case", sorted(UNEXPORTABLE))
def test_unexportable_layer_is_one_line(tmp_path, case):
    body, expect = UNEXPORTABLE[case]
    job = model_job(tmp_path, body=body)
    cp = make_checkpoint(job)
    for out in ("m.onnx", "m.safetensors"):
        one_error_line(run_cli("engine.export", cp, tmp_path / out), str(cp), expect)
        assert not (tmp_path / out).exists()


def test_many_to_one_first_to_last_is_refused(tmp_path):
    """A head reading the last step (kUnrollFirstToLast) is no per-step model."""
    body = (cell("lstm", "rec1", "data", 4)
            + 'layer { name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "rec1" '
              f"unroll_conn_type: kUnrollFirstToLast innerproduct_conf {{ num_output: {CLASSES} }} }}\n")
    job = model_job(tmp_path, inp="features", body=body)
    text = job.read_text().replace(
        'srclayers: "ip" srclayers: "data" }',
        'unroll_len: 1 srclayers: "ip" srclayers: "data" unroll_conn_type: kUnrollOneToOne '
        "unroll_conn_type: kUnrollFirstToLast }")
    job.write_text(text)
    cp = make_checkpoint(job)
    one_error_line(run_cli("engine.export", cp, tmp_path / "m.onnx"),
                   'layer "ip" (kInnerProduct) reads "rec1" kUnrollFirstToLast')


def test_onnx_missing_is_one_line(tmp_path, monkeypatch, capsys):
    job = model_job(tmp_path)
    cp = make_checkpoint(job)
    monkeypatch.setitem(sys.modules, "onnx", None)   # import onnx fails
    assert export.main([str(cp), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: ONNX export needs the onnx package: pip install 'rnn-engine[export]' (or pip install onnx)"
    assert export.main([str(cp), str(tmp_path / "m.safetensors")]) == 0   # needs no package


def test_an_unexpected_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """Any failure of engine.export is one line, exit 1 (it used to escape as a traceback)."""
    from engine import checkpoint as ckpt
    from engine import export

    monkeypatch.setattr(ckpt, "load", lambda path: ({}, {}))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(export, "inference_net", broken)
    rc = export.main([str(tmp_path / "step1.npz"), str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines() == ["error: RuntimeError: boom (run with --debug for the traceback)"]
