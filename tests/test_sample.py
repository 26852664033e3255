"""Sampling: from a checkpoint (derived one-step net), with --job, and SINGA's sample job."""
from __future__ import annotations

import pytest

from charjobs import TEXT, char_job, run_cli
from engine.sample import Sampler


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    job = char_job(tmp, steps=60, hidden=24, unroll=10)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    return tmp, job, tmp / "ws" / "checkpoints" / "step60.npz"


def test_sampler_prints_prime_then_length_chars(trained):
    tmp, job, ck = trained
    r = run_cli("engine.sample", "--checkpoint", ck, "--length", 50, "--prime", "def ", "--seed", 3)
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout
    assert text.startswith("def ") and len(text) == 54
    assert set(text) <= set(TEXT)


def test_sampling_is_reproducible_and_seeded(trained):
    _, _, ck = trained
    a = Sampler(str(ck), seed=1).generate(80, 1.0)
    b = Sampler(str(ck), seed=1).generate(80, 1.0)
    c = Sampler(str(ck), seed=2).generate(80, 1.0)
    assert a == b and a != c


def test_temperature_zero_is_argmax(trained):
    _, _, ck = trained
    s = Sampler(str(ck), seed=1)
    a = s.generate(30, 0.0, prime="class ")
    b = Sampler(str(ck), seed=99).generate(30, 0.0, prime="class ")
    assert a == b  # no randomness at temperature 0


def test_top_k_one_equals_argmax(trained):
    _, _, ck = trained
    greedy = Sampler(str(ck), seed=1).generate(30, 0.0, prime="for ")
    top1 = Sampler(str(ck), seed=5).generate(30, 1.5, prime="for ", top_k=1)
    assert greedy == top1


def test_prime_outside_vocabulary_is_one_line(trained):
    _, _, ck = trained
    r = run_cli("engine.sample", "--checkpoint", ck, "--prime", "\u00e9t\u00e9")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--prime: character '\u00e9' at offset 0 is not in the vocabulary" in r.stderr


def test_mismatched_job_names_the_params(trained, tmp_path):
    _, _, ck = trained
    other = char_job(tmp_path, hidden=20, unroll=10)
    r = run_cli("engine.sample", "--checkpoint", ck, "--job", other)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "param shapes differ" in r.stderr and "rnn1/z_hx" in r.stderr


def test_singa_sample_job_through_train(trained, tmp_path):
    _, _, ck = trained
    job = tmp_path / "sample.conf"
    job.write_text(f"""name: "s" train_steps: 0 test_steps: 40
checkpoint_path: "{ck}"
train_one_batch {{ alg: kBPTT }}
neuralnet {{
  layer {{ name: "data" type: kRNNDummy rnn_dummy_conf {{ dynamic_srclayer: "argsort" shape: 1 integer: true }} }}
  layer {{ name: "onehot" type: kOneHot srclayers: "data" }}
  layer {{ name: "rnn1" type: kGRU srclayers: "onehot" gru_conf {{ dim_hidden: 24 }} }}
  layer {{ name: "ip1" type: kInnerProduct srclayers: "rnn1" innerproduct_conf {{ num_output: 40 }} }}
  layer {{ name: "softmax" type: kSoftmax srclayers: "ip1" }}
  layer {{ name: "argsort" type: kArgSort srclayers: "softmax" argsort_conf {{ temperature: 1 }} }}
  layer {{ name: "out" type: kCharRNNOutput srclayers: "argsort" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("--- text written by layer out ---\n")[1]
    assert len(text.rstrip("\n")) >= 30 and set(text) <= set(TEXT) | {"\n"}
    # the same net through engine.sample --job gives text too
    r2 = run_cli("engine.sample", "--checkpoint", ck, "--job", job, "--length", 20)
    assert r2.returncode == 0, r2.stderr


def test_singa_sample_job_with_wrong_params(trained, tmp_path):
    _, _, ck = trained
    job = tmp_path / "sample.conf"
    job.write_text(f"""name: "s" train_steps: 0 test_steps: 5
checkpoint_path: "{ck}"
neuralnet {{
  layer {{ name: "data" type: kRNNDummy rnn_dummy_conf {{ dynamic_srclayer: "argsort" shape: 1 integer: true }} }}
  layer {{ name: "onehot" type: kOneHot srclayers: "data" }}
  layer {{ name: "gru" type: kGRU srclayers: "onehot" gru_conf {{ dim_hidden: 24 }} }}
  layer {{ name: "ip1" type: kInnerProduct srclayers: "gru" innerproduct_conf {{ num_output: 40 }} }}
  layer {{ name: "argsort" type: kArgSort srclayers: "ip1" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    r = run_cli("engine.train", job)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has no param gru/z_hx" in r.stderr
