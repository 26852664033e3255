"""The planned executor gives the reference executor's losses, gradients and params."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import cellkinds as ck
import test_gradcheck as gc
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.layers import REGISTRY
from engine.layers.recurrent import Recurrent
from engine.net import Net
from engine.planner import NotPlannable, PlannedWorker, make_worker, plan
from engine.proto import job_pb2 as pb
from engine.workspace import net_info
from engine.unroll import unroll
from engine.updaters import Updater
from engine.worker import Worker

UPDATER = ('updater { type: kRMSProp rmsprop_conf { rho: 0.9 } '
           'learning_rate { type: kFixed base_lr: 0.01 } clip_low: -1 clip_high: 1 }')


@pytest.fixture(autouse=True, params=["input-in-step-gemm", "separate-input-gemm"])
def fold_mode(request, monkeypatch):
    """Every comparison runs twice: with the LSTM/RNN input projection folded into the
    step GEMM (z = [h; x; 1]) and with it as a separate all-steps GEMM."""
    monkeypatch.setattr(Recurrent, "FOLD_INPUT", 1e9 if request.param.startswith("input-in") else 0.0)
    return request.param


@contextlib.contextmanager
def zeroed_before_each_batch():
    """Nets built inside have no layer that claims its gradients: the buffer zero-fills
    every param before each batch, and every contribution is added (the rule before
    ``claims_grads``, and the one of a custom layer)."""
    with pytest.MonkeyPatch.context() as m:
        for cls in {c for k in REGISTRY.values() for c in k.__mro__}:
            if cls.__dict__.get("claims_grads"):
                m.setattr(cls, "claims_grads", False)
        yield


def pair(tmp_path, text, eager: bool = False):
    """(net, worker, updater) of the reference and the planned executor (and, ``eager``, a
    third: the reference executor on a buffer zero-filled before each batch)."""
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    out = []
    for cls, fill in ((Worker, False), (PlannedWorker, False), (Worker, True))[:3 if eager else 2]:
        with zeroed_before_each_batch() if fill else contextlib.nullcontext():
            u = unroll(job.neuralnet, Phase.TRAIN)
            net = Net(u, make_backend(None, np.float64), net_info(path, tmp_path / "ws", 0), seed=3)
            assert bool(net.grads.lazy) != fill
            out.append((net, cls(net, seed=3, carry=job.train_one_batch.state_carry),
                        Updater(job.updater, net.params, np)))
    return out


def assert_same(tmp_path, text, steps=3):
    """The two executors give the same metrics, gradients and updated params at every step,
    and the reference executor's gradients are, to the bit, those it gives on a buffer
    zero-filled before each batch (the gradients of the batch before, left in the buffer,
    never leak into a param's first contribution)."""
    (net_r, w_r, up_r), (net_p, w_p, up_p), (net_e, w_e, up_e) = pair(tmp_path, text, eager=True)
    assert [p.name for p in net_r.params] == [p.name for p in net_p.params]
    for step in range(steps):
        m_r = w_r.run_batch(train=True)
        m_p = w_p.run_batch(train=True)
        w_e.run_batch(train=True)
        assert m_r.keys() == m_p.keys()
        for k in m_r:
            np.testing.assert_allclose(m_p[k], m_r[k], rtol=1e-9, atol=1e-12, err_msg=k)
        for a, b, e in zip(net_r.params, net_p.params, net_e.params):
            np.testing.assert_allclose(b.grad, a.grad, rtol=1e-9, atol=1e-12,
                                       err_msg=f"step {step} grad {a.name}")
            np.testing.assert_array_equal(a.grad, e.grad, err_msg=f"step {step} grad {a.name}")
        up_r.update(step)
        up_p.update(step)
        up_e.update(step)
        for a, b in zip(net_r.params, net_p.params):
            np.testing.assert_allclose(b.data, a.data, rtol=1e-9, atol=1e-12,
                                       err_msg=f"step {step} param {a.name}")
    assert set(w_r.carry) == set(w_p.carry)
    folded = {n for n, lay in net_p.layers.items() if lay.recurrent and lay.folds_input}
    # every layer that sums its projections folds a dense input; one-hot input is gathered
    dense_summing = {n for n, lay in net_p.layers.items()
                     if lay.recurrent and lay.sums_projections and not lay.one_hot_input}
    assert folded == (dense_summing if Recurrent.FOLD_INPUT > 1 else set())


@pytest.mark.parametrize("kind", list(ck.VARIANTS))
def test_char_rnn(tmp_path, kind):
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path)) + gc.rec_conf(kind, "rec", "onehot", 6)
                       + gc.ip_loss("rec", gc.vocab_size()), extra=UPDATER)
    assert_same(tmp_path, text, steps=4)  # the state is carried across the batches


def test_stacked_gru(tmp_path):
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path), unroll=4)
                       + gc.rec_conf("gru", "gru1", "onehot", 5) + gc.rec_conf("gru", "gru2", "gru1", 3)
                       + gc.ip_loss("gru2", gc.vocab_size()), unroll=4, extra=UPDATER)
    assert_same(tmp_path, text)


def test_dropout_draws_the_reference_masks(tmp_path):
    """A dropout layer run as one block draws each copy's mask from that copy's own stream,
    so the planned executor trains as the reference one does (it drew from a stream of
    the block before, and the two runs parted at the first step)."""
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path), unroll=4)
                       + gc.rec_conf("gru", "gru1", "onehot", 5)
                       + 'layer { name: "drop" type: kDropout srclayers: "gru1" '
                         "dropout_conf { dropout_ratio: 0.4 } }\n"
                       + gc.rec_conf("gru", "gru2", "drop", 3)
                       + gc.ip_loss("gru2", gc.vocab_size()), unroll=4, extra=UPDATER)
    assert_same(tmp_path, text)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_many_to_one_masked(tmp_path, kind):
    path, *_ = gc.masked_store(tmp_path)
    assert_same(tmp_path, gc.many_to_one_text(path, kind).replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER))


def test_many_to_many_masked_ids(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(8, 5))
    y = rng.integers(0, 2, size=(8, 5))
    path = gc.save_npz(tmp_path / "ids.npz", x=x, y=y, lengths=np.array([5, 2, 4, 3, 1, 5, 5, 2]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 4 }} }}\n'
              'layer { name: "embed" type: kEmbedding srclayers: "data" '
              "embedding_conf { vocab_size: 5 feature_dim: 3 } }\n"
              + gc.rec_conf("gru", "gru", "embed", 4)
              + gc.ip_loss("gru", 2, labels="data", loss_extra="softmaxloss_conf { scale: 1.5 }"))
    assert_same(tmp_path, gc.job_text(layers, extra=UPDATER))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_encoder_decoder(tmp_path, kind):
    rng = np.random.default_rng(5)
    enc = gc.save_npz(tmp_path / "enc.npz", x=rng.integers(0, 6, size=(6, 4)))
    dec = gc.save_npz(tmp_path / "dec.npz", x=rng.integers(0, 6, size=(6, 3)),
                      y=rng.integers(0, 4, size=(6, 3)))
    layers = (f'layer {{ name: "enc_data" type: kRecordInput unroll_len: 4 store_conf {{ '
              f'path: "{enc}" batchsize: 3 has_label: false }} }}\n'
              f'layer {{ name: "dec_data" type: kRecordInput store_conf {{ path: "{dec}" batchsize: 3 }} }}\n'
              'layer { name: "enc_embed" type: kEmbedding unroll_len: 4 srclayers: "enc_data" '
              'embedding_conf { vocab_size: 6 feature_dim: 3 } param { name: "emb" } }\n'
              'layer { name: "dec_embed" type: kEmbedding srclayers: "dec_data" '
              'embedding_conf { vocab_size: 6 feature_dim: 3 } param { name: "emb2" share_from: "emb" } }\n'
              + gc.rec_conf(kind, "encoder", "enc_embed", 4, extra="unroll_len: 4")
              + gc.rec_conf(kind, "decoder", "dec_embed", 4,
                            extra='srclayers: "encoder" unroll_conn_type: kUnrollOneToOne '
                                  "unroll_conn_type: kUnrollFirstToLast")
              + gc.ip_loss("decoder", 4, labels="dec_data"))
    assert_same(tmp_path, gc.job_text(layers, unroll=3, extra=UPDATER))


def test_tied_weights_and_euclidean(tmp_path):
    rng = np.random.default_rng(2)
    path = gc.save_npz(tmp_path / "r.npz", x=rng.standard_normal((6, 4, 3)),
                       y=rng.standard_normal((6, 4)))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 3 }} }}\n'
              'layer { name: "a" type: kInnerProduct srclayers: "data" innerproduct_conf { num_output: 3 } '
              'param { name: "wa" } param { name: "ba" } }\n'
              'layer { name: "t" type: kActivation srclayers: "a" activation_conf { type: TANH } }\n'
              'layer { name: "b" type: kInnerProduct srclayers: "t" innerproduct_conf { num_output: 3 } '
              'param { name: "wb" share_from: "wa" } param { name: "bb" } }\n'
              + gc.rec_conf("rnn", "rec", "b", 5)
              + 'layer { name: "out" type: kInnerProduct srclayers: "rec" innerproduct_conf { num_output: 1 } }\n'
                'layer { name: "loss" type: kEuclideanLoss srclayers: "out" srclayers: "data" '
                'euclideanloss_conf { target: kLabels } }\n')
    assert_same(tmp_path, gc.job_text(layers, unroll=4, extra=UPDATER))


def test_not_plannable_falls_back_with_the_reason(tmp_path):
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path))
                       + gc.rec_conf("gru", "rec", "onehot", 4)
                       + 'layer { name: "ip" type: kInnerProduct srclayers: "rec" shift: 1 '
                         f"innerproduct_conf {{ num_output: {gc.vocab_size()} }} }}\n"
                       + 'layer { name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "label" }\n')
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), net_info(path, tmp_path, 0))
    with pytest.raises(NotPlannable, match=r'layer "ip" \(kInnerProduct\) reads "rec" with a shift'):
        plan(net)
    w, note = make_worker(net)
    assert type(w) is Worker and "with a shift" in note
    w2, note2 = make_worker(net, executor="reference")
    assert type(w2) is Worker


def sampling_net(tmp_path, T):
    layers = ('layer { name: "d" type: kRNNDummy rnn_dummy_conf { dynamic_srclayer: "s" integer: true } }\n'
              'layer { name: "oh" type: kOneHot srclayers: "d" onehot_conf { vocab_size: 5 } }\n'
              + gc.rec_conf("gru", "g", "oh", 4)
              + 'layer { name: "ip" type: kInnerProduct srclayers: "g" innerproduct_conf { num_output: 5 } }\n'
                'layer { name: "s" type: kArgSort srclayers: "ip" }\n')
    path = gc.write_job(tmp_path, gc.job_text(layers, unroll=T))
    job = load_job(path)
    return Net(unroll(job.neuralnet, Phase.TEST), make_backend(None), net_info(path, tmp_path, 0))


def test_a_one_step_sampling_net_is_planned_and_a_longer_one_is_not(tmp_path):
    """A one-copy net fed back from the last batch (the sampler's) runs planned: the
    feedback is carried state; feedback inside a batch of several copies is refused."""
    assert plan(sampling_net(tmp_path, 1)).T == 1
    with pytest.raises(NotPlannable, match="fed back from another layer within a batch"):
        plan(sampling_net(tmp_path, 3))


def test_the_sampler_runs_planned_and_draws_what_the_reference_draws(tmp_path, monkeypatch):
    """engine.sample on the planned executor prints the reference executor's characters."""
    from charjobs import char_job, run_cli
    from engine import planner, sample
    r = run_cli("engine.train", char_job(tmp_path, steps=20, hidden=12, unroll=10))
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "ws" / "checkpoints" / "step20.npz"
    planned = sample.Sampler(str(ckpt), seed=5)
    assert isinstance(planned.worker, PlannedWorker)
    text = planned.generate(60, temperature=1.0)
    monkeypatch.setattr(sample, "make_worker",
                        lambda net, **kw: planner.make_worker(net, executor="reference", **kw))
    ref = sample.Sampler(str(ckpt), seed=5)
    assert type(ref.worker) is Worker
    assert ref.generate(60, temperature=1.0) == text


@pytest.mark.parametrize("executor", ["reference", "auto"])
def test_val_net_reads_the_train_nets_weights(tmp_path, executor):
    """A val net sharing the train net's params computes with those weights (also the
    stacked recurrent weights), before and after updates."""
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path)) + gc.rec_conf("lstm", "rec", "onehot", 6)
                       + gc.ip_loss("rec", gc.vocab_size()), extra=UPDATER)
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    be = make_backend(None, np.float64)
    mk = lambda: Net(unroll(job.neuralnet, Phase.TRAIN), be, net_info(path, tmp_path / "ws", 0), seed=3)
    train, val = mk(), Net(unroll(job.neuralnet, Phase.VAL), be, net_info(path, tmp_path / "ws", 0), seed=99)
    val.share_params_from(train)
    w_train, _ = make_worker(train, executor=executor)
    up = Updater(job.updater, train.params, np)
    for step in range(2):
        w_train.run_batch(train=True)
        up.update(step)
    probe, _ = make_worker(train, executor=executor, carry=pb.kResetBatch)
    w_val, _ = make_worker(val, executor=executor, carry=pb.kResetBatch)
    for lay in (train.inputs + val.inputs):
        lay.cursor = 0
    expect = probe.run_batch(train=False)["loss"][0]
    got = w_val.run_batch(train=False)["loss"][0]
    assert got == pytest.approx(expect, rel=1e-12)


# ------------------------------------------------------- bidirectional nets
@pytest.mark.parametrize("kind", ["gru", "gru-hb", "lstm", "rnn"])
def test_bidirectional_char_rnn(tmp_path, kind):
    """Two bidirectional levels over a char stream: the forward layers carry their state
    across batches, the backward ones start every batch from zeros, in both executors."""
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path), unroll=4)
                       + gc.bidir_level(kind, "bi1", "onehot", 5) + gc.bidir_level(kind, "bi2", "bi1", 3)
                       + gc.ip_loss("bi2", gc.vocab_size()), unroll=4, extra=UPDATER)
    assert_same(tmp_path, text, steps=4)
    (net, w, _), _ = pair(tmp_path, text)
    assert isinstance(make_worker(net)[0], PlannedWorker)
    w.run_batch(train=True)
    assert set(w.carry) == {"bi1_f", "bi2_f"}


@pytest.mark.parametrize("kind", list(ck.CELLS))
def test_bidirectional_many_to_one_masked(tmp_path, kind):
    path, *_ = gc.masked_store(tmp_path)
    assert_same(tmp_path, gc.bidir_many_to_one_text(path, kind).replace(
        "train_one_batch { alg: kBPTT }", "train_one_batch { alg: kBPTT }\n" + UPDATER))


@pytest.mark.parametrize("carry", ["kCarry", "kResetBatch"])
def test_backward_decoder_initial_state_and_carry_policy(tmp_path, carry):
    """A first-to-last source starts a kBackward layer's pass (its last copy); under kCarry
    the forward encoder carries its state and the backward decoder still does not."""
    rng = np.random.default_rng(6)
    path = gc.save_npz(tmp_path / "s.npz", x=rng.standard_normal((6, 4, 2)),
                       y=rng.integers(0, 3, size=(6, 4)), lengths=np.array([4, 2, 3, 4, 1, 3]))
    layers = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
              f'path: "{path}" batchsize: 3 }} }}\n'
              + gc.rec_conf("lstm", "encoder", "data", 4)
              + gc.rec_conf("lstm", "decoder", "data", 4,
                            extra='srclayers: "encoder" unroll_conn_type: kUnrollOneToOne '
                                  "unroll_conn_type: kUnrollFirstToLast",
                            conf_extra="direction: kBackward")
              + gc.ip_loss("decoder", 3, labels="data"))
    text = gc.job_text(layers, unroll=4, extra=UPDATER).replace(
        "train_one_batch { alg: kBPTT }", f"train_one_batch {{ alg: kBPTT state_carry: {carry} }}")
    assert_same(tmp_path, text, steps=3)
    (_, w, _), (net_p, w_p, _) = pair(tmp_path, text)
    assert plan(net_p).blocks[2].init_src == "encoder"
    for worker in (w, w_p):
        worker.run_batch(train=True)
        assert set(worker.carry) == ({"encoder"} if carry == "kCarry" else set())


def test_other_context_offsets_are_not_planned(tmp_path, monkeypatch):
    from engine.layers.recurrent import GRULayer
    text = gc.job_text(gc.char_layers(gc.char_data(tmp_path)) + gc.rec_conf("gru", "rec", "onehot", 4)
                       + gc.ip_loss("rec", gc.vocab_size()))
    path = gc.write_job(tmp_path, text)
    job = load_job(path)
    monkeypatch.setattr(GRULayer, "context_sources", classmethod(lambda cls, conf: [(conf.name, 2)]))
    net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), net_info(path, tmp_path, 0))
    with pytest.raises(NotPlannable, match=r'layer "rec" \(kGRU\) reads its own copies at offsets \[2\]'):
        plan(net)
