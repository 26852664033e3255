"""engine.config.validate: numbers that cannot mean anything, and settings that would be ignored.

Every float of the updater, its learning-rate schedule, a param's init and scales and a
loss's scale is refused when it is NaN or infinite or breaks its sign rule; every count or
frequency of the job is refused when negative; an updater sub-conf of another updater type
and a learning-rate sub-conf of another change method are refused with "remove ...". Each
case goes through ``python -m engine.train JOB --graph-only`` in process (exit status 2,
exactly one line ``error: <path>: ...`` naming the field) and a few through a subprocess.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from charjobs import ROOT
from engine import train
from engine.config import ConfigError, load_job

BASE = """\
name: "t"
train_steps: 10
disp_freq: 5
checkpoint_freq: 5
updater {
  type: kRMSProp
  rmsprop_conf { rho: 0.95 }
  learning_rate { type: kStep base_lr: 0.002 step_conf { gamma: 0.97 change_freq: 100 } }
  clip_low: -5
  clip_high: 5
}
neuralnet {
  unroll_len: 3
  layer { name: "data" type: kCharRNN unroll_len: 1 char_rnn_conf { path: "train.txt" } }
  layer { name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }
  layer { name: "gru1" type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 8 }
    param { name: "w1" init { type: kUniform low: -0.08 high: 0.08 } } }
  layer { name: "ip1" type: kInnerProduct srclayers: "gru1" innerproduct_conf { num_output: 5 } }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label"
    softmaxloss_conf { scale: 1 } }
}
"""

RMSPROP = "  type: kRMSProp\n  rmsprop_conf { rho: 0.95 }\n"
STEP_LR = "learning_rate { type: kStep base_lr: 0.002 step_conf { gamma: 0.97 change_freq: 100 } }"
INIT = "init { type: kUniform low: -0.08 high: 0.08 }"


def edit(*pairs: str) -> str:
    """BASE with each (old, new) replaced; every ``old`` must occur exactly once."""
    text = BASE
    for old, new in zip(pairs[::2], pairs[1::2]):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def updater(body: str) -> str:
    """BASE with the updater's type lines replaced by ``body``."""
    return edit(RMSPROP, body)


def lr(conf: str) -> str:
    return edit(STEP_LR, f"learning_rate {{ {conf} }}")


def init(conf: str) -> str:
    return edit(INIT, f"init {{ {conf} }}")


# (id, job text, what follows "error: <path>")
CASES = [
    # ------------------------------------------------ item 15: the updater's numbers
    ("negative base_lr", lr("type: kFixed base_lr: -0.1"),
     ": updater.learning_rate.base_lr is -0.1; it must be >= 0"),
    ("NaN base_lr", lr("type: kFixed base_lr: nan"),
     ": updater.learning_rate.base_lr is nan; it must be a finite number >= 0"),
    ("infinite base_lr", lr("type: kFixed base_lr: inf"),
     ": updater.learning_rate.base_lr is inf; it must be a finite number >= 0"),
    ("NaN clip_low", edit("clip_low: -5", "clip_low: nan"),
     ": updater.clip_low is nan; it must be a finite number"),
    ("NaN clip_high", edit("clip_high: 5", "clip_high: nan"),
     ": updater.clip_high is nan; it must be a finite number"),
    ("clip_low above clip_high", edit("clip_low: -5", "clip_low: 7"),
     ": updater.clip_low (7) is above updater.clip_high (5); set clip_low < clip_high, or both "
     "to 0 to turn element-wise clipping off"),
    ("NaN clip_norm", edit("clip_high: 5", "clip_high: 5 clip_norm: nan"),
     ": updater.clip_norm is nan; it must be a finite number >= 0 (0 = off)"),
    ("negative weight_decay", edit("clip_high: 5", "clip_high: 5 weight_decay: -0.1"),
     ": updater.weight_decay is -0.1; it must be >= 0"),
    ("delta 0", edit("clip_high: 5", "clip_high: 5 delta: 0"),
     ": updater.delta is 0; it must be > 0 (it keeps the divisions finite)"),
    ("NaN delta", edit("clip_high: 5", "clip_high: 5 delta: nan"),
     ": updater.delta is nan; it must be a finite number > 0 (it keeps the divisions finite)"),
    ("NaN rho", updater("  type: kRMSProp\n  rmsprop_conf { rho: nan }\n"),
     ": updater.rmsprop_conf.rho is nan; it must be a finite number in [0, 1]"),
    ("NaN momentum", updater("  type: kSGD\n  momentum: nan\n"),
     ": updater.momentum is nan; it must be a finite number >= 0"),
    ("NaN adam beta2", updater("  type: kAdam\n  adam_conf { beta2: nan }\n"),
     ": updater.adam_conf.beta2 is nan; it must be a finite number in [0, 1)"),
    ("NaN step gamma", lr("type: kStep step_conf { gamma: nan change_freq: 10 }"),
     ": updater.learning_rate.step_conf.gamma is nan; it must be a finite number > 0"),
    ("negative step gamma", lr("type: kStep step_conf { gamma: -0.5 change_freq: 10 }"),
     ": updater.learning_rate.step_conf.gamma is -0.5; it must be > 0"),
    ("NaN inverse gamma", lr("type: kInverse inverse_conf { gamma: nan pow: 0.5 }"),
     ": updater.learning_rate.inverse_conf.gamma is nan; it must be a finite number >= 0"),
    ("negative inverse pow", lr("type: kInverse inverse_conf { gamma: 0.1 pow: -1 }"),
     ": updater.learning_rate.inverse_conf.pow is -1; it must be >= 0"),
    ("infinite inverset final_lr", lr("type: kInverseT inverset_conf { final_lr: inf }"),
     ": updater.learning_rate.inverset_conf.final_lr is inf; it must be a finite number > 0"),
    ("negative linear final_lr", lr("type: kLinear linear_conf { change_freq: 10 final_lr: -1 }"),
     ": updater.learning_rate.linear_conf.final_lr is -1; it must be >= 0"),
    ("NaN fixedstep step_lr",
     lr("type: kFixedStep fixedstep_conf { step: 0 step_lr: 0.1 step: 10 step_lr: nan }"),
     ": updater.learning_rate.fixedstep_conf.step_lr[1] is nan; it must be a finite number >= 0"),
    ("zero change_freq", lr("type: kExponential exponential_conf { change_freq: 0 }"),
     ": updater.learning_rate.exponential_conf.change_freq is 0 for kExponential; set it to a "
     "positive number of steps (steps per halving)"),
    # ------------------------------------------------ item 15: params and losses
    ("NaN init value", init("type: kConstant value: nan"),
     ': layer "gru1": param "w1": init.value is nan; it must be a finite number'),
    ("NaN init mean", init("type: kGaussian mean: nan std: 0.1"),
     ': layer "gru1": param "w1": init.mean is nan; it must be a finite number'),
    ("negative init std", init("type: kGaussian std: -0.1"),
     ': layer "gru1": param "w1": init.std is -0.1; it must be >= 0'),
    ("infinite init high", init("type: kUniformSqrtFanIn low: -1 high: inf"),
     ': layer "gru1": param "w1": init.high is inf; it must be a finite number'),
    ("init low above high", init("type: kUniform low: 0.5 high: 0.1"),
     ': layer "gru1": param "w1": init.low (0.5) is above init.high (0.1); give low <= high'),
    ("NaN lr_scale", edit(INIT, INIT + " lr_scale: nan"),
     ': layer "gru1": param "w1": lr_scale is nan; it must be a finite number >= 0'),
    ("negative wd_scale", edit(INIT, INIT + " wd_scale: -1"),
     ': layer "gru1": param "w1": wd_scale is -1; it must be >= 0'),
    ("negative softmax loss scale", edit("scale: 1", "scale: -1"),
     ': layer "loss": softmaxloss_conf.scale is -1; it must be >= 0 (0: the loss is reported '
     "and does not train)"),
    ("NaN softmax loss scale", edit("scale: 1", "scale: nan"),
     ': layer "loss": softmaxloss_conf.scale is nan; it must be a finite number >= 0 (0: the loss '
     "is reported and does not train)"),
    ("negative euclidean loss scale",
     edit("type: kSoftmaxLoss", "type: kEuclideanLoss",
          "softmaxloss_conf { scale: 1 }", "euclideanloss_conf { scale: -2 }"),
     ': layer "loss": euclideanloss_conf.scale is -2; it must be >= 0 (0: the loss is reported '
     "and does not train)"),
    # ------------------------------------------------ item 18: counts and frequencies
    ("negative train_steps", edit("train_steps: 10", "train_steps: -5"),
     ": train_steps is -5; it must be >= 0 (0: no training, only the test phase)"),
    ("negative disp_freq", edit("disp_freq: 5", "disp_freq: -1"),
     ": disp_freq is -1; it must be >= 0 (0: only at the end)"),
    ("negative checkpoint_freq", edit("checkpoint_freq: 5", "checkpoint_freq: -2"),
     ": checkpoint_freq is -2; it must be >= 0 (0: only at the end)"),
    ("negative keep_checkpoints", edit("checkpoint_freq: 5", "keep_checkpoints: -1"),
     ": keep_checkpoints is -1; it must be at least 1 (the newest checkpoint is always kept)"),
    ("negative validate_steps", edit("disp_freq: 5", "validate_steps: -3"),
     ": validate_steps is -3; it must be >= 0 (0: no validation)"),
    ("negative test_after", edit("disp_freq: 5", "test_after: -1"),
     ": test_after is -1; it must be >= 0"),
    # ------------------------------------------------ item 18: sub-confs that would be ignored
    ("adam_conf under kRMSProp",
     updater("  type: kRMSProp\n  rmsprop_conf { rho: 0.95 }\n  adam_conf { beta1: 0.8 }\n"),
     ": updater.adam_conf does not apply to updater.type kRMSProp (which reads rmsprop_conf); "
     "remove adam_conf"),
    ("rmsprop_conf under kSGD", updater("  type: kSGD\n  rmsprop_conf { rho: 0.9 }\n"),
     ": updater.rmsprop_conf does not apply to updater.type kSGD; remove rmsprop_conf"),
    ("step_conf under kFixed", lr("type: kFixed base_lr: 0.1 step_conf { gamma: 0.5 }"),
     ": updater.learning_rate.step_conf does not apply to learning_rate.type kFixed; remove "
     "step_conf"),
    ("linear_conf under kStep",
     lr("type: kStep step_conf { gamma: 0.5 } linear_conf { final_lr: 0.1 }"),
     ": updater.learning_rate.linear_conf does not apply to learning_rate.type kStep (which "
     "reads step_conf); remove linear_conf"),
]


def write(tmp_path, text):
    path = tmp_path / "job.conf"
    path.write_text(text)
    return path


def test_base_job_is_valid(tmp_path):
    load_job(write(tmp_path, BASE))


@pytest.mark.parametrize("text,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_naming_the_file_and_the_field(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert str(e.value) == f"{path}{expected}"
    assert train.main([str(path), "--graph-only", "--workspace", str(tmp_path / "ws")]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"error: {path}{expected}\n"
    assert not (tmp_path / "ws").exists()


def test_through_the_cli(tmp_path):
    """The subprocess path: train_steps -5 used to validate random params and exit 0."""
    by_id = {c[0]: c for c in CASES}
    for name, text, expected in (by_id["negative train_steps"], by_id["NaN base_lr"]):
        path = write(tmp_path, text)
        r = subprocess.run([sys.executable, "-m", "engine.train", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr, r.stdout) == (2, f"error: {path}{expected}\n", ""), name


def test_the_updater_refuses_the_same_numbers():
    """Updater() (used without a job file) applies the same rules."""
    import numpy as np

    from engine.proto import job_pb2 as pb
    from engine.updaters import Updater, UpdaterError

    conf = pb.UpdaterProto(type=pb.kAdaGrad, delta=0.0)
    with pytest.raises(UpdaterError, match=r"^updater\.delta is 0; it must be > 0"):
        Updater(conf, [], np)
    conf = pb.UpdaterProto(type=pb.kSGD)
    conf.learning_rate.base_lr = float("nan")
    with pytest.raises(UpdaterError, match=r"^updater\.learning_rate\.base_lr is nan"):
        Updater(conf, [], np)
