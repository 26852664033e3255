"""PyTorch-layout weights: the safetensors format, the layout itself, the round trip through
``checkpoint_path``, PyTorch taking the file (and giving the engine's forward), a
PyTorch-made model imported, and every way an import is refused."""
from __future__ import annotations

import numpy as np
import pytest

from charjobs import run_cli
import cellkinds as ck
from exportjobs import V_CHAR, build, engine_forward, make_checkpoint, model_job
from engine import checkpoint as ckpt
from engine import interop, safetensors_io
from engine.config import ConfigError, load_job
from engine.workspace import param_arrays
from engine.train import Trainer, build_parser


def _st_numpy():
    """The safetensors package's NumPy API (the test extra), or the test is skipped."""
    return pytest.importorskip("safetensors.numpy")

GATES = {"gru": ("r", "z", "c"), "lstm": ("i", "f", "g", "o")}


def export_st(tmp_path, job, name="model.safetensors"):
    cp = make_checkpoint(job)
    out = tmp_path / name
    r = run_cli("engine.export", cp, out)
    assert r.returncode == 0, r.stderr
    assert "tensors in PyTorch's layout" in r.stdout
    return cp, out


def import_job(tmp_path, st_path, **kw):
    """The same net as ``model_job(**kw)`` initialised from ``st_path``; (job, trainer)."""
    job = model_job(tmp_path, fname="import.conf", extra=f'checkpoint_path: "{st_path}"', **kw)
    args = build_parser().parse_args([str(job), "--workspace", str(tmp_path / "ws-import"),
                                      "--executor", "reference"])
    t = Trainer(load_job(job), str(job), args)
    t.build()
    return job, t


# -------------------------------------------------------------- the layout
@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_layout_read_back_by_the_package(tmp_path, kind):
    """The file, read by the safetensors package, holds the engine's params in PyTorch's
    layout: gate blocks in PyTorch's order, zero recurrent biases, the head as it is."""
    job = model_job(tmp_path, kind=kind, layers=2, inp="embedding")
    cp, out = export_st(tmp_path, job)
    arrays, _ = ckpt.load(cp)
    t = _st_numpy().load_file(str(out))
    H = 6
    assert sorted(t) == sorted(["embed.weight", "head.bias", "head.weight"] + [
        f"rnn.{w}_l{k}" for k in (0, 1) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")])
    for k in (0, 1):
        rec = f"rec{k + 1}"
        if kind == "rnn":
            blocks = {"ih": [f"{rec}/w_hx"], "hh": [f"{rec}/w_hh"], "b": [f"{rec}/b"]}
        else:
            blocks = {part: [f"{rec}/{g}_{suffix}" for g in GATES[kind]]
                      for part, suffix in (("ih", "hx"), ("hh", "hh"), ("b", "b"))}
        for g, name in enumerate(blocks["ih"]):
            np.testing.assert_array_equal(t[f"rnn.weight_ih_l{k}"][g * H:(g + 1) * H], arrays[f"param/{name}"])
        for g, name in enumerate(blocks["hh"]):
            np.testing.assert_array_equal(t[f"rnn.weight_hh_l{k}"][g * H:(g + 1) * H], arrays[f"param/{name}"])
        for g, name in enumerate(blocks["b"]):
            np.testing.assert_array_equal(t[f"rnn.bias_ih_l{k}"][g * H:(g + 1) * H], arrays[f"param/{name}"])
        assert not t[f"rnn.bias_hh_l{k}"].any()
    np.testing.assert_array_equal(t["head.weight"], arrays["param/ip/w"])
    np.testing.assert_array_equal(t["head.bias"], arrays["param/ip/b"])
    np.testing.assert_array_equal(t["embed.weight"], arrays["param/embed/w"])
    meta = safetensors_io.read(out)[1]
    assert meta["rnn"] == ck.cls_of(kind).export.torch_name
    assert meta["num_layers"] == "2" and meta["hidden_size"] == "6" and meta["input"] == "embedding"


@pytest.mark.parametrize("kind, inp, bi", [("gru", "onehot", False), ("lstm", "embedding", False),
                                           ("rnn-relu", "features", False), ("gru-hb", "onehot", False),
                                           ("gru-hb", "features", True), ("lstm", "onehot", True)])
def test_round_trip_through_checkpoint_path_is_exact(tmp_path, kind, inp, bi):
    job = model_job(tmp_path, kind=kind, layers=2, inp=inp, dropout=True, bidirectional=bi)
    cp, out = export_st(tmp_path, job)
    _, t = import_job(tmp_path, out, kind=kind, layers=2, inp=inp, dropout=True, bidirectional=bi)
    before = ckpt.section(ckpt.load(cp)[0], "param")
    after = param_arrays(t.main)
    assert sorted(after) == sorted(before)
    for k, v in after.items():
        assert v.dtype == before[k].dtype
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_tied_params_take_one_value(tmp_path):
    """kEmbedding w tied to the head's w: both keys must agree, or the import says so."""
    body = (f'layer {{ name: "embed" type: kEmbedding srclayers: "data" unroll_conn_type: kUnrollOneToAll '
            f'embedding_conf {{ vocab_size: {V_CHAR} feature_dim: 5 }} param {{ name: "tied" }} }}\n'
            'layer { name: "rec1" type: kGRU srclayers: "embed" gru_conf { dim_hidden: 5 } }\n'
            f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" innerproduct_conf '
            f'{{ num_output: {V_CHAR} }} param {{ name: "out_w" share_from: "tied" }} }}\n')
    job = model_job(tmp_path, body=body)
    cp, out = export_st(tmp_path, job)
    t, _ = safetensors_io.read(out)
    np.testing.assert_array_equal(t["embed.weight"], t["head.weight"])
    net, _ = build(job, np.float32)
    got = interop.params_from_torch(net, t, str(out))
    np.testing.assert_array_equal(got["param/tied"], ckpt.load(cp)[0]["param/tied"])
    t["head.weight"] = t["head.weight"] + 1
    with pytest.raises(ConfigError, match='embed.weight and head.weight both give param "tied"'):
        interop.params_from_torch(net, t, str(out))


# ----------------------------------------------------------------- refusals
def _net_and_tensors(tmp_path, kind="gru"):
    job = model_job(tmp_path, kind=kind)
    cp, out = export_st(tmp_path, job)
    net, _ = build(job, np.float32)
    return job, out, net, safetensors_io.read(out)[0]


def test_nonzero_b_hn_is_refused_naming_the_switch(tmp_path):
    """Without recurrent_bias a nonzero b_hn is refused in one line naming the switch; with
    it, b_hn goes into the layer's c_hb (and out again)."""
    job, out, net, t = _net_and_tensors(tmp_path)
    assert not t["rnn.bias_hh_l0"].any()
    t["rnn.bias_hh_l0"][2 * 6 + 1] = 0.25     # b_hn
    bad = tmp_path / "bhn.safetensors"
    bad.write_bytes(safetensors_io.encode(t))
    with pytest.raises(ConfigError) as e:
        interop.load_torch_file(net, bad)
    msg = str(e.value)
    for part in (str(bad), 'layer "rec1" (kGRU)', "rnn.bias_hh_l0[12:18]", "b_hn",
                 "gru_conf { recurrent_bias: true }"):
        assert part in msg, msg
    # b_hr and b_hz fold into the input bias: no refusal
    t["rnn.bias_hh_l0"][2 * 6 + 1] = 0.0
    t["rnn.bias_hh_l0"][:12] = 0.5
    got = interop.params_from_torch(net, t, "f")
    np.testing.assert_allclose(got["param/rec1/r_b"], t["rnn.bias_ih_l0"][:6].astype(np.float64) + 0.5)
    # through the training CLI: exit 2, one line
    run_job = model_job(tmp_path, fname="bhn.conf", extra=f'checkpoint_path: "{bad}"')
    r = run_cli("engine.train", run_job, "--workspace", tmp_path / "ws-bhn")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "recurrent_bias: true" in lines[0] and str(bad) in lines[0]
    # the switch on: b_hn is c_hb, b_hr and b_hz still fold into r_b and z_b
    t["rnn.bias_hh_l0"][2 * 6 + 1] = 0.25
    hb_job = model_job(tmp_path / "hb", kind="gru-hb")
    hb_net, _ = build(hb_job, np.float32)
    got = interop.params_from_torch(hb_net, t, "f")
    np.testing.assert_array_equal(got["param/rec1/c_hb"], t["rnn.bias_hh_l0"][12:].astype(np.float64))
    assert got["param/rec1/c_hb"][1] == 0.25
    np.testing.assert_allclose(got["param/rec1/r_b"], t["rnn.bias_ih_l0"][:6].astype(np.float64) + 0.5)
    np.testing.assert_array_equal(got["param/rec1/c_b"], t["rnn.bias_ih_l0"][12:].astype(np.float64))
    _, trainer = import_job(tmp_path / "hb", bad, kind="gru-hb")
    back = interop.torch_state(trainer.main, "back")
    np.testing.assert_array_equal(back["rnn.bias_hh_l0"][12:], t["rnn.bias_hh_l0"][12:])


def test_wrong_shapes_missing_and_unexpected_keys(tmp_path):
    job, out, net, t = _net_and_tensors(tmp_path, "lstm")
    wrong = dict(t, **{"rnn.weight_hh_l0": np.zeros((24, 5), np.float32)})
    with pytest.raises(ConfigError, match=r"rnn.weight_hh_l0 \[24, 5\] \(needs \[24, 6\]\)"):
        interop.params_from_torch(net, wrong, "w.safetensors")
    missing = {k: v for k, v in t.items() if k != "head.bias"}
    missing["rnn.weight_ih_l1"] = t["rnn.weight_ih_l0"]
    with pytest.raises(ConfigError) as e:
        interop.params_from_torch(net, missing, "m.safetensors")
    msg = str(e.value)
    assert "missing head.bias" in msg and "unexpected rnn.weight_ih_l1" in msg
    assert msg.startswith("m.safetensors: ") and "1 x LSTM 6" in msg
    ints = dict(t, **{"head.bias": np.zeros(t["head.bias"].shape, np.int32)})
    with pytest.raises(ConfigError, match="head.bias are not floating point"):
        interop.params_from_torch(net, ints, "i.safetensors")


def test_biases_into_a_net_without_them(tmp_path):
    body = ('layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
            'layer { name: "rec1" type: kLSTM srclayers: "onehot" lstm_conf { dim_hidden: 4 bias_term: false } }\n'
            f'layer {{ name: "ip" type: kInnerProduct srclayers: "rec1" '
            f"innerproduct_conf {{ num_output: {V_CHAR} bias_term: false }} }}\n")
    job = model_job(tmp_path, body=body)
    cp, out = export_st(tmp_path, job)
    t, _ = safetensors_io.read(out)
    assert not t["rnn.bias_ih_l0"].any() and not t["head.bias"].any()
    net, _ = build(job, np.float32)
    interop.params_from_torch(net, t, "ok")  # zero biases go in
    t["rnn.bias_hh_l0"][3] = 1.0
    with pytest.raises(ConfigError, match='layer "rec1" has bias_term: false but rnn.bias_ih_l0 '
                                          r"\+ rnn.bias_hh_l0 is not zero; set bias_term: true in its lstm_conf"):
        interop.params_from_torch(net, t, "b")
    t["rnn.bias_hh_l0"][3] = 0.0
    t["head.bias"][0] = 1.0
    with pytest.raises(ConfigError, match=r"innerproduct_conf \{ bias_term: true \}"):
        interop.params_from_torch(net, t, "b")


def test_not_a_safetensors_file_in_a_job(tmp_path):
    job = model_job(tmp_path)
    cp = make_checkpoint(job)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(cp.read_bytes())   # an npz (a zip) under the wrong name
    run_job = model_job(tmp_path, fname="fake.conf", extra=f'checkpoint_path: "{fake}"')
    r = run_cli("engine.train", run_job, "--workspace", tmp_path / "ws-fake")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {fake}: not a safetensors file"), r.stderr


def test_unexportable_net_cannot_import(tmp_path):
    job, out, _, _ = _net_and_tensors(tmp_path)
    body = ('layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }\n'
            'layer { name: "rec1" type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 6 } }\n'
            'layer { name: "act" type: kSigmoid srclayers: "rec1" }\n'
            f'layer {{ name: "ip" type: kInnerProduct srclayers: "act" innerproduct_conf {{ num_output: {V_CHAR} }} }}\n')
    run_job = model_job(tmp_path / "other", body=body, extra=f'checkpoint_path: "{out}"')
    r = run_cli("engine.train", run_job)
    assert r.returncode == 2
    assert f'{out}: layer "act" (kSigmoid) cannot be exported' in r.stderr


# -------------------------------------------------------------------- PyTorch
def _torch():
    return pytest.importorskip("torch")


def torch_model(kind, V, H, L, embed=None, bidirectional=False):
    nn = _torch().nn
    cls = getattr(nn, ck.cls_of(kind).export.torch_name)
    kw = {"nonlinearity": "relu"} if kind == "rnn-relu" else {}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            if embed is not None:
                self.embed = nn.Embedding(*embed)
            self.rnn = cls(embed[1] if embed else V, H, L, bidirectional=bidirectional, **kw)
            self.head = nn.Linear(2 * H if bidirectional else H, V)

        def forward(self, ids, h0):
            tt = _torch()
            x = self.embed(ids) if embed is not None else \
                tt.nn.functional.one_hot(ids, V).to(tt.float64)
            y, hT = self.rnn(x, h0)
            return self.head(y), hT

    return Model().double()


@pytest.mark.parametrize("kind, inp, bi", [("gru", "onehot", False), ("lstm", "onehot", False),
                                           ("rnn", "embedding", False), ("rnn-relu", "onehot", False),
                                           ("gru-hb", "onehot", False), ("gru-hb", "onehot", True),
                                           ("lstm", "embedding", True), ("rnn", "onehot", True)])
def test_pytorch_takes_the_file_and_agrees(tmp_path, kind, inp, bi):
    """PyTorch loads the file as it is; its model gives the engine's logits and final
    states (bidirectional: both directions of both levels, from a nonzero h0)."""
    tt = _torch()
    job = model_job(tmp_path, kind=kind, layers=2, inp=inp, bidirectional=bi)
    cp, out = export_st(tmp_path, job)
    m = torch_model(kind, V_CHAR, 6, 2, embed=(V_CHAR, 4) if inp == "embedding" else None,
                    bidirectional=bi)
    from safetensors.torch import load_file
    m.load_state_dict(load_file(str(out)), strict=True)   # the keys as they are
    rng = np.random.default_rng(5)
    n = 4 if bi else 2
    h0 = rng.uniform(-0.9, 0.9, (n, 3, 6))
    c0 = rng.uniform(-0.9, 0.9, (n, 3, 6)) if kind == "lstm" else None
    ids, logits, hT, cT, _ = engine_forward(job, cp, h0, c0)
    state = (tt.tensor(h0), tt.tensor(c0)) if kind == "lstm" else tt.tensor(h0)
    with tt.no_grad():
        y, st = m(tt.tensor(ids), state)
    np.testing.assert_allclose(y.numpy(), logits, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose((st[0] if kind == "lstm" else st).numpy(), hT, rtol=1e-9, atol=1e-9)
    if kind == "lstm":
        np.testing.assert_allclose(st[1].numpy(), cT, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind, bi", [("gru-hb", False), ("lstm", False), ("rnn", False),
                                     ("gru-hb", True), ("lstm", True)])
def test_pytorch_made_model_imported_gives_pytorch_loss(tmp_path, kind, bi):
    """Random PyTorch weights with nonzero recurrent biases (the GRU's b_hn too, into a
    GRU with recurrent_bias): the engine, initialised from the file through
    checkpoint_path, gives PyTorch's loss (bidirectional: nn.*(bidirectional=True))."""
    tt = _torch()
    tt.manual_seed(0)
    m = torch_model(kind, V_CHAR, 7, 2, bidirectional=bi).float()
    with tt.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(-0.5, 0.5)
    sd = m.rnn.state_dict()
    assert all(sd[k].abs().min() > 0 for k in sd if k.startswith("bias_hh"))
    assert len(sd) == (16 if bi else 8)
    st = tmp_path / "torch.safetensors"
    st.write_bytes(safetensors_io.encode({k: v.numpy() for k, v in m.state_dict().items()}))
    _, t = import_job(tmp_path, st, kind=kind, layers=2, hidden=7, bidirectional=bi)
    w = t.workers[list(t.workers)[0]]
    metrics = w.run_batch(train=False)
    loss = metrics["loss"][0] / metrics["loss"][1]
    T = 5
    ids = np.asarray(w.outs["0#data"])          # (B, T + 1): inputs and next-char labels
    with tt.no_grad():
        y, _ = m.double()(tt.tensor(ids[:, :T].T.astype(np.int64)), None)
        ref = tt.nn.functional.cross_entropy(y.reshape(-1, V_CHAR),
                                             tt.tensor(ids[:, 1:].T.reshape(-1).astype(np.int64)))
    assert loss == pytest.approx(float(ref), rel=1e-5)
