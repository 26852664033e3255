"""Bad sequence stores: one clear line naming the layer and what to do, through the CLI."""
from __future__ import annotations

import numpy as np
import pytest

from charjobs import char_job, run_cli


def store_job(tmp_path, arrays: dict | None, extra_store: str = "", unroll: int = 4):
    path = tmp_path / "d.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    job = tmp_path / "job.conf"
    job.write_text(f"""name: "seq" train_steps: 2
train_one_batch {{ alg: kBPTT }}
updater {{ type: kSGD learning_rate {{ type: kFixed base_lr: 0.1 }} }}
neuralnet {{ unroll_len: {unroll}
  layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 2 {extra_store} }} }}
  layer {{ name: "rnn" type: kRNN srclayers: "data" rnn_conf {{ dim_hidden: 3 }} }}
  layer {{ name: "ip" type: kInnerProduct srclayers: "rnn" unroll_len: 1
           unroll_conn_type: kUnrollFirstToLast innerproduct_conf {{ num_output: 2 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" srclayers: "data" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    return job


X = np.zeros((5, 4, 3))
Y = np.zeros(5, dtype=np.int64)


@pytest.mark.parametrize("arrays, expect", [
    (None, 'layer "data": data file'),
    ({"features": X, "y": Y}, 'has no array "x" (arrays: features, y)'),
    ({"x": np.zeros((5, 4, 3, 2, 1)), "y": Y}, "x has shape (5, 4, 3, 2, 1); it must be [N, T, F]"),
    ({"x": np.zeros((5, 4)), "y": Y}, "x of shape [N, T] must hold int token ids"),
    ({"x": np.zeros((5, 2, 3)), "y": Y}, "x has 2 steps but the layer's unroll_len is 4"),
    ({"x": X}, 'no array "y"; add targets or set store_conf { has_label: false }'),
    ({"x": X, "y": np.zeros(4, dtype=np.int64)}, "y has 4 rows but x has 5; they must match"),
    ({"x": X, "y": Y, "lengths": np.ones(3, dtype=np.int64)},
     "lengths has shape (3,); it must be [N] = [5]"),
    ({"x": X, "y": Y, "lengths": np.array([1, 2, 9, 1, 1])}, "lengths must lie in 1..4"),
])
def test_bad_store_is_one_line(tmp_path, arrays, expect):
    r = run_cli("engine.train", store_job(tmp_path, arrays))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert 'layer "data"' in lines[0]


def test_good_store_trains(tmp_path):
    rng = np.random.default_rng(0)
    r = run_cli("engine.train", store_job(tmp_path, {"x": rng.normal(size=(6, 4, 3)),
                                                     "y": rng.integers(0, 2, 6),
                                                     "lengths": np.array([4, 2, 3, 4, 1, 4])}))
    assert r.returncode == 0, r.stderr
    assert "executor: planned" in r.stdout


def test_label_outside_the_classes_is_named(tmp_path):
    r = run_cli("engine.train", store_job(tmp_path, {"x": X, "y": np.array([0, 1, 7, 0, 1])}))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert 'layer "loss"' in r.stderr and "7" in r.stderr


def test_store_batchsize_is_repeated_and_the_first_is_used(tmp_path):
    """store_conf.batchsize is SINGA's repeated field (one entry per partition there);
    the input layer, as SINGA's data layers do, takes the first entry."""
    from engine.config import load_job
    from engine.gradcheck import build

    rng = np.random.default_rng(0)
    path = store_job(tmp_path, {"x": rng.normal(size=(6, 4, 3)), "y": rng.integers(0, 2, 6)},
                     extra_store="batchsize: 5")
    job = load_job(path)
    data = next(lay for lay in job.neuralnet.layer if lay.name == "data")
    assert list(data.store_conf.batchsize) == [2, 5]
    net, worker = build(job, str(path), workspace=tmp_path / "ws")
    assert net.layers["data"].batchsize == 2 and worker.batchsize == 2


def test_store_without_batchsize_is_one_line(tmp_path):
    job = store_job(tmp_path, {"x": X, "y": Y})
    job.write_text(job.read_text().replace("batchsize: 2", ""))
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f'error: {job}: layer "data": store_conf.batchsize must be at least 1']


# -------------------------------------------- SINGA's stores, record by record

def built_data_layer(tmp_path, store: str, alg: str = "kBPTT", unroll: int = 4):
    """The data layer of a small job reading ``store`` (store_conf's body), built by the
    trainer (so ``alg`` reaches it), after one batch on the reference executor."""
    from engine.config import load_job
    from engine.train import Trainer, build_parser
    job = tmp_path / "job.conf"
    job.write_text(f"""name: "s" train_steps: 1
train_one_batch {{ alg: {alg} }}
updater {{ type: kSGD learning_rate {{ type: kFixed base_lr: 0.1 }} }}
neuralnet {{ unroll_len: {unroll if alg == "kBPTT" else 1}
  layer {{ name: "data" type: kRecordInput store_conf {{ {store} }} }}
  layer {{ name: "ip" type: kInnerProduct srclayers: "data" innerproduct_conf {{ num_output: 3 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip" srclayers: "data" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    t = Trainer(load_job(job), str(job), build_parser().parse_args(
        [str(job), "--executor", "reference"]))
    t.build()
    w = t.workers[next(iter(t.workers))]
    w.run_batch(train=False)
    return t.main.layers["data"], w


def test_kvfile_sequences_in_a_bptt_net(tmp_path):
    """kBPTT: a SINGA store's [T] records of whole numbers are token ids; [T, F] records
    are features per step (store_conf.shape gives the record shape)."""
    from engine.stores import write_kvfile
    ids = np.arange(24, dtype=np.uint8).reshape(6, 4) % 5
    write_kvfile(tmp_path / "ids.bin", ids, np.arange(6) % 2)
    data, w = built_data_layer(tmp_path, f'backend: "kvfile" path: "{tmp_path / "ids.bin"}" '
                                         f"batchsize: 2 shape: 4")
    assert data.is_ids and data.x.dtype == np.int64 and data.vocab_size == 5
    np.testing.assert_array_equal(w.outs["1#data"], ids[:2, 1])
    feats = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    write_kvfile(tmp_path / "f.bin", feats, np.arange(6) % 2)
    data, w = built_data_layer(tmp_path, f'backend: "kvfile" path: "{tmp_path / "f.bin"}" '
                                         f"batchsize: 2 shape: 4 shape: 2 mean_value: 1 "
                                         f"std_value: 2")
    assert not data.is_ids and data.out_shape == (2,)
    np.testing.assert_allclose(w.outs["3#data"], (feats[:2].reshape(2, 4, 2)[:, 3] - 1) / 2)


def test_a_feed_forward_net_reads_whole_records_from_an_npz(tmp_path):
    """alg: kBP: x [N, 784] uint8 (what tools/singa_data.py makes of mnist) is 784
    features per example, not 784 steps of token ids."""
    x = np.random.default_rng(2).integers(0, 256, (10, 784)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    data, w = built_data_layer(tmp_path, f'path: "{tmp_path / "d.npz"}" batchsize: 4', "kBP")
    assert not data.is_ids and data.out_shape == (784,)
    np.testing.assert_array_equal(w.outs["0#data"], x[:4].astype(np.float32))


def test_token_ids_refuse_normalisation(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4), np.int64), y=np.zeros(5, np.int64))
    job = store_job(tmp_path, None, extra_store="mean_value: 3")
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds token ids; mean and std normalise features" in r.stderr


# ------------------------------------- silent nonsense in stores (issue 16, items 17-20)

IDS = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2], [0, 0, 3, 3], [2, 3, 0, 1]])
WITH_NAN = X.copy()
WITH_NAN[3, 2, 1] = np.nan


def onehot_job(tmp_path, arrays):
    """store_job with token ids: data -> kOneHot -> kRNN."""
    job = store_job(tmp_path, arrays)
    job.write_text(job.read_text().replace(
        'srclayers: "data" rnn_conf', 'srclayers: "onehot" rnn_conf').replace(
        '  layer { name: "rnn"', '  layer { name: "onehot" type: kOneHot srclayers: "data" }\n'
                                 '  layer { name: "rnn"'))
    return job


@pytest.mark.parametrize("arrays, expect", [
    ({"x": np.where(IDS == 2, -1, IDS), "y": Y},  # was read as the last one-hot column
     "x[0, 2] is -1 (sequence 0, step 2); token ids must lie in 0..16777215"),
    ({"x": np.where(IDS == 3, 10 ** 9, IDS), "y": Y},  # was a 60 GiB MemoryError
     "x[0, 3] is 1000000000 (sequence 0, step 3); token ids must lie in 0..16777215"),
    ({"x": IDS.astype(np.uint64) + np.uint64(2 ** 63), "y": Y},  # was numpy's ValueError
     f"x[0, 0] is {2 ** 63} (sequence 0, step 0); token ids must lie in 0..16777215"),
])
def test_token_ids_out_of_range_are_one_line_naming_the_place(tmp_path, arrays, expect):
    r = run_cli("engine.train", onehot_job(tmp_path, arrays))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert f'layer "data": {tmp_path / "d.npz"}: ' in lines[0]


@pytest.mark.parametrize("arrays, expect", [
    ({"x": X + 1j, "y": Y}, "x holds complex numbers (complex128); store real numbers"),
    ({"x": X.astype(str), "y": Y}, "x holds text (<U32); store real numbers"),
    ({"x": WITH_NAN, "y": Y}, "x[3, 2, 1] is nan (sequence 3, step 2); the data must hold finite"),
    ({"x": X, "y": np.array([0.0, 1.0, np.inf, 0.0, 1.0])}, "y[2] is inf (sequence 2)"),
    ({"x": X, "y": Y, "lengths": np.array([4, 3.5, 2, 1, 1])},
     "lengths[1] is 3.5; a length is a whole number of steps"),
    ({"x": X[:1], "y": Y[:1]},
     "x holds 1 sequences, fewer than store_conf.batchsize 2, so every batch would repeat"),
])
def test_bad_values_in_a_store_are_one_line_naming_the_place(tmp_path, arrays, expect):
    r = run_cli("engine.train", store_job(tmp_path, arrays))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert f'layer "data": {tmp_path / "d.npz"}: ' in lines[0]


def test_small_unsigned_ids_train(tmp_path):
    rng = np.random.default_rng(0)
    r = run_cli("engine.train", onehot_job(tmp_path, {"x": IDS.astype(np.uint64),
                                                      "y": rng.integers(0, 2, 5)}))
    assert r.returncode == 0, r.stderr


def test_an_unknown_backend_is_one_line_naming_it(tmp_path):
    r = run_cli("engine.train", store_job(tmp_path, {"x": X, "y": Y}, 'backend: "hdf5"'))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'store_conf.backend "hdf5"' in lines[0], r.stderr


def test_a_file_that_is_not_an_npz_is_named_as_such(tmp_path):
    job = store_job(tmp_path, None)
    (tmp_path / "d.npz").write_bytes(b"x,y\n1,2\n")
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an .npz file (not a zip archive)" in lines[0], r.stderr
    assert "pickled" not in r.stderr


def test_an_empty_csv_is_one_line_without_numpy_warnings(tmp_path):
    job = store_job(tmp_path, None, 'shape: 4 shape: 3')
    (tmp_path / "d.csv").write_text("")
    job.write_text(job.read_text().replace("d.npz", "d.csv").replace("kRecordInput", "kCSVInput"))
    r = run_cli("engine.train", job)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f'error: {job}: layer "data": {tmp_path / "d.csv"}: the textfile holds no records']


@pytest.mark.parametrize("kind", ["a folder", "not UTF-8"])
def test_a_bad_vocabulary_file_is_one_line(tmp_path, kind):
    """A folder is named as such. A vocabulary that is not UTF-8 is a byte vocabulary (as
    SINGA's data.py writes them): this one lacks the text's bytes, which is one line
    naming the text and the first byte it lacks."""
    job = char_job(tmp_path, val=False)
    vocab = tmp_path / "vocab.txt"
    if kind == "a folder":
        vocab.mkdir()
        expect = [str(vocab), "folder"]
    else:
        vocab.write_bytes(b"ab\xff\xfe")
        expect = ["train.txt", "is not in the vocabulary"]
    # the unit picked by the files (the job says none)
    job.write_text(job.read_text().replace("batchsize: 4", f'vocab_path: "{vocab}" batchsize: 4')
                   .replace(' encoding: "utf-8"', ""))
    r = run_cli("engine.train", job)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expect), r.stderr
