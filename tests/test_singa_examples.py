"""SINGA v0.3's example jobs run as SINGA users have them (issue 11).

The job files below are written for these tests in SINGA's syntax and with SINGA's
settings (char-rnn's ``gpu: 0``, a vocabulary written the way SINGA's data.py writes it,
the mnist MLP over a kvfile store with ``mean_value``/``std_value``/``random_skip``, the
RBM auto-encoder's Euclidean reconstruction loss and its ``checkpoint_path`` to a SINGA
checkpoint, a sample job with ``char_rnn_conf`` on its kCharRNNOutput layer); only the
sizes are small. The data is synthetic, written through tools/singa_data.py.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from charjobs import ROOT, run_cli
from engine import checkpoint as ckpt
from engine import stores
from engine import text as tx
from engine.backend import BackendError, device_of, make_backend
from engine.config import load_job
from engine.train import Trainer, build_parser

TOOL = ROOT / "tools" / "singa_data.py"

# ------------------------------------------------------------------ char-rnn

# a UTF-8 text with CRLF line ends and multi-byte characters (é, —)
CRLF_TEXT = ("caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9\r\ndef f(x):\r\n"
             "    return x * 2\r\n\r\nclass A:\r\n    pass\r\n") * 40


def singa_vocab(raw: bytes, seed: int = 3) -> bytes:
    """What SINGA's data.py writes under Python 2: the set of the corpus' bytes, in the
    set's (arbitrary) order, written raw."""
    chars = sorted(set(raw))
    random.Random(seed).shuffle(chars)
    return bytes(chars)


def char_rnn_job(tmp, data, vocab, *, hidden=16, batch=4, unroll=10, extra=""):
    """SINGA's examples/char-rnn/job.conf layout (gpu: 0, vocab_size 101, kRMSProp with
    kStep, clipping), small."""
    params = "\n".join(f'    param {{ name: "{p}" init {{ type: kUniform low: -0.08 high: 0.08 }} }}'
                       for p in ("z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh", "z_b", "r_b", "c_b"))
    text = f"""name:"char-rnn"
train_steps: 30
disp_freq: 10
gpu: 0
{extra}
train_one_batch {{
  alg: kBPTT
}}
updater {{
  type: kRMSProp
  rmsprop_conf {{
    rho: 0.95
  }}
  learning_rate {{
    type: kStep
    base_lr: 0.002
    step_conf {{
      gamma: 0.97
      change_freq: 2000
    }}
  }}
  clip_low: -5
  clip_high: 5
}}
neuralnet {{
  unroll_len: {unroll}
  layer {{
    name: "data"
    type: kCharRNN
    unroll_len: 1
    char_rnn_conf {{
      path: "{data}"
      vocab_path:"{vocab}"
      batchsize: {batch}
      unroll_len: {unroll}
    }}
  }}
  layer {{
    name: "onehot"
    type: kOneHot
    srclayers: "data"
    unroll_conn_type: kUnrollOneToAll
    onehot_conf {{
      vocab_size: 101
    }}
  }}
  layer {{
    name: "label"
    type: kRNNLabel
    srclayers: "data"
    unroll_conn_type: kUnrollOneToAll
  }}
  layer {{
    name: "gru1"
    type: kGRU
    srclayers: "onehot"
    gru_conf {{
      dim_hidden: {hidden}
    }}
{params}
  }}
  layer {{
    name: "ip1"
    type: kInnerProduct
    srclayers: "gru1"
    innerproduct_conf {{
      num_output: 101
    }}
    param {{ name: "w" init {{ type: kUniform low: -0.08 high: 0.08 }} }}
    param {{ name: "b" init {{ type: kUniform low: -0.08 high: 0.08 }} }}
  }}
  layer {{
    name: "loss"
    type: kSoftmaxLoss
    srclayers: "ip1"
    srclayers: "label"
  }}
}}
cluster {{
  workspace: "{tmp / 'ws'}"
}}
"""
    path = tmp / "job.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """char-rnn over a CRLF UTF-8 corpus with a byte vocabulary in arbitrary order, run
    with --cpu: (tmp, job, raw corpus, vocab bytes, completed process)."""
    tmp = tmp_path_factory.mktemp("charrnn")
    raw = CRLF_TEXT.encode("utf-8")
    vocab = singa_vocab(raw)
    with pytest.raises(UnicodeDecodeError):
        vocab.decode("utf-8")  # the case the issue reports: byte 0x9f etc.
    (tmp / "linux_input.txt").write_bytes(raw)
    (tmp / "vocab.txt").write_bytes(vocab)
    job = char_rnn_job(tmp, tmp / "linux_input.txt", tmp / "vocab.txt")
    r = run_cli("engine.train", job, "--cpu")
    return tmp, job, raw, vocab, r


def test_a_gpu_job_without_a_gpu_names_cpu_in_one_line(byte_run):
    """gpu: 0 on a machine without CuPy: one line naming --cpu, exit 2 (CuPy is hidden
    from the child process, so this holds on a GPU machine too)."""
    tmp, job, *_ = byte_run
    code = ("import sys; sys.modules['cupy'] = None; from engine.train import main; "
            f"sys.exit(main([{str(job)!r}, '--workspace', {str(tmp / 'ws-nogpu')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the job asks for GPU 0 but CuPy is "
                                                   "not installed; run with --cpu"), r.stderr


def test_device_choice():
    assert device_of(True, None, [0]) is None          # --cpu wins over the job's gpu
    assert device_of(False, None, [2, 3]) == 2         # the job's first id
    assert device_of(False, 1, [0]) == 1               # --gpu wins over the job
    assert device_of(False, None, []) is None
    with pytest.raises(BackendError, match="--cpu and --gpu 1 contradict"):
        device_of(True, 1, [])
    assert make_backend(device_of(True, None, [0])).xp is np


def test_char_rnn_with_gpu_0_trains_on_the_cpu(byte_run):
    tmp, job, raw, vocab, r = byte_run
    assert r.returncode == 0, r.stderr
    assert "backend numpy" in r.stdout and "--cpu: the job's gpu 0 is not used" in r.stdout
    assert "step     30  train loss" in r.stdout
    # the state note says what SINGA does and how to get it
    assert "SINGA v0.3 starts every batch from zeros: train_one_batch { state_carry: " \
           "kResetBatch }" in r.stdout


def test_byte_vocabulary_in_any_order_reads_the_bytes(byte_run):
    """The vocabulary file's bytes, in order, are the ids; the corpus is read byte by
    byte with its CRLF intact; the checkpoint keeps the vocabulary and its unit."""
    tmp, job, raw, vocab, r = byte_run
    assert r.returncode == 0, r.stderr
    args = build_parser().parse_args([str(job), "--cpu", "--workspace", str(tmp / "ws-inspect")])
    t = Trainer(load_job(job), str(job), args)
    t.build()
    data = t.main.layers["data"]
    assert data.encoding == tx.BYTES and data.vocab == [chr(b) for b in vocab]
    streams = data.streams.reshape(-1)
    assert bytes(vocab[i] for i in streams) == raw[: streams.size]
    assert b"\r\n" in bytes(vocab[i] for i in streams)
    _, meta = ckpt.load(tmp / "ws" / "checkpoints" / "step30.npz")
    assert meta["encoding"] == "bytes" and meta["vocab"] == [chr(b) for b in vocab]


def test_sampling_prints_bytes_with_replacement_characters(byte_run):
    tmp, job, raw, vocab, r = byte_run
    assert r.returncode == 0, r.stderr
    ck = tmp / "ws" / "checkpoints" / "step30.npz"
    s = run_cli("engine.sample", "--checkpoint", ck, "--length", 200, "--prime", "caf\u00e9",
                "--temperature", 1.5, "--seed", 2)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("caf\u00e9")  # the prime's two bytes of é are one character
    # 200 random bytes of a barely trained net: some sequences are not UTF-8
    assert "\ufffd" in s.stdout


def test_display_of_bytes():
    assert tx.for_display("caf\xc3\xa9", tx.BYTES) == "caf\u00e9"
    assert tx.for_display("a\x9fb\xc3", tx.BYTES) == "a\ufffdb\ufffd"
    assert tx.from_user("\u00e9", tx.BYTES) == "\xc3\xa9"
    assert tx.for_display("a\x9f", tx.UTF8) == "a\x9f"


def test_crlf_text_with_a_utf8_vocabulary(tmp_path):
    """\\r is a character like any other: a vocabulary that holds \\r away from \\n (SINGA's
    data.py writes them in any order) used to read as '\\n' twice."""
    text = CRLF_TEXT.replace("\u2014", "-").replace("\u00e9", "e").replace("\u00ef", "i")
    (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
    chars = sorted(set(text))
    chars.remove("\r")
    chars.insert(3, "\r")
    (tmp_path / "v.txt").write_bytes("".join(chars).encode("utf-8"))
    job = char_rnn_job(tmp_path, tmp_path / "t.txt", tmp_path / "v.txt")
    args = build_parser().parse_args([str(job), "--cpu"])
    t = Trainer(load_job(job), str(job), args)
    t.build()
    data = t.main.layers["data"]
    # a job in SINGA's syntax reads bytes (as SINGA did): ASCII bytes are these characters
    assert data.encoding == tx.BYTES and data.vocab == chars
    ids = data.streams.reshape(-1)
    assert "".join(chars[i] for i in ids) == text[: ids.size]


def test_explicit_encoding_and_bad_text_are_one_line(tmp_path):
    text = CRLF_TEXT.replace("\u2014", "-").replace("\u00ef", "i")  # one non-ASCII: é
    raw = text.encode("utf-8")
    (tmp_path / "t.txt").write_bytes(raw)
    (tmp_path / "v.txt").write_bytes("".join(sorted(set(text))).encode("utf-8"))
    # a UTF-8 vocabulary read as bytes (explicit setting): its bytes are the symbols
    job = char_rnn_job(tmp_path, tmp_path / "t.txt", tmp_path / "v.txt",
                       extra="").read_text().replace(
        "unroll_len: 10\n    }", 'unroll_len: 10\n      encoding: "bytes"\n    }')
    (tmp_path / "bytes.conf").write_text(job)
    t = Trainer(load_job(tmp_path / "bytes.conf"), str(tmp_path / "bytes.conf"),
                build_parser().parse_args([str(tmp_path / "bytes.conf"), "--cpu"]))
    t.build()
    data = t.main.layers["data"]
    assert data.encoding == tx.BYTES
    assert bytes(ord(c) for c in data.vocab) == "".join(sorted(set(text))).encode("utf-8")
    ids = data.streams.reshape(-1)
    assert bytes(ord(data.vocab[i]) for i in ids) == raw[: ids.size]  # é is two symbols
    t.release()  # the workspace lock: the runs below use the same workspace
    (tmp_path / "bad.conf").write_text(job.replace('encoding: "bytes"', 'encoding: "latin1"'))
    r = run_cli("engine.train", tmp_path / "bad.conf", "--cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert 'char_rnn_conf.encoding "latin1" is not a text unit' in r.stderr
    # a corpus that is not UTF-8 under a UTF-8 vocabulary (a job that says so: one in
    # SINGA's syntax reads bytes): the offset and the setting
    (tmp_path / "t.txt").write_bytes(b"abc\x9f" + raw)
    (tmp_path / "utf8.conf").write_text(job.replace('encoding: "bytes"', 'encoding: "utf-8"'))
    r = run_cli("engine.train", tmp_path / "utf8.conf", "--cpu", "--workspace", tmp_path / "w2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is not UTF-8 text (byte 0x9f at offset 3); to read it as bytes, as SINGA did, set " \
           'char_rnn_conf { encoding: "bytes" }' in r.stderr


# ------------------------------------------------------- SINGA's sample job

SAMPLE = """name:"char-rnn"
test_steps: 60
gpu: 0
checkpoint_path: "{ckpt}"
train_one_batch {{
  alg: kBPTT
}}
neuralnet {{
  layer {{
    name: "data"
    type: kRNNDummy
    rnn_dummy_conf {{
      shape: 1
      integer: true
      low: 0
      high: 101
      dynamic_srclayer: "argsort"
    }}
  }}
  layer {{
    name: "onehot"
    type: kOneHot
    srclayers: "data"
  }}
  layer {{
    name: "gru1"
    type: kGRU
    srclayers: "onehot"
    gru_conf {{
      dim_hidden: 16
    }}
    param {{ name: "z_hx" }}
    param {{ name: "r_hx" }}
    param {{ name: "c_hx" }}
    param {{ name: "z_hh" }}
    param {{ name: "r_hh" }}
    param {{ name: "c_hh" }}
    param {{ name: "z_b" }}
    param {{ name: "r_b" }}
    param {{ name: "c_b" }}
  }}
  layer {{
    name: "ip1"
    type: kInnerProduct
    srclayers: "gru1"
    innerproduct_conf {{
      num_output: 101
    }}
    param {{ name: "w" }}
    param {{ name: "b" }}
  }}
  layer {{
    name: "softmax"
    type: kSoftmax
    srclayers: "ip1"
  }}
  layer {{
    name: "argsort"
    type: kArgSort
    srclayers: "softmax"
  }}
  layer {{
    name: "sampling"
    type: kCharRNNOutput
    srclayers: "argsort"
    char_rnn_conf {{
      vocab_path: "{vocab}"
    }}
  }}
}}
cluster {{
  workspace: "{ws}"
}}
"""


@pytest.fixture(scope="module")
def singa_checkpoint(byte_run):
    """The trained char-rnn's params as SINGA writes them: step<N>-worker0 (BlobProtos,
    names with the unrolling prefix 0#)."""
    tmp, job, raw, vocab, r = byte_run
    assert r.returncode == 0, r.stderr
    arrays, _ = ckpt.load(tmp / "ws" / "checkpoints" / "step30.npz")
    params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
    path = ckpt.save_singa(tmp / "singa" / "checkpoint" / "step30-worker0", params)
    return path, params


def test_singa_sample_job_samples_from_a_singa_checkpoint(byte_run, singa_checkpoint, tmp_path):
    tmp, job, raw, vocab, _ = byte_run
    path, params = singa_checkpoint
    sample = tmp_path / "sample.conf"
    sample.write_text(SAMPLE.format(ckpt=path, vocab=tmp / "vocab.txt", ws=tmp_path / "ws"))
    r = run_cli("engine.train", sample, "--cpu")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("--- text written by layer sampling ---\n", 1)[1]
    assert 0 < len(out.rstrip("\n")) <= 60  # 60 bytes, shown as UTF-8 (U+FFFD where broken)
    # the params came from the SINGA file: the same net through engine.sample --job
    s = run_cli("engine.sample", "--checkpoint", path, "--job", sample, "--cpu", "--length", 30,
                "--temperature", 0, "--prime", "def")
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("def")
    # params only: without a job there is neither a net nor a vocabulary
    s = run_cli("engine.sample", "--checkpoint", path, "--cpu")
    assert s.returncode == 2 and len(s.stderr.strip().splitlines()) == 1, s.stderr
    assert "a SINGA checkpoint holds params only; give the net to sample with --job" in s.stderr
    # the training job names its vocabulary (kCharRNN's vocab_path): that is read (issue 22)
    s = run_cli("engine.sample", "--checkpoint", path, "--cpu", "--job", job, "--length", 10)
    assert s.returncode == 0 and len(s.stdout) >= 10, s.stderr


def test_singa_checkpoint_loads_through_checkpoint_path(byte_run, singa_checkpoint, tmp_path):
    """checkpoint_path takes SINGA's BlobProtos: every param equals the file's, names
    matched without the 0# prefix; a wrong shape is one line; a missing param is
    initialised, as SINGA does, and named in one warning line (issue 22)."""
    tmp, job, raw, vocab, _ = byte_run
    path, params = singa_checkpoint
    text = job.read_text().replace('gpu: 0\n', f'gpu: 0\ncheckpoint_path: "{path}"\n')
    (tmp_path / "init.conf").write_text(text)
    t = Trainer(load_job(tmp_path / "init.conf"), str(tmp_path / "init.conf"),
                build_parser().parse_args([str(tmp_path / "init.conf"), "--cpu", "--workspace",
                                           str(tmp_path / "ws")]))
    t.build()
    for p in t.main.params:
        np.testing.assert_array_equal(p.data, params[p.name])
    # without the prefix (a net SINGA did not unroll) reads the same
    ckpt.save_singa(tmp_path / "plain-worker0", params, prefix="")
    assert ckpt.load_any(tmp_path / "plain-worker0")[0].keys() == ckpt.load_any(path)[0].keys()
    # a missing param and a misshapen one: one line each run, naming them
    bad = dict(params)
    del bad["r_hh"]
    ckpt.save_singa(tmp_path / "missing-worker0", bad)
    bad = dict(params, w=np.zeros((7, 16), np.float32))
    ckpt.save_singa(tmp_path / "shape-worker0", bad)
    for name in ("missing", "shape"):
        (tmp_path / f"{name}.conf").write_text(text.replace(str(path), str(tmp_path / f"{name}-worker0")))
    r = run_cli("engine.train", tmp_path / "missing.conf", "--cpu", "--workspace",
                tmp_path / "ws-missing")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: checkpoint_path")]
    assert len(warn) == 1 and "holds no r_hh: initialised, not loaded" in warn[0], r.stdout
    r = run_cli("engine.train", tmp_path / "shape.conf", "--cpu", "--workspace", tmp_path / "ws-shape")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "w [7, 16] vs net [101, 16]" in lines[0], r.stderr


# ---------------------------------------------------------------- mnist MLP

MLP = """name: "mlp"
train_steps: 40
test_steps: 2
test_freq: 20
disp_freq: 10
train_one_batch {{
  alg: kBP
}}
updater {{
  type: kSGD
  learning_rate {{
    type: kStep
    base_lr: 0.05
    step_conf {{
      change_freq: 60
      gamma: 0.997
    }}
  }}
}}
neuralnet {{
  layer {{
    name: "data"
    type: kRecordInput
    store_conf {{
      backend: "kvfile"
      path: "{train}"
      random_skip: 50
      batchsize: 16
      shape: 784
      std_value: 127.5
      mean_value: 127.5
      prefetching: true
    }}
    include: kTrain
  }}
  layer {{
    name: "data"
    type: kRecordInput
    store_conf {{
      backend: "kvfile"
      path: "{test}"
      batchsize: 20
      shape: 784
      std_value: 127.5
      mean_value: 127.5
    }}
    include: kTest
  }}
  layer {{
    name: "fc1"
    type: kInnerProduct
    srclayers: "data"
    innerproduct_conf {{
      num_output: 32
    }}
    param {{
      name: "w1"
      init {{
        type: kUniform
        low: -0.05
        high: 0.05
      }}
    }}
    param {{
      name: "b1"
      init {{
        type: kUniform
        low: -0.05
        high: 0.05
      }}
    }}
  }}
  layer {{
    name: "tanh1"
    type: kSTanh
    srclayers: "fc1"
  }}
  layer {{
    name: "fc2"
    type: kInnerProduct
    srclayers: "tanh1"
    innerproduct_conf {{
      num_output: 10
    }}
    param {{
      name: "w2"
      init {{
        type: kUniform
        low: -0.05
        high: 0.05
      }}
    }}
    param {{
      name: "b2"
      init {{
        type: kUniform
        low: -0.05
        high: 0.05
      }}
    }}
  }}
  layer {{
    name: "loss"
    type: kSoftmaxLoss
    softmaxloss_conf {{
      topk: 1
    }}
    srclayers: "fc2"
    srclayers: "data"
  }}
}}
cluster {{
  nworker_groups: 1
  nserver_groups: 1
  workspace: "{ws}"
}}
"""


def digits(n: int, seed: int = 0):
    """Synthetic 28x28 'digits': ten pixel prototypes plus noise, uint8, labels 0..9."""
    rng = np.random.default_rng(seed)
    proto = np.random.default_rng(99).integers(0, 256, (10, 784))
    y = rng.integers(0, 10, n)
    x = np.clip(proto[y] + rng.normal(0, 40, (n, 784)), 0, 255).astype(np.uint8)
    return x, y


def to_kvfile(tmp, name, x, y=None):
    """An .npz converted to a kvfile by tools/singa_data.py (as a user would)."""
    npz = tmp / f"{name}.npz"
    np.savez(npz, **({"x": x} if y is None else {"x": x, "y": y}))
    r = subprocess.run([sys.executable, str(TOOL), str(npz), str(tmp / f"{name}.bin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return tmp / f"{name}.bin"


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mnist")
    x, y = digits(300)
    train = to_kvfile(tmp, "train_data", x[:240], y[:240])
    test = to_kvfile(tmp, "test_data", x[240:], y[240:])
    job = tmp / "job.conf"
    job.write_text(MLP.format(train=train, test=test, ws=tmp / "ws"))
    return tmp, job, x, y


def build_trainer(job, *extra):
    """A built Trainer; the reference executor keeps every node's output in ``outs``."""
    args = build_parser().parse_args([str(job), "--executor", "reference", *map(str, extra)])
    t = Trainer(load_job(job), str(job), args)
    t.build()
    return t


def test_mlp_over_a_kvfile_emits_normalised_records(mnist):
    """alg: kBP: one copy emits (B, 784) features per batch, (x - 127.5) / 127.5, starting
    at a seeded record drawn from 0..random_skip and walking on from there."""
    tmp, job, x, y = mnist
    t = build_trainer(job, "--workspace", tmp / "ws-inspect")
    data = t.main.layers["data"]
    assert data.out_shape == (784,) and data.conf.unroll_len == 1 and not data.is_ids
    assert 0 <= data.skip <= 50
    w = t.workers[next(iter(t.workers))]
    for k in range(2):
        w.run_batch(train=False)
        rows = (data.skip + np.arange(16 * k, 16 * k + 16)) % 240
        got = w.outs["0#data"]
        assert got.shape == (16, 784) and got.dtype == np.float32
        np.testing.assert_allclose(got, (x[rows].astype(np.float32) - 127.5) / 127.5, rtol=1e-6)
    # another seed skips (almost surely) another number of records; the same seed the same
    skips = {build_trainer(job, "--workspace", tmp / f"ws-s{s}", "--seed", s)
             .main.layers["data"].skip for s in range(6)}
    assert len(skips) > 1
    assert build_trainer(job, "--workspace", tmp / "ws-again").main.layers["data"].skip == data.skip


def test_mlp_trains_end_to_end(mnist):
    tmp, job, x, y = mnist
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp / "ws" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in rows if m["phase"] == "train"]
    test = [m for m in rows if m["phase"] == "test"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert test[-1]["accuracy"] > 0.8  # ten classes: chance is 0.1


def test_mean_and_std_files(tmp_path):
    """mean_file / std_file: the first record of a store of the same backend, per value."""
    x, y = digits(40, seed=1)
    train = to_kvfile(tmp_path, "train", x, y)
    rng = np.random.default_rng(5)
    mean = rng.uniform(50, 200, (1, 784)).astype(np.float32)
    std = rng.uniform(20, 80, (1, 784)).astype(np.float32)
    stores.write_kvfile(tmp_path / "mean.bin", mean, keys=["mean"])
    stores.write_kvfile(tmp_path / "std.bin", std, keys=["std"])
    text = MLP.format(train=train, test=train, ws=tmp_path / "ws")
    text = text.replace("random_skip: 50", "").replace(
        "std_value: 127.5\n      mean_value: 127.5\n      prefetching: true",
        f'mean_file: "{tmp_path / "mean.bin"}"\n      std_file: "{tmp_path / "std.bin"}"', 1)
    (tmp_path / "job.conf").write_text(text)
    t = build_trainer(tmp_path / "job.conf", "--workspace", tmp_path / "ws")
    w = t.workers[next(iter(t.workers))]
    w.run_batch(train=False)
    np.testing.assert_allclose(w.outs["0#data"], (x[:16] - mean) / std, rtol=1e-5)
    # a mean file of another size is one line
    stores.write_kvfile(tmp_path / "mean.bin", mean[:, :100], keys=["mean"])
    r = run_cli("engine.train", tmp_path / "job.conf", "--workspace", tmp_path / "ws2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "mean_file" in r.stderr and "holds 100 values, but a record" in r.stderr


@pytest.mark.parametrize("edit, expect", [
    (('backend: "kvfile"', 'backend: "hdf5"'),
     'store_conf.backend "hdf5" is not read by this engine; supported: "kvfile" and '
     '"textfile" (SINGA\'s stores), "npz"'),
    (('backend: "kvfile"', 'backend: "lmdb"'), 'store_conf.backend "lmdb" is not read'),
    (('backend: "kvfile"', 'backend: "textfile"'),
     "a textfile store holds lines of text, and kRecordInput parses each record as a "
     "RecordProto; use type kCSVInput"),
    (("prefetching: true", "encoded: true"), "store_conf.encoded: SINGA decodes such records"),
    (("std_value: 127.5", "std_value: 0"), "store_conf.std_value holds 0"),
    (("shape: 784", "shape: 780"), "records hold 784 values but the shape [780] needs 780"),
])
def test_store_settings_are_one_line(mnist, tmp_path, edit, expect):
    tmp, job, *_ = mnist
    (tmp_path / "job.conf").write_text(job.read_text().replace(*edit, 1))
    r = run_cli("engine.train", tmp_path / "job.conf", "--workspace", tmp_path / "ws")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and 'layer "data"' in lines[0], r.stderr


def test_csv_input_over_a_textfile_in_a_feed_forward_net(mnist, tmp_path):
    """SINGA's kCSVInput over its textfile store (label first), shape per record."""
    tmp, job, x, y = mnist
    stores.write_textfile(tmp_path / "train.csv", x[:64], y[:64])
    text = job.read_text().replace("type: kRecordInput", "type: kCSVInput", 1).replace(
        'backend: "kvfile"', 'backend: "textfile"', 1).replace(
        str(tmp / "train_data.bin"), str(tmp_path / "train.csv"))
    (tmp_path / "job.conf").write_text(text)
    t = build_trainer(tmp_path / "job.conf", "--workspace", tmp_path / "ws")
    data = t.main.layers["data"]
    w = t.workers[next(iter(t.workers))]
    w.run_batch(train=False)
    rows = (data.skip + np.arange(16)) % 64
    np.testing.assert_allclose(w.outs["0#data"], (x[rows] - 127.5) / 127.5, rtol=1e-6)


# ------------------------------------------------------- RBM auto-encoder

AUTOENCODER = """name: "auto-encoder"
train_steps: 30
disp_freq: 10
checkpoint_path: "{ckpt}"
train_one_batch {{ alg: kBP }}
updater {{ type: kAdaGrad learning_rate {{ base_lr: 0.05 type: kFixed }} }}
neuralnet {{
  layer {{ name: "data" type: kRecordInput include: kTrain
          store_conf {{ backend: "kvfile" path: "{data}" batchsize: 20 std_value: 255
                       shape: 784 }} }}
  layer {{ name: "Inner1" type: kInnerProduct srclayers: "data"
          innerproduct_conf {{ num_output: 30 }} param {{ name: "w1" }} param {{ name: "b12" }} }}
  layer {{ name: "Sigmoid1" type: kSigmoid srclayers: "Inner1" }}
  layer {{ name: "Inner2" type: kInnerProduct srclayers: "Sigmoid1"
          innerproduct_conf {{ num_output: 784 transpose: true }}
          param {{ name: "w2" share_from: "w1" }} param {{ name: "b11" }} }}
  layer {{ name: "Sigmoid2" type: kSigmoid srclayers: "Inner2" }}
  layer {{ name: "loss" type: kEuclideanLoss srclayers: "Sigmoid2" srclayers: "data" }}
}}
cluster {{ workspace: "{ws}" }}
"""


def test_autoencoder_reconstructs_the_data_layers_features(tmp_path):
    """kEuclideanLoss's target is its second source's output (SINGA's meaning): the data
    layer's normalised pixels, which the net reconstructs; the RBM's weights come from a
    SINGA checkpoint through checkpoint_path."""
    x, y = digits(60, seed=3)
    data = to_kvfile(tmp_path, "train_data", x, y)
    rng = np.random.default_rng(7)
    rbm = {"w1": rng.normal(0, 0.1, (30, 784)).astype(np.float32),
           "b12": rng.normal(0, 0.1, 30).astype(np.float32),
           "b11": rng.normal(0, 0.1, 784).astype(np.float32)}
    cp = ckpt.save_singa(tmp_path / "rbm1" / "checkpoint" / "step6000-worker0", rbm)
    job = tmp_path / "ae.conf"
    job.write_text(AUTOENCODER.format(ckpt=cp, data=data, ws=tmp_path / "ws"))
    t = build_trainer(job, "--workspace", tmp_path / "ws-inspect")
    for p in t.main.params:
        np.testing.assert_array_equal(p.data, rbm[p.name])
    w = t.workers[next(iter(t.workers))]
    m = w.run_batch(train=False)
    feats = x[:20].astype(np.float64) / 255
    h = 1 / (1 + np.exp(-(feats @ rbm["w1"].T + rbm["b12"])))
    recon = 1 / (1 + np.exp(-(h @ rbm["w1"] + rbm["b11"])))
    np.testing.assert_allclose(w.outs["0#data"], feats, rtol=1e-6)
    want = 0.5 * ((recon - feats) ** 2).sum() / 20
    assert m["loss"][0] / m["loss"][1] == pytest.approx(want, rel=1e-4)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_euclidean_target_mismatch_names_the_setting(tmp_path):
    """A data layer whose features do not match the prediction: the one line says how to
    regress onto the labels it carries instead (nothing is guessed)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(8, 3, 2)), y=rng.normal(size=(8, 1)))
    job = tmp_path / "j.conf"
    job.write_text(f"""name: "reg" train_steps: 2
train_one_batch {{ alg: kBPTT }}
updater {{ type: kSGD learning_rate {{ type: kFixed base_lr: 0.1 }} }}
neuralnet {{ unroll_len: 3
  layer {{ name: "data" type: kRecordInput store_conf {{ path: "{tmp_path / 'd.npz'}" batchsize: 4 }} }}
  layer {{ name: "rnn" type: kRNN srclayers: "data" rnn_conf {{ dim_hidden: 3 }} }}
  layer {{ name: "ip" type: kInnerProduct srclayers: "rnn" unroll_len: 1
           unroll_conn_type: kUnrollFirstToLast innerproduct_conf {{ num_output: 1 }} }}
  layer {{ name: "loss" type: kEuclideanLoss unroll_len: 1 srclayers: "ip" srclayers: "data"
           unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollFirstToLast }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ('the target is the output of source 1 ("data", as in SINGA), which gives 2 values '
            'per row, but the prediction has 1; to regress onto the labels that "data" carries, '
            "set euclideanloss_conf { target: kLabels }") in r.stderr
    job.write_text(job.read_text().replace(
        "kUnrollFirstToLast }\n}", "kUnrollFirstToLast\n"
        "           euclideanloss_conf { target: kLabels } }\n}"))
    assert "target: kLabels" in job.read_text()
    r = run_cli("engine.train", job, "--workspace", tmp_path / "ws2")
    assert r.returncode == 0, r.stderr
