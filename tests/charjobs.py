"""Small char-rnn jobs written into a test's tmp folder."""
from __future__ import annotations

import pathlib
import subprocess
import sys

from engine.layers.recurrent import cell_classes
from engine.proto import job_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]

TEXT = ("def add(a, b):\n    return a + b\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
        "for i in range(10):\n    print(add(i, i * 2))\n") * 12

#: LayerType name -> conf field of every registered cell (from the registry)
RECURRENT_CONF = {pb.LayerType.Name(t): cls.CONF_FIELD for t, cls in cell_classes().items()}


def char_job(tmp: pathlib.Path, *, rnn: str = "kGRU", hidden: int = 16, batch: int = 4,
             unroll: int = 8, steps: int = 20, stacked: bool = False, extra: str = "",
             val: bool = True, name: str = "tiny") -> pathlib.Path:
    """Write a corpus and a char-rnn job into ``tmp``; returns the job path."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "val.txt").write_text(TEXT[::-1][: len(TEXT) // 3])
    conf = RECURRENT_CONF[rnn]

    def data(phase, path):
        return f"""
  layer {{ name: "data" type: kCharRNN unroll_len: 1 include: {phase}
    char_rnn_conf {{ path: "{path}" batchsize: {batch} unroll_len: {unroll} encoding: "utf-8" }} }}"""

    layers = data("kTrain", tmp / "train.txt") + (data("kVal", tmp / "val.txt") if val else "")
    layers += f"""
  layer {{ name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
  layer {{ name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
  layer {{ name: "rnn1" type: {rnn} srclayers: "onehot" {conf} {{ dim_hidden: {hidden} }} }}"""
    top = "rnn1"
    if stacked:
        layers += f"""
  layer {{ name: "rnn2" type: {rnn} srclayers: "rnn1" {conf} {{ dim_hidden: {hidden} }} }}"""
        top = "rnn2"
    layers += f"""
  layer {{ name: "ip1" type: kInnerProduct srclayers: "{top}" innerproduct_conf {{ num_output: 40 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }}"""
    text = f"""name: "{name}"
train_steps: {steps}
disp_freq: 5
{"validate_freq: 10 validate_steps: 2" if val else ""}
checkpoint_freq: 5
train_one_batch {{ alg: kBPTT }}
updater {{ type: kRMSProp rmsprop_conf {{ rho: 0.95 }}
  learning_rate {{ type: kFixed base_lr: 0.01 }} clip_low: -5 clip_high: 5 }}
{extra}
neuralnet {{ unroll_len: {unroll} {layers}
}}
cluster {{ workspace: "{tmp / 'ws'}" }}
"""
    path = tmp / "job.conf"
    path.write_text(text)
    return path


def run_cli(module: str, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repo root; returns the completed process."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)
