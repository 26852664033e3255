"""SINGA round trip with SINGA's own char-rnn files, byte for byte (tests/data/singa-char-rnn,
SINGA v0.3's examples/char-rnn/job.conf and sample.conf, Apache License 2.0): job.conf trains
with --cpu and leaves SINGA's checkpoint where sample.conf looks for it; sample.conf runs
unchanged apart from the step number; SINGA's rules (GRU biases, byte vocabularies, partial
checkpoint loading); checkpoints back to SINGA from the command line; SINGA's vocabulary in
error messages."""
from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from charjobs import ROOT
from engine import checkpoint as ckpt

DATA = ROOT / "tests" / "data" / "singa-char-rnn"
#: the files as SINGA ships them, by their git blob ids in SINGA's tree at v0.3.0-rc3 (a
#: change to them would no longer test SINGA's files)
BLOBS = {"job.conf": "bd648f1d6f04c175beb75535731c091ced1a6254",
         "sample.conf": "b15ef9e119243ac3286000c812c04c803b8aa038"}
GRU2 = ["z_hx2", "r_hx2", "c_hx2", "z_hh2", "r_hh2", "c_hh2"]


def run(cwd, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SINGA's layout: examples/char-rnn/{linux_input.txt, vocab.txt} under the working
    folder (the vocabulary written as SINGA's data.py writes it: the set of the corpus'
    bytes, in the set's order; the corpus holds a two-byte character, é), job.conf as
    SINGA ships it, trained 2 steps on the CPU."""
    tmp = tmp_path_factory.mktemp("singa")
    ex = tmp / "examples" / "char-rnn"
    ex.mkdir(parents=True)
    src = ("static int foo(struct device *dev)\n{\n\tint err = 0;\n\tif (!dev)\n\t\treturn "
           "-ENODEV;\n\tprintk(KERN_INFO \"caf\u00e9 %d\\n\", err);\n\treturn err;\n}\n\n") * 60
    raw = src.encode("utf-8")
    (ex / "linux_input.txt").write_bytes(raw)
    symbols = sorted(set(raw))
    random.Random(3).shuffle(symbols)
    (ex / "vocab.txt").write_bytes(bytes(symbols))
    (tmp / "job.conf").write_bytes((DATA / "job.conf").read_bytes())
    r = run(tmp, "-m", "engine.train", "job.conf", "--cpu", "--steps", "2")
    assert r.returncode == 0, r.stderr
    return tmp, ex, symbols


def test_the_files_are_singas_own():
    """job.conf and sample.conf are SINGA's, byte for byte (git's blob ids of SINGA's files),
    with SINGA's licence beside them."""
    for name, blob in BLOBS.items():
        raw = (DATA / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest() == blob, name
    assert "gpu: 0" in (DATA / "job.conf").read_text()
    assert 'checkpoint_path: "examples/char-rnn/checkpoint/step2000-worker0"' in \
        (DATA / "sample.conf").read_text()
    assert "Apache License" in (DATA / "LICENSE").read_text()


def test_job_conf_writes_singas_checkpoint_with_versions(trained):
    """1: a job in SINGA's syntax also writes <workspace>/checkpoint/step<N>-worker0, params
    only, every param's version the step (SINGA initialises a param of version 0 anew)."""
    tmp, ex, _ = trained
    arrays, meta = ckpt.load_singa(ex / "checkpoint" / "step2-worker0")
    ours, _ = ckpt.load(ex / "checkpoints" / "step2.npz")
    assert sorted(arrays) == sorted(k for k in ours if k.startswith("param/"))
    for k, a in arrays.items():
        np.testing.assert_array_equal(a, ours[k])
    assert set(meta["versions"].values()) == {2}


def test_the_gru_has_the_biases_its_params_declare_and_the_vocabulary_is_bytes(trained):
    """3, 4: job.conf's gru1 declares 9 params (biases, as SINGA's gru.cc has them when more
    than 6 are declared); its vocabulary is read as bytes, as SINGA's data.py wrote it (é
    is two symbols: read as UTF-8 it would shift every id after it)."""
    tmp, ex, symbols = trained
    arrays, meta = ckpt.load(ex / "checkpoints" / "step2.npz")
    assert {"param/z_b", "param/r_b", "param/c_b"} <= set(arrays)
    assert meta["encoding"] == "bytes"
    assert [ord(c) for c in meta["vocab"]] == list(symbols)


def test_sample_conf_runs_unchanged_but_for_the_step(trained):
    """1, 2, 7: sample.conf (checkpoint_path to SINGA's file) samples; gru2, which job.conf
    has commented out, is initialised as SINGA does, named in one warning line (its 6
    declared params: no biases, by SINGA's rule); the banner says the state is carried."""
    tmp, ex, _ = trained
    text = (DATA / "sample.conf").read_text().replace("step2000-worker0", "step2-worker0")
    (tmp / "sample.conf").write_text(text)
    r = run(tmp, "-m", "engine.train", "sample.conf", "--cpu")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: checkpoint_path")]
    assert len(warn) == 1 and re.search(", ".join(GRU2) + ": initialised, not loaded", warn[0])
    assert "sampling: the recurrent state is carried from each symbol to the next" in r.stdout
    out = r.stdout.split("--- text written by layer sampling ---\n", 1)[1]
    assert len(out.strip("\n")) > 0


def test_a_missing_checkpoint_says_what_the_workspace_holds(trained):
    """1: sample.conf as shipped (step2000) names the workspace's checkpoints."""
    tmp, ex, _ = trained
    (tmp / "sample2000.conf").write_bytes((DATA / "sample.conf").read_bytes())
    r = run(tmp, "-m", "engine.train", "sample2000.conf", "--cpu")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "step2000-worker0: no such checkpoint" in line[0]
    assert "checkpoints/step2.npz, checkpoint/step2-worker0" in line[0]


def test_engine_sample_names_what_the_workspace_holds(trained):
    """engine.sample --checkpoint of a SINGA checkpoint that is not there names the
    checkpoints its workspace does hold (it said only "no such checkpoint")."""
    tmp, _, _ = trained
    missing = next((tmp).rglob("step2-worker0")).with_name("step2000-worker0")
    r = run(tmp, "-m", "engine.sample", "--checkpoint", str(missing), "--cpu")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "step2000-worker0: no such checkpoint" in line[0], line
    assert "checkpoints/step2.npz, checkpoint/step2-worker0" in line[0]


def test_kresetbatch_in_a_sample_job_still_feeds_the_symbol_back(trained):
    """7: state_carry: kResetBatch resets the state, not the symbol fed back (it printed the
    first symbol over and over)."""
    tmp, ex, _ = trained
    text = (DATA / "sample.conf").read_text().replace("step2000-worker0", "step2-worker0")
    text = text.replace("  alg: kBPTT\n", "  alg: kBPTT\n  state_carry: kResetBatch\n")
    (tmp / "reset.conf").write_text(text)
    r = run(tmp, "-m", "engine.train", "reset.conf", "--cpu")
    assert r.returncode == 0, r.stderr
    assert "every symbol starts from a zero state" in r.stdout
    out = r.stdout.split("--- text written by layer sampling ---\n", 1)[1].rstrip("\n")
    assert len(set(out[1:])) > 1, out


def test_engine_sample_reads_the_vocabulary_the_job_names(trained):
    """8: engine.sample --checkpoint step<N>-worker0 --job job.conf reads job.conf's
    kCharRNN vocab_path (it said "no vocabulary")."""
    tmp, ex, _ = trained
    r = run(tmp, "-m", "engine.sample", "--checkpoint", ex / "checkpoint" / "step2-worker0",
            "--job", "job.conf", "--cpu", "--length", "20", "--temperature", "1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) >= 20


@pytest.mark.parametrize("name", ["step2-worker0", "model.bin"])
def test_export_writes_a_checkpoint_singa_loads(trained, name):
    """5: engine.export CKPT OUT writes SINGA's BlobProtos when OUT is named like SINGA's
    checkpoints or ends in .bin, every version the step."""
    tmp, ex, _ = trained
    out = tmp / "back" / name
    out.parent.mkdir(exist_ok=True)
    r = run(tmp, "-m", "engine.export", ex / "checkpoints" / "step2.npz", out)
    assert r.returncode == 0, r.stderr
    arrays, meta = ckpt.load_singa(out)
    ours, _ = ckpt.load(ex / "checkpoints" / "step2.npz")
    assert sorted(arrays) == sorted(k for k in ours if k.startswith("param/"))
    assert set(meta["versions"].values()) == {2}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == \
        hashlib.sha256((ex / "checkpoint" / "step2-worker0").read_bytes()).hexdigest()


@pytest.mark.parametrize("text, want", [
    ('name: "x"\nneuralnet {\n  layer {\n    name: "data"\n    [data_conf] {\n      path: "a"\n'
     '    }\n  }\n}\n',
     ":5:6: user-defined layers (extension `data_conf`) are not supported"),
    ('name: "x"\nneuralnet { layer { name: "a" type: kDummy }\n  layer { name: "b" type: kDummy '
     'srclayers: "a" unroll_conn_type: kUnrollCustomized } }\n',
     'layer "b": kUnrollCustomized (SINGA\'s connection defined by C++ code, src_conn) is not '
     "supported"),
    ('name: "x"\nneuralnet { layer { name: "a" type: kDummy include: kPositive } }\n',
     'layer "a": include kPositive is one of SINGA\'s internal flags, not a phase'),
])
def test_singas_own_vocabulary_gets_one_line(tmp_path, text, want):
    """6: rnnlm's user-defined layers, kUnrollCustomized and SINGA's internal phases."""
    (tmp_path / "j.conf").write_text(text)
    r = run(tmp_path, "-m", "engine.train", "j.conf")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and want in lines[0], lines


def test_the_seed_changes_the_first_sampled_symbol(trained):
    """8: --seed draws another first symbol (a SINGA checkpoint, its job's vocabulary)."""
    tmp, ex, _ = trained
    firsts = set()
    for seed in range(6):
        r = run(tmp, "-m", "engine.sample", "--checkpoint", ex / "checkpoint" / "step2-worker0",
                "--job", "job.conf", "--cpu", "--length", "1", "--temperature", "1",
                "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        firsts.add(r.stdout[:1])
    assert len(firsts) > 1, firsts


GRU_JOB = """name: "g" train_steps: 1
train_one_batch {{ alg: kBPTT }}
neuralnet {{
  layer {{ name: "gru" type: kGRU gru_conf {{ dim_hidden: 4 {bias} }}
{params}  }}
}}
"""
WEIGHTS = ["z_hx", "r_hx", "c_hx", "z_hh", "r_hh", "c_hh"]


@pytest.mark.parametrize("names, bias, want", [
    (WEIGHTS, "", False), (WEIGHTS + ["z_b", "r_b", "c_b"], "", True),
    (WEIGHTS, "bias_term: false", False), (WEIGHTS + ["z_b", "r_b", "c_b"], "bias_term: true", True),
    (WEIGHTS, "bias_term: true", "error"), (WEIGHTS + ["z_b", "r_b", "c_b"], "bias_term: false", "error")])
def test_singa_gru_biases_follow_the_declared_params(names, bias, want):
    """SINGA's gru.cc gives biases exactly when more than 6 params are declared and never
    reads bias_term; a bias_term that says otherwise is one error naming the layer (it
    used to override the params, building a net SINGA would not)."""
    from engine.config import ConfigError, normalise, parse_job
    params = "".join(f'    param {{ name: "{n}" }}\n' for n in names)
    job = parse_job(GRU_JOB.format(bias=bias, params=params), "g.conf")
    if want == "error":
        with pytest.raises(ConfigError, match=r'layer "gru": gru_conf.bias_term is .* SINGA '
                                              r"ignores bias_term"):
            normalise(job, "g.conf")
    else:
        normalise(job, "g.conf")
        assert job.neuralnet.layer[0].gru_conf.bias_term is want
