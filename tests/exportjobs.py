"""Small exportable nets for the export / import tests: job files, checkpoints with random
params, and the engine's own forward (the reference executor) over one batch."""
from __future__ import annotations

import pathlib

import numpy as np
from google.protobuf import text_format

from engine import checkpoint as ckpt
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.workspace import load_params, net_info, param_arrays
import cellkinds as ck
from engine.unroll import unroll
from engine.worker import Worker

TEXT = "the cat ate a bad bee; a tea cab ebbed at the deck.\n" * 6
V_CHAR = len(set(TEXT))
N_SEQ, STEPS, F, CLASSES, ID_VOCAB = 8, 9, 3, 4, 7



def write_data(tmp: pathlib.Path) -> None:
    """The char text and two sequence stores (float features, token ids) in ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "text.txt").write_text(TEXT, encoding="utf-8")
    rng = np.random.default_rng(0)
    np.savez(tmp / "feat.npz", x=rng.standard_normal((N_SEQ, STEPS, F)),
             y=rng.integers(0, CLASSES, (N_SEQ, STEPS)))
    np.savez(tmp / "ids.npz", x=rng.integers(0, ID_VOCAB, (N_SEQ, STEPS)),
             y=rng.integers(0, CLASSES, (N_SEQ, STEPS)))


def cell(kind: str, name: str, src: str, hidden: int, extra: str = "", backward: bool = False) -> str:
    return (f'layer {{ name: "{name}" type: {ck.type_name(kind)} srclayers: "{src}" {extra} '
            f"{ck.conf_text(kind, hidden, 'direction: kBackward' if backward else '')} }}\n")


def bidir(kind: str, k: int, src: str, hidden: int) -> str:
    """Bidirectional level k: "rec{k}" (forward) and "rec{k}r" (kBackward) over ``src``,
    joined by the kConcate "cat{k}" (features, forward first)."""
    return (cell(kind, f"rec{k}", src, hidden) + cell(kind, f"rec{k}r", src, hidden, backward=True)
            + f'layer {{ name: "cat{k}" type: kConcate srclayers: "rec{k}" srclayers: "rec{k}r" '
              f"concate_conf {{ concate_dim: 1 }} }}\n")


def model_job(tmp: pathlib.Path, *, kind: str = "gru", inp: str = "onehot", layers: int = 1,
              hidden: int = 6, T: int = 5, B: int = 3, dropout: bool = False, body: str = "",
              fname: str = "job.conf", extra: str = "", bidirectional: bool = False) -> pathlib.Path:
    """A job: data -> [kOneHot | kEmbedding] -> ``layers`` x ``kind`` (kDropout between
    when ``dropout``; bidirectional levels, ``bidir``, when ``bidirectional``) ->
    kInnerProduct "ip" -> kSoftmaxLoss. ``inp``: "onehot" or
    "embedding" over char streams, "features" (float store), "ids" (id store -> kOneHot
    without vocab_size). ``body`` replaces the layers between the data and the loss."""
    write_data(tmp)
    if inp in ("onehot", "embedding"):
        data = (f'layer {{ name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf {{ '
                f'path: "{tmp / "text.txt"}" batchsize: {B} unroll_len: {T} }} }}\n'
                'layer { name: "label" type: kRNNLabel srclayers: "data" '
                "unroll_conn_type: kUnrollOneToAll }\n")
        conn, labels, V = "unroll_conn_type: kUnrollOneToAll", "label", V_CHAR
    else:
        store = "feat.npz" if inp == "features" else "ids.npz"
        data = (f'layer {{ name: "data" type: kRecordInput store_conf {{ backend: "npz" '
                f'path: "{tmp / store}" batchsize: {B} }} }}\n')
        conn, labels, V = "", "data", CLASSES
    if not body:
        src = "data"
        if inp in ("onehot", "ids"):
            body += f'layer {{ name: "onehot" type: kOneHot srclayers: "data" {conn} }}\n'
            src = "onehot"
        elif inp == "embedding":
            body += (f'layer {{ name: "embed" type: kEmbedding srclayers: "data" {conn} '
                     f"embedding_conf {{ vocab_size: {V_CHAR} feature_dim: 4 }} }}\n")
            src = "embed"
        for k in range(1, layers + 1):
            if bidirectional:
                body += bidir(kind, k, src, hidden)
                src = f"cat{k}"
            else:
                body += cell(kind, f"rec{k}", src, hidden)
                src = f"rec{k}"
            if dropout and k < layers:
                body += (f'layer {{ name: "drop{k}" type: kDropout srclayers: "{src}" '
                         f"dropout_conf {{ dropout_ratio: 0.3 }} }}\n")
                src = f"drop{k}"
        body += (f'layer {{ name: "ip" type: kInnerProduct srclayers: "{src}" '
                 f"innerproduct_conf {{ num_output: {V} }} }}\n")
    text = (f'name: "exp"\ntrain_steps: 1\ntrain_one_batch {{ alg: kBPTT }}\n'
            f"updater {{ type: kSGD learning_rate {{ type: kFixed base_lr: 0.1 }} }}\n"
            f'cluster {{ workspace: "{tmp / "ws"}" }}\n{extra}\n'
            f"neuralnet {{ unroll_len: {T}\n{data}{body}"
            f'layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "{labels}" }}\n}}\n')
    path = tmp / fname
    path.write_text(text, encoding="utf-8")
    return path


def build(job_path, dtype=np.float64, seed: int = 0):
    """The job's train net (NumPy, ``dtype``) and a reference worker starting from zeros."""
    job = load_job(job_path)
    u = unroll(job.neuralnet, Phase.TRAIN, job.name, where=str(job_path))
    net = Net(u, make_backend(None, dtype), net_info(job_path, pathlib.Path(job_path).parent / "ws",
                                                     seed), seed=seed, where=str(job_path))
    return net, Worker(net, seed=seed, carry=pb.kResetBatch)


def make_checkpoint(job_path, seed: int = 1, scale: float = 0.5) -> pathlib.Path:
    """A checkpoint of the job's net with params drawn from U(-scale, scale), written as
    engine.train writes them (params, the job text, the vocabulary)."""
    job = load_job(job_path)
    net, _ = build(job_path, np.float32)
    rng = np.random.default_rng(seed)
    for p in net.params:
        p.data[...] = rng.uniform(-scale, scale, p.data.shape)
    meta = {"step": 1, "job": text_format.MessageToString(job), "job_path": str(job_path),
            "vocab": net.info.get("vocab")}
    return ckpt.save(pathlib.Path(job_path).parent / "ckpt" / "step1.npz",
                     ckpt.join(param=param_arrays(net)), meta)


def engine_forward(job_path, checkpoint, h0=None, c0=None):
    """One batch through the engine's reference executor in float64 with the checkpoint's
    params and initial state (h0, c0: [N·L, B, H], default zeros; the recurrent layers in
    set-up order, level by level, forward first: PyTorch's order).

    Returns (inputs, logits [T, B, V], hT [N·L, B, H] (each layer's state where its pass
    ended: copy T-1, or copy 0 for a backward layer), cT or None, worker); inputs are ids
    [T, B] (int64) or features [T, B, F] (float32) as the data layer fed them."""
    net, w = build(job_path)
    arrays, _ = ckpt.load(checkpoint)
    load_params(net, arrays, str(checkpoint))
    cells = [lay for lay in net.layers.values() if lay.recurrent]
    w.load()
    if h0 is not None:
        start = {}
        for k, lay in enumerate(cells):
            h = np.asarray(h0[k], np.float64)
            start[lay.name] = (h, np.asarray(c0[k], np.float64)) if c0 is not None else h
        w.initial_state = lambda lay: start[lay.name]   # where each layer's pass starts
    w.forward(False, {})
    T = net.layers["ip"].conf.unroll_len
    data = net.layers["data"]
    if data.conf.type == pb.kCharRNN:
        inputs = np.asarray(w.outs["0#data"])[:, :T].T.astype(np.int64)
    else:
        inputs = np.stack([np.asarray(w.outs[f"{t}#data"]) for t in range(T)])
        inputs = inputs.astype(np.int64 if inputs.dtype.kind in "iu" else np.float32)
    logits = np.stack([w.outs[f"{t}#ip"] for t in range(T)])
    last = [w.states[f"{0 if lay.reverse else T - 1}#{lay.name}"] for lay in cells]
    if isinstance(last[0], tuple):
        return inputs, logits, np.stack([s[0] for s in last]), np.stack([s[1] for s in last]), w
    return inputs, logits, np.stack(last), None, w
