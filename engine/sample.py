"""``python -m engine.sample --checkpoint CKPT [--job JOB] [--length N] [--temperature T]
[--prime TEXT] [--top-k K] [--seed S] [--gpu ID | --cpu]``: generate text from a trained char-rnn.

The checkpoint carries the job it was trained with; from it the sampler
derives a one-step net: the char data layer becomes a kRNNDummy fed back from
a kArgSort over the scores the softmax loss read, label and loss layers are
dropped, every layer gets unroll_len 1, and the recurrent state is carried
from step to step. ``--job`` gives another net instead: a SINGA-style sample
job (kRNNDummy + kArgSort + kCharRNNOutput) runs as written; a training job
is turned into a sampling net as above. Its params must match the
checkpoint's (names and shapes), or the error names them. A SINGA checkpoint
(``step<N>-worker<K>``) holds params only: it needs ``--job``, and the vocabulary
comes from that job's kCharRNNOutput (``char_rnn_conf { vocab_path }``).

Temperature 0 takes the argmax; T > 0 draws from softmax(scores / T),
restricted to the K best with ``--top-k``. With a byte vocabulary (engine/text.py)
the bytes are printed as UTF-8, a sequence that does not decode as U+FFFD.
``--cpu`` samples on the CPU when the ``--job`` names a GPU (the checkpoint's own
job's ``gpu`` field is never used: a checkpoint moves between machines).

The text is printed as it is generated. SIGINT/SIGTERM stop between two
characters (engine/stopping.py): what was printed stays, one line on stderr
says so, exit 130/143.
"""
from __future__ import annotations

import sys

from engine.stopping import StopSignals

# Before the imports below: a Ctrl-C while they load is one line, exit 130 (not a traceback).
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from engine import checkpoint as ckpt
from engine import cli
from engine.backend import device_of, make_backend, to_host
from engine.config import (ConfigError, Phase, job_dir, layers_in_phase, load_job, normalise,  # noqa: E402
                           parse_job, validate)
from engine.layers import layer_class
from engine.layers.base import InputLayer, LossLayer
from engine.layers.input import resolve_path  # noqa: E402
from engine.layers.output import ArgSort
from engine import text as tx
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.stopping import ABORT, DEFER, ForcedExit, Stop, exit_status, signal_name
from engine.workspace import load_params, net_info, workspace_of
from engine.unroll import unroll
from engine.planner import make_worker

PREV, SAMPLE = "prev_char", "sample"


def _feedback(conf: pb.LayerProto) -> bool:
    """The layer is fed back from another layer's previous step (kRNNDummy)."""
    cls = layer_class(conf.type)
    return cls is not None and any(name != conf.name for name, _ in cls.context_sources(conf))


def sampling_job(job: pb.JobProto, where: str = "<job>") -> pb.JobProto:
    """The one-step sampling net derived from a char-rnn training job: the text input
    becomes a kRNNDummy fed back from a kArgSort over the scores of the loss that
    classifies; the layers a sampling net has no use for (labels, losses, outputs: their
    classes say ``in_sampling_net = False``) are dropped."""
    layers = layers_in_phase(job.neuralnet, Phase.TRAIN)
    classes = {lay.name: layer_class(lay.type) for lay in layers}
    data = [lay for lay in layers if issubclass(classes[lay.name], InputLayer)
            and classes[lay.name].text]
    losses = [lay for lay in layers if issubclass(classes[lay.name], LossLayer)
              and classes[lay.name].classifies]
    if len(data) != 1 or not losses:
        raise ConfigError(f"{where}: cannot derive a sampling net: it needs one text input layer "
                          f"(kCharRNN) and a loss over classes (kSoftmaxLoss); give a sample job "
                          f"with --job")
    dname = data[0].name
    scores = losses[0].srclayers[0]
    drop = {dname} | {lay.name for lay in layers if not classes[lay.name].in_sampling_net}
    out = pb.JobProto()
    out.name = (job.name or "job") + "-sample"
    out.train_one_batch.alg = pb.kBPTT
    out.train_one_batch.state_carry = pb.kCarry
    net = out.neuralnet
    net.unroll_len = 1
    dummy = net.layer.add(name=PREV, type=pb.kRNNDummy, unroll_len=1)
    dummy.rnn_dummy_conf.dynamic_srclayer = SAMPLE
    dummy.rnn_dummy_conf.integer = True
    for lay in layers:
        if lay.name in drop:
            continue
        c = net.layer.add()
        c.CopyFrom(lay)
        c.unroll_len = 1
        del c.include[:]
        del c.exclude[:]
        del c.shift[:]
        srcs = [PREV if s == dname else s for s in lay.srclayers]
        conns = [pb.kUnrollOneToOne if s == PREV else t for s, t in zip(srcs, lay.unroll_conn_type)]
        del c.srclayers[:]
        c.srclayers.extend(srcs)
        del c.unroll_conn_type[:]
        c.unroll_conn_type.extend(conns)
    arg = net.layer.add(name=SAMPLE, type=pb.kArgSort, unroll_len=1)
    arg.srclayers.append(scores)
    normalise(out, where)
    validate(out, where)
    return out


def _job_vocab(job: pb.JobProto, job_path) -> tuple[list, str] | None:
    """(vocabulary, unit) from the vocab_path of the job's text input layer (kCharRNN's
    char_rnn_conf), read in the unit the job says (a job in SINGA's syntax: bytes), or None
    when it names none."""
    for lay in layers_in_phase(job.neuralnet, Phase.TRAIN):
        cls = layer_class(lay.type)
        if cls is not None and issubclass(cls, InputLayer) and cls.text and \
                lay.char_rnn_conf.vocab_path:
            c = lay.char_rnn_conf
            path = resolve_path(c.vocab_path, {"job_dir": str(job_dir(job_path))})
            try:
                return tx.read_vocab(path, tx.check_encoding(c.encoding, "char_rnn_conf.encoding"))
            except tx.TextError as e:
                raise ConfigError(f'{job_path}: layer "{lay.name}": {e}') from None
    return None


class Sampler:
    """A one-step net over a checkpoint's params that emits one character per step."""

    def __init__(self, ckpt_path: str, job_path: str | None = None, seed: int = 0, gpu=None,
                 cpu: bool = False):
        arrays, meta = ckpt.load_any(ckpt_path)  # this engine's .npz or SINGA's BlobProtos
        self.vocab = ckpt.meta_vocab(ckpt_path, meta)
        self.encoding = meta.get("encoding") or tx.UTF8
        if job_path:
            job, where = load_job(job_path), job_path
        elif meta.get("format") == "singa":
            raise ConfigError(f"{ckpt_path}: a SINGA checkpoint holds params only; give the "
                              f"net to sample with --job (a sample job such as SINGA's "
                              f"sample.conf)")
        else:
            ckpt.check_meta(ckpt_path, meta, {"job": str})
            job, where = parse_job(meta["job"], f"{ckpt_path} (its job)"), f"{ckpt_path} (its job)"
            normalise(job, where)
        # the sampling net is the job's test phase: its own feedback layer, if it has one
        self.singa_style = any(_feedback(lay) for lay in layers_in_phase(job.neuralnet, Phase.TEST))
        if not self.vocab and job_path:   # a SINGA checkpoint: the job's text input names it
            self.vocab, self.encoding = _job_vocab(job, job_path) or (None, self.encoding)
        if not self.vocab and not self.singa_style:
            why = ("a SINGA checkpoint; give --job a sample job whose kCharRNNOutput has "
                   "char_rnn_conf { vocab_path }" if meta.get("format") == "singa"
                   else "not a char-rnn job")
            raise ConfigError(f"{ckpt_path}: the checkpoint has no vocabulary ({why})")
        gpu = device_of(cpu, gpu, job.gpu if job_path else ())  # never the checkpoint's job's
        sjob = job if self.singa_style else sampling_job(job, where)
        for lay in sjob.neuralnet.layer:
            if layer_class(lay.type).reverse_pass(lay):
                raise ConfigError(f'{where}: layer "{lay.name}" runs backward in time (direction: '
                                  f"kBackward): each of its steps reads the symbols after it, "
                                  f"and a sampler draws one symbol at a time, forward; sample "
                                  f"with a net whose recurrent layers all run forward")
        self.job = sjob
        u = unroll(sjob.neuralnet, Phase.TEST, sjob.name, where=where)
        ws = workspace_of(job, None)
        info = net_info(job_path or meta.get("job_path", "."), ws, seed, self.vocab, self.encoding)
        info["batchsize"] = 1
        self.net = Net(u, make_backend(gpu), info, seed=seed, where=where)
        load_params(self.net, arrays, f"{ckpt_path} vs {where}")
        if not self.vocab:  # a SINGA checkpoint: the sample job's vocabulary (kCharRNNOutput's)
            self.vocab = self.net.info.get("vocab")
            self.encoding = self.net.info.get("encoding", tx.UTF8)
            if not self.vocab:
                raise ConfigError(f"{where}: no vocabulary to sample with: the checkpoint has "
                                  f"none; give the kCharRNNOutput layer char_rnn_conf "
                                  f"{{ vocab_path }}")
        self.worker, self.executor = make_worker(self.net, seed=seed, carry=pb.kCarry)
        dummies = [lay for lay in self.net.layers.values() if _feedback(lay.conf)]
        if not dummies:
            raise ConfigError(f"{where}: the sampling net has no layer fed back from a kArgSort "
                              f"(a kRNNDummy with dynamic_srclayer); sampling draws each next "
                              f"character with one")
        self.dummy = dummies[0]
        drawer = type(self.dummy).context_sources(self.dummy.conf)[0][0]
        self.argsort = self.net.layers[drawer]
        if not isinstance(self.argsort, ArgSort):
            raise ConfigError(f'{where}: layer "{self.dummy.name}" is fed back from '
                              f'"{drawer}", which is not a kArgSort; sampling draws each next '
                              f"character with a kArgSort layer")
        self.argsort.limit = len(self.vocab)
        self.xp = self.net.xp

    def _step(self, feed_id: int | None) -> int:
        if feed_id is not None:
            self.worker.carry[self.dummy.name] = self.xp.asarray(np.array([feed_id], np.int64))
        self.worker.run_batch(train=False, load=False)
        y = self.worker.output(self.argsort.name)
        return int(to_host(y).reshape(-1)[0])

    def stream(self, length: int, temperature: float = 1.0, prime: str = "", top_k: int = 0):
        """The ``length`` symbols generated after ``prime``, one at a time (a generator:
        each is yielded as soon as it is drawn): characters, or bytes for a byte
        vocabulary (``tx.Display`` prints them)."""
        self.argsort.temperature = float(temperature)
        self.argsort.sample_topk = int(top_k)
        prime = tx.from_user(prime, self.encoding)
        if prime:
            try:
                ids = tx.encode_text(prime, self.vocab, "--prime", self.encoding).tolist()
            except tx.TextError as e:
                raise ConfigError(str(e)) from None
        else:
            ids = [self.vocab.index("\n") if "\n" in self.vocab else 0]
        nxt = None
        for i in ids:
            nxt = self._step(i)
        for k in range(length):
            yield self.vocab[nxt]
            if k + 1 < length:
                nxt = self._step(None)

    def generate(self, length: int, temperature: float = 1.0, prime: str = "",
                 top_k: int = 0) -> str:
        """``prime`` followed by ``length`` generated symbols, as printable text (bytes
        decoded as UTF-8, U+FFFD for a sequence that does not decode)."""
        symbols = "".join(self.stream(length, temperature, prime, top_k))
        return tx.for_display(tx.from_user(prime, self.encoding) + symbols, self.encoding)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.sample",
                                 description="Generate text from a trained char-rnn checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint file (step<N>.npz)")
    ap.add_argument("--job", help="sample with this net instead of the checkpoint's own job")
    ap.add_argument("--length", type=int, default=500, help="characters to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = argmax")
    ap.add_argument("--prime", default="", help="text to start from")
    ap.add_argument("--top-k", type=int, default=0, help="draw only among the K best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", type=int, help="sample on this GPU (CuPy)")
    ap.add_argument("--cpu", action="store_true",
                    help="sample on the CPU even when the --job names a GPU (gpu: 0)")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    for opt, v in (("--length", a.length), ("--temperature", a.temperature), ("--top-k", a.top_k)):
        if not math.isfinite(v) or v < 0:
            print(f"error: {opt} is {v}; it must be a finite number >= 0", file=sys.stderr)
            return 2
    stops = _STOPS if _STOPS is not None else StopSignals(sys.stderr).install()
    stops.phase = ABORT  # loading: a signal stops at once (nothing printed yet)
    written = 0
    try:
        s = Sampler(a.checkpoint, a.job, a.seed, a.gpu, a.cpu)
        chars = s.stream(a.length, a.temperature, a.prime, a.top_k)
        show = tx.Display(s.encoding)
        text = a.prime
        stops.phase = DEFER  # from here every character is printed as it comes
        _emit(a.prime)
        for ch in chars:
            shown = show(ch)
            _emit(shown)
            text += shown
            written += 1
            stops.check()
        tail = show.flush()  # an unfinished UTF-8 sequence at the end: U+FFFD
        _emit(tail)
        text += tail
        _emit("" if text.endswith("\n") else "\n")
        return 0
    except (Stop, ForcedExit) as st:
        if stops.phase == DEFER:
            _emit("\n")
            said = f"after {written} of {a.length} characters (printed above)"
        else:
            said = "before generating anything"
        print(f"stopped by {signal_name(st.signum)} {said}", file=sys.stderr)
        return exit_status(st.signum)
    except BrokenPipeError:
        # the reader went away (| head): nothing more to do, and nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is one line (engine/cli.py)
        if a.debug:
            raise
        return cli.report(e)
    finally:
        stops.uninstall()


def _emit(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
