"""``python -m engine.export CHECKPOINT OUT``: a trained net as ONNX or PyTorch-layout weights.

OUT's extension picks the format:
  .onnx          an inference model that onnxruntime runs (needs the ``onnx`` package,
                 ``pip install 'rnn-engine[export]'``)
  .safetensors   the weights in PyTorch's layout (no package needed)
What is exported and how each param maps is ``engine/interop.py``'s docstring.

The net is the checkpoint's own job (its train phase) rebuilt without its data, so the
corpus need not be at hand: each data layer becomes a placeholder (kRNNDummy) giving
ids, or float features of the width the checkpoint's first recurrent layer takes;
label, loss and output layers are dropped. The checkpoint's params are then loaded by
name as in training.

Exit status: 0 written; 2 bad input (one line ``error: ...`` on stderr; ``--debug``
shows the traceback).
"""
from __future__ import annotations

import sys

from engine.stopping import StopSignals

# Before the imports below: a Ctrl-C while they load (or while this short command runs)
# is one line on stderr and exit 130, not a traceback.
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None

import argparse  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402

from engine import checkpoint as ckpt  # noqa: E402
from engine import cli  # noqa: E402
from engine import interop  # noqa: E402
from engine import safetensors_io  # noqa: E402
from engine.backend import make_backend  # noqa: E402
from engine.config import ConfigError, Phase, layers_in_phase, normalise, parse_job  # noqa: E402
from engine.net import Net  # noqa: E402
from engine.proto import job_pb2 as pb  # noqa: E402
from engine.workspace import check_values, load_params, net_info  # noqa: E402
from engine.unroll import unroll  # noqa: E402

FORMATS = {".onnx": "onnx", ".safetensors": "safetensors", ".bin": "singa"}


def inference_job(job: pb.JobProto, feature_dims: dict | None = None,
                  onehot_sizes: dict | None = None) -> pb.JobProto:
    """The train phase of ``job`` without its data: each data layer a kRNNDummy giving
    ids (char streams, or when a kOneHot / kEmbedding reads them) or floats of width
    ``feature_dims[name]`` (1 when unknown); a kOneHot that cannot know its width from a
    vocabulary takes ``onehot_sizes[name]`` (1 when unknown); label, loss and output
    layers dropped."""
    feature_dims, onehot_sizes = feature_dims or {}, onehot_sizes or {}
    layers = layers_in_phase(job.neuralnet, Phase.TRAIN)
    ids = any(lay.type in interop.ENCODERS for lay in layers)
    out = pb.JobProto()
    out.name = job.name
    out.neuralnet.unroll_len = job.neuralnet.unroll_len
    for lay in layers:
        if interop.is_outside(lay):
            continue
        c = out.neuralnet.layer.add()
        if interop.is_source(lay):
            c.name, c.type, c.unroll_len = lay.name, pb.kRNNDummy, lay.unroll_len
            c.rnn_dummy_conf.dynamic_srclayer = lay.name
            if ids or interop.is_text_input(lay):
                c.rnn_dummy_conf.integer = True
            else:
                c.rnn_dummy_conf.shape.append(int(feature_dims.get(lay.name, 1)))
            continue
        c.CopyFrom(lay)
        del c.include[:]
        del c.exclude[:]
        if lay.name in onehot_sizes:
            c.onehot_conf.vocab_size = int(onehot_sizes[lay.name])
    return out


def inference_net(arrays: dict, meta: dict, where: str) -> Net:
    """The checkpoint's net (float32, NumPy) without its data, its params loaded.

    Built once with placeholder input widths, whose built layers name the first recurrent
    layer's input weight; when the checkpoint's weight is wider, built again with that
    width (float features, or a kOneHot over ids without a vocabulary)."""
    if "job" not in meta:
        raise ConfigError(f"{where}: the checkpoint holds no job; it was not written by "
                          f"python -m engine.train")
    job = parse_job(meta["job"], f"{where} (its job)")
    normalise(job, where)
    vocab = meta.get("vocab")
    info = net_info(meta.get("job_path", "."), pathlib.Path(where).parent, 0, vocab)
    dims: dict = {}
    sizes: dict = {}

    def build() -> Net:
        u = unroll(inference_job(job, dims, sizes).neuralnet, Phase.TRAIN, job.name, where=where)
        return Net(u, make_backend(None, np.float32), dict(info), seed=0, where=where)

    for lay in layers_in_phase(job.neuralnet, Phase.TRAIN):
        if lay.type == pb.kOneHot and not lay.onehot_conf.HasField("vocab_size") and not vocab:
            sizes[lay.name] = 1
    net = build()
    chain = interop.chain_of(net, where)
    first = chain.cells[0]
    w = ckpt.section(arrays, "param").get(first.params[chain.spec.hx[0]].name)
    if w is not None and w.ndim == 2 and w.shape[1] != first.D:
        if chain.encoder is None:
            dims[chain.source.name] = int(w.shape[1])
        elif chain.encoder.name in sizes:
            sizes[chain.encoder.name] = int(w.shape[1])
        net = build()
    load_params(net, arrays, where)
    return net


def format_of(out) -> str:
    """"onnx", "safetensors" or "singa" (OUT named like SINGA's checkpoints,
    ``step<N>-worker<K>``, or ending in .bin), from OUT's name; ConfigError otherwise."""
    if ckpt.singa_checkpoint_name(out) is not None:
        return "singa"
    suffix = pathlib.Path(out).suffix
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        raise ConfigError(f"{out}: unknown format {suffix or '(no extension)'!r}; OUT must end in "
                          f".onnx, .safetensors or .bin, or be named step<N>-worker<K> (SINGA)")
    return fmt


def export_singa(arrays: dict, meta: dict, out, where: str = "<checkpoint>") -> str:
    """The checkpoint's params as a SINGA v0.3 checkpoint (BlobProtos): every param by its
    name, owner copy ``0#``, version = the checkpoint's step (SINGA initialises a param of
    version 0 anew), so SINGA's Worker loads them all. Params must be real and finite."""
    params = ckpt.section(arrays, "param")
    for name, a in params.items():
        check_values(a, f'{where}: param "{name}"')
    step = int(meta.get("step", 0)) or 1
    ckpt.save_singa(out, params, step=step)
    return f"{len(params)} params as a SINGA checkpoint (BlobProtos), version {step}"


def write_file(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` atomically: a temporary file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(net: Net, out, vocab=None, where: str = "<net>", encoding=None) -> str:
    """Write ``net`` to ``out`` in the format of its extension; returns a one-line summary."""
    out = pathlib.Path(out)
    fmt = format_of(out)
    chain = interop.chain_of(net, where)
    d = chain.describe()
    L, H, V = d["num_layers"], d["hidden_size"], d["output_size"]
    bi = chain.directions == 2
    if fmt == "onnx":
        model = interop.onnx_model(net, where, vocab, encoding)
        write_file(out, model.SerializeToString())
        x = "x [T, B, %s]" % d["input_size"] if chain.encoder is None else "ids [T, B]"
        n = chain.directions * len(chain.levels)
        state = f"h0 [{n}, B, {H}]" + (f", c0 [{n}, B, {H}]" if chain.kind == pb.kLSTM else "")
        state_out = state.replace("h0", "hT").replace("c0", "cT")
        return (f"ONNX opset {interop.OPSET}, {L} x {'bidirectional ' if bi else ''}{d['rnn']} "
                f"{H}; inputs {x}, {state}; outputs logits [T, B, {V}], {state_out}")
    tensors = interop.torch_state(net, where)
    write_file(out, safetensors_io.encode(tensors, interop.metadata(chain, vocab, encoding)))
    mods = (f"rnn = nn.{d['rnn']}({d['input_size']}, {H}, {L}"
            f"{', bidirectional=True' if bi else ''}), "
            f"head = nn.Linear({chain.directions * int(H)}, {V})")
    if interop.EMBED_W in tensors:
        mods = "embed = nn.Embedding(%d, %d), " % tensors[interop.EMBED_W].shape + mods
    return f"{len(tensors)} tensors in PyTorch's layout for {mods}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.export",
        description="Export a checkpoint's net: OUT.onnx, an inference model for onnxruntime "
                    "(needs the onnx package); OUT.safetensors, the weights in PyTorch's layout "
                    "(rnn.weight_ih_l0 ..., head.weight, head.bias).")
    ap.add_argument("checkpoint", help="a checkpoint written by engine.train (step<N>.npz)")
    ap.add_argument("out", help="the file to write: .onnx, .safetensors, or a SINGA checkpoint "
                                "(named step<N>-worker<K>, or ending in .bin)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    try:
        fmt = format_of(a.out)  # before the work
        arrays, meta = ckpt.load(a.checkpoint)
        if fmt == "singa":   # params only: any net SINGA can hold them for
            summary = export_singa(arrays, meta, a.out, a.checkpoint)
        else:
            net = inference_net(arrays, meta, a.checkpoint)   # its params are checked on loading
            summary = export(net, a.out, meta.get("vocab"), a.checkpoint, meta.get("encoding"))
    except OSError as e:
        if a.debug:
            raise
        print(f"error: {a.out}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every failure is one line (engine/cli.py)
        if a.debug:
            raise
        return cli.report(e)
    print(f"wrote {a.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
