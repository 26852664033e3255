"""SINGA's feed-forward job files parse; a layer of a type this engine does not train
fails validation with one line naming the file, the layer's line, the layer and its type.

The jobs below are written in the style of SINGA v0.3's examples (mnist conv.conf,
cifar10, alexnet, the RBM auto-encoder): the same settings messages and layer types.
"""
from __future__ import annotations

import re

import pytest

from charjobs import run_cli
from engine.config import ConfigError, layer_blocks, load_job
from engine.layers import REGISTRY
from engine.proto import job_pb2 as pb

SUPPORTED = ", ".join(pb.LayerType.Name(t) for t in sorted(REGISTRY))

# a LeNet job in the layout of SINGA's examples/mnist/conv.conf (two data layers of one
# name, one per phase; comments; param blocks whose names resemble layer names)
CONV = """\
name: "conv"
train_steps: 10
train_one_batch {
  alg: kBP
}
updater {
  type: kSGD
  momentum: 0.9
  learning_rate {
    type: kInverse
    base_lr: 0.01
    inverse_conf { gamma: 0.0001 pow: 0.75 }
  }
}
neuralnet {
  layer {
    name: "data"
    type: kRecordInput
    store_conf {
      backend: "kvfile"
      path: "train_data.bin"
      batchsize: 64
      std_value: 255
      shape: 1
      shape: 28
      shape: 28
    }
    include: kTrain
  }
  layer {
    name: "data"
    type: kRecordInput
    store_conf { backend: "kvfile" path: "test_data.bin" batchsize: 100 shape: 784 }
    include: kTest
  }
  # layer { name: "conv1" type: kConvolution }   (a comment, not a layer)
  layer {
    name: 'conv1x'
    type: kInnerProduct
    srclayers: "data"
    innerproduct_conf { num_output: 8 }
  }
  layer {
    param { name: "conv1" }
    name: "conv1"
    type: kCConvolution
    srclayers: "conv1x"
    convolution_conf {
      num_filters: 20
      kernel: 5
      stride: 1
    }
  }
  layer {
    name: "pool1"
    type: kCPooling
    srclayers: "conv1"
    pooling_conf { pool: MAX kernel: 2 stride: 2 }
  }
  layer {
    name: "ip2"
    type: kInnerProduct
    srclayers: "pool1"
    innerproduct_conf { num_output: 10 }
  }
  layer {
    name: "loss"
    type: kSoftmaxLoss
    srclayers: "ip2"
    srclayers: "data"
  }
}
"""

# cifar10 / alexnet: LRN, average pooling, image preprocessing, cuDNN types
CIFAR = """\
name: "cifar10-convnet"
train_one_batch { alg: kBP }
neuralnet {
  layer { name: "data" type: kRecordInput
          store_conf { backend: "kvfile" path: "train_data.bin" mean_file: "image_mean.bin"
                       batchsize: 100 shape: 3 shape: 32 shape: 32 } }
  layer { name: "image" type: kImagePreprocess srclayers: "data"
          rgbimage_conf { cropsize: 28 mirror: true } }
  layer { name: "conv1" type: kCudnnConv srclayers: "image"
          convolution_conf { num_filters: 32 kernel: 5 stride: 1 pad: 2 }
          param { name: "w1" init { type: kGaussian std: 0.0001 } }
          param { name: "b1" lr_scale: 2.0 init { type: kConstant value: 0 } } }
  layer { name: "pool1" type: kCudnnPool srclayers: "conv1"
          pooling_conf { pool: AVG kernel: 3 stride: 2 } }
  layer { name: "norm1" type: kLRN srclayers: "pool1"
          lrn_conf { local_size: 3 alpha: 5e-05 beta: 0.75 } }
  layer { name: "ip1" type: kInnerProduct srclayers: "norm1" innerproduct_conf { num_output: 10 } }
  layer { name: "loss" type: kCudnnSoftmaxLoss srclayers: "ip1" srclayers: "data" }
}
"""

# the RBM-pretrained auto-encoder: every type is one this engine has
AUTOENCODER = """\
name: "auto-encoder"
train_steps: 12200
checkpoint_path: "rbm1/checkpoint/step6000-worker0"
train_one_batch { alg: kBP }
updater { type: kAdaGrad learning_rate { base_lr: 0.01 type: kFixed } }
neuralnet {
  layer { name: "data" type: kRecordInput include: kTrain
          store_conf { backend: "kvfile" path: "train_data.bin" batchsize: 100 std_value: 255
                       shape: 784 } }
  layer { name: "Inner1" type: kInnerProduct srclayers: "data"
          innerproduct_conf { num_output: 30 } param { name: "w1" } param { name: "b12" } }
  layer { name: "Sigmoid1" type: kSigmoid srclayers: "Inner1" }
  layer { name: "Inner2" type: kInnerProduct srclayers: "Sigmoid1"
          innerproduct_conf { num_output: 784 transpose: true }
          param { name: "w2" share_from: "w1" } param { name: "b11" } }
  layer { name: "Sigmoid2" type: kSigmoid srclayers: "Inner2" }
  layer { name: "loss" type: kEuclideanLoss srclayers: "Sigmoid2" srclayers: "data" }
}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_conv_job_names_the_unsupported_layer_and_its_line(tmp_path):
    path = write(tmp_path, "conv.conf", CONV)
    with pytest.raises(ConfigError) as e:
        load_job(path)
    lines = CONV.splitlines()
    name_at = lines.index('    name: "conv1"')
    # the block that holds name: "conv1" (after a comment and a layer named 'conv1x')
    want = max(k for k in range(name_at) if lines[k] == "  layer {") + 1  # 1-based
    assert str(e.value) == (f'{path}:{want}: layer "conv1": type kCConvolution is not supported by '
                            f"this engine (it trains recurrent and fully connected nets; "
                            f"supported types: {SUPPORTED})")
    assert "\n" not in str(e.value)


def line_of(text: str, snippet: str) -> int:
    """1-based line of the first line of ``text`` containing ``snippet``."""
    return next(k + 1 for k, line in enumerate(text.splitlines()) if snippet in line)


def test_cifar_and_alexnet_types_are_named_in_file_order(tmp_path):
    text = CIFAR
    for typ, name in (("kImagePreprocess", "image"), ("kCudnnConv", "conv1"),
                      ("kCudnnPool", "pool1"), ("kLRN", "norm1"), ("kCudnnSoftmaxLoss", "loss")):
        path = write(tmp_path, f"{name}.conf", text)
        with pytest.raises(ConfigError) as e:
            load_job(path)
        line = line_of(text, f'layer {{ name: "{name}"')
        assert str(e.value).startswith(f'{path}:{line}: layer "{name}": type {typ} is not '
                                       f"supported by this engine"), str(e.value)
        text = text.replace(f"type: {typ} ", "type: kDummy ")  # on to the next one


def test_autoencoder_job_parses_and_validates(tmp_path):
    job = load_job(write(tmp_path, "autoencoder.conf", AUTOENCODER))
    inner2 = job.neuralnet.layer[3]
    assert inner2.innerproduct_conf.transpose and inner2.param[0].share_from == "w1"
    assert list(job.neuralnet.layer[0].store_conf.batchsize) == [100]
    assert list(job.checkpoint_path) == ["rbm1/checkpoint/step6000-worker0"]


def test_rbm_job_is_one_line(tmp_path):
    text = CONV.replace("alg: kBP", "alg: kCD").replace(
        'type: kCConvolution\n    srclayers: "conv1x"\n    convolution_conf {\n'
        "      num_filters: 20\n      kernel: 5\n      stride: 1\n    }",
        'type: kRBMVis\n    srclayers: "conv1x"\n    rbm_conf { hdim: 100 gaussian: true }')
    assert "kRBMVis" in text
    with pytest.raises(ConfigError, match=r"train_one_batch\.alg kCD is not supported"):
        load_job(write(tmp_path, "rbm.conf", text))
    with pytest.raises(ConfigError, match=r':\d+: layer "conv1": type kRBMVis is not supported'):
        load_job(write(tmp_path, "rbm2.conf", text.replace("alg: kCD", "alg: kBP")))


def test_the_cli_prints_the_line_and_exits_2(tmp_path):
    path = write(tmp_path, "conv.conf", CONV)
    r = run_cli("engine.train", path, "--workspace", tmp_path / "ws")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf'error: {re.escape(str(path))}:\d+: layer "conv1": '
                                        r"type kCConvolution is not supported", lines[0]), r.stderr


def test_without_the_file_the_message_has_no_line():
    from engine.config import normalise, parse_job, validate
    job = parse_job(CONV, "nowhere/conv.conf")
    normalise(job, "nowhere/conv.conf")
    with pytest.raises(ConfigError, match=r'^nowhere/conv\.conf: layer "conv1": type '
                                          r"kCConvolution is not supported"):
        validate(job, "nowhere/conv.conf")


# --------------------------------------------------------- finding layer blocks

def test_layer_blocks_follow_the_structure_not_the_text():
    text = """# layer { name: "commented" }
name: "j"   # neuralnet { layer { name: "nope" } }
neuralnet {
  layer {  # a "quote" in a comment
    name: 'single'   param { name: "p" }
  }
  layer: { param { name: "decoy" } name: "adj" "acent" }
  layer < name: "esc\\"aped" >
  layer: [ { name: "l1" }, { name: "l2" } ]
  unroll_len: - 5
  layer { [ext.conf] { name: "inner" } name: "after-ext" }
  layer { type: kDummy }
}
updater { learning_rate { type: kFixed } }
"""
    assert layer_blocks(text) == [(4, "single"), (7, "adjacent"), (8, 'esc"aped'), (9, "l1"),
                                  (9, "l2"), (11, "after-ext"), (12, None)]


def test_layer_line_picks_the_right_one_of_two_layers_with_one_name(tmp_path):
    """Two "data" layers (train and test): the second one is the unsupported one."""
    text = CONV.replace('path: "test_data.bin" batchsize: 100 shape: 784 }',
                        'path: "test_data.bin" batchsize: 100 shape: 784 }\n    type: kShardData')
    text = text.replace("type: kRecordInput\n    store_conf { backend", "store_conf { backend")
    path = write(tmp_path, "two.conf", text)
    want = [k + 1 for k, line in enumerate(text.splitlines()) if line == "  layer {"][1]
    with pytest.raises(ConfigError, match=rf'^{re.escape(str(path))}:{want}: layer "data": type '
                                          r"kShardData is not supported"):
        load_job(path)


# ----------------------------------------- SINGA fields that would change results

MLP_BASE = """name: "m" train_steps: 1
train_one_batch { alg: kBP }
updater { type: kSGD learning_rate { type: kFixed base_lr: 0.1 } }
neuralnet {
  layer { name: "data" type: kRecordInput store_conf { path: "d.npz" batchsize: 2 } }
  layer { name: "ip" type: kInnerProduct srclayers: "data" innerproduct_conf { num_output: 2 }
          param { name: "w" } }
  layer { name: "dummy" type: kDummy srclayers: "ip" }
  layer { name: "loss" type: kSoftmaxLoss srclayers: "dummy" srclayers: "data" }
}
"""


@pytest.mark.parametrize("edit, expect", [
    (('type: kSGD', 'type: kSGD user_type: "MyUpdater"'),
     'updater: user_type "MyUpdater": SINGA\'s user-defined types are C++ classes'),
    (('base_lr: 0.1', 'base_lr: 0.1 user_type: "MyLR"'), 'updater.learning_rate: user_type "MyLR"'),
    (('name: "ip" type: kInnerProduct', 'name: "ip" type: kInnerProduct user_type: "kFoo"'),
     'layer "ip": user_type "kFoo"'),
    (('param { name: "w" }', 'param { name: "w" user_type: "P" }'), 'layer "ip": param "w": '
                                                                     'user_type "P"'),
    (('param { name: "w" }', 'param { name: "w" type: kUser }'), 'param "w": type kUser'),
    (('param { name: "w" }', 'param { name: "w" init { type: kUniform user_type: "I" } }'),
     'param "w": init user_type "I"'),
])
def test_user_types_are_one_line(tmp_path, edit, expect):
    path = write(tmp_path, "u.conf", MLP_BASE.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value), str(e.value)


@pytest.mark.parametrize("conf, what", [("input: true", "random data"),
                                        ("output: true", "random gradients")])
def test_dummys_test_modes_are_one_line(tmp_path, conf, what):
    import numpy as np
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    text = MLP_BASE.replace('type: kDummy srclayers: "ip"',
                            f'type: kDummy srclayers: "ip" dummy_conf {{ {conf} }}')
    path = write(tmp_path, "d.conf", text.replace('"d.npz"', f'"{tmp_path / "d.npz"}"'))
    r = run_cli("engine.train", path, "--workspace", tmp_path / "ws")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f'layer "dummy": dummy_conf {{ {conf} }} is SINGA\'s test mode ({what})' in r.stderr
