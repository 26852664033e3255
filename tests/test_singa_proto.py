"""proto/job.proto equals Apache SINGA v0.3's schema wherever a name is SINGA's.

The tables below are facts about SINGA v0.3 (tag v0.3.0-rc3: src/proto/job.proto and,
for the store records and checkpoints, src/proto/common.proto): for every field its
number, label, type and default (None: no explicit default), every enum value, and the
extension ranges. The tests check our descriptors against them, and that this
project's own fields and enum values use numbers SINGA never used.
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, text_format

from engine.config import EXTENSION_FIELDS, EXTENSION_VALUES, parse_job
from engine.layers.recurrent import cell_classes
from engine.proto import job_pb2 as pb

# message -> field -> (number, label, type, default)
SINGA_FIELDS = {
    "JobProto": {
        "name": (1, "optional", "string", None),
        "neuralnet": (3, "optional", "NetProto", None),
        "train_one_batch": (5, "optional", "AlgProto", None),
        "updater": (7, "optional", "UpdaterProto", None),
        "cluster": (9, "optional", "ClusterProto", None),
        "train_steps": (16, "optional", "int32", None),
        "disp_freq": (17, "optional", "int32", 0),
        "gpu": (18, "repeated", "int32", None),
        "test_freq": (20, "optional", "int32", 0),
        "test_steps": (21, "optional", "int32", 0),
        "validate_freq": (25, "optional", "int32", 0),
        "validate_steps": (26, "optional", "int32", 0),
        "checkpoint_freq": (30, "optional", "int32", 0),
        "checkpoint_path": (60, "repeated", "string", None),
        "warmup_steps": (61, "optional", "int32", 0),
        "debug": (62, "optional", "bool", False),
        "reset_param_version": (63, "optional", "bool", True),
        "num_openblas_threads": (64, "optional", "int32", 1),
        "checkpoint_after": (80, "optional", "int32", 0),
        "disp_after": (81, "optional", "int32", 0),
        "test_after": (82, "optional", "int32", 0),
        "validate_after": (83, "optional", "int32", 0),
        "resume": (90, "optional", "bool", False),
        "step": (91, "optional", "int32", 0),
        "id": (92, "optional", "int32", -1),
    },
    "AlgProto": {
        "alg": (1, "optional", "AlgType", "kUserAlg"),
        "user_alg": (2, "optional", "string", None),
        "cd_conf": (10, "optional", "CDProto", None),
    },
    "NetProto": {
        "layer": (1, "repeated", "LayerProto", None),
        "partition_dim": (20, "optional", "int32", 0),
        "layer_group": (21, "repeated", "LayerGroupProto", None),
        "unroll_len": (22, "optional", "int32", 1),
    },
    "LayerGroupProto": {
        "layer": (1, "repeated", "string", None),
    },
    "UpdaterProto": {
        "type": (1, "optional", "UpdaterType", "kUserUpdater"),
        "user_type": (2, "optional", "string", None),
        "rmsprop_conf": (3, "optional", "RMSPropProto", None),
        "adadelta_conf": (4, "optional", "AdaDeltaProto", None),
        "adam_conf": (5, "optional", "AdamProto", None),
        "adammax_conf": (6, "optional", "AdamMaxProto", None),
        "learning_rate": (11, "optional", "LRGenProto", None),
        "momentum": (31, "optional", "float", 0.0),
        "weight_decay": (32, "optional", "float", 0.0),
        "delta": (35, "optional", "float", 1e-08),
        "clip_low": (36, "optional", "float", 0.0),
        "clip_high": (37, "optional", "float", 0.0),
    },
    "ClusterProto": {
        "nworker_groups": (1, "optional", "int32", 1),
        "nserver_groups": (2, "optional", "int32", 1),
        "nworkers_per_group": (3, "optional", "int32", 1),
        "nservers_per_group": (4, "optional", "int32", 1),
        "nworkers_per_procs": (5, "optional", "int32", 1),
        "nservers_per_procs": (6, "optional", "int32", 1),
        "workspace": (10, "optional", "string", None),
        "server_worker_separate": (20, "optional", "bool", False),
        "sync_freq": (21, "optional", "int32", 1),
        "start_port": (60, "optional", "int32", 6723),
        "share_memory": (62, "optional", "bool", True),
        "poll_time": (81, "optional", "int32", 100),
    },
    "CDProto": {
        "cd_k": (1, "optional", "int32", 1),
    },
    "LayerProto": {
        "name": (1, "required", "string", None),
        "srclayers": (3, "repeated", "string", None),
        "param": (12, "repeated", "ParamProto", None),
        "exclude": (15, "repeated", "Phase", None),
        "include": (14, "repeated", "Phase", None),
        "type": (20, "optional", "LayerType", "kUserLayer"),
        "user_type": (21, "optional", "string", None),
        "share_src_blobs": (22, "optional", "bool", False),
        "unroll_len": (23, "optional", "int32", 1),
        "unroll_index": (24, "optional", "int32", 0),
        "unroll_conn_type": (25, "repeated", "UnrollConnType", None),
        "shift": (26, "repeated", "int32", None),
        "partition_dim": (60, "optional", "int32", -1),
        "partition_id": (90, "optional", "int32", 0),
        "num_partitions": (91, "optional", "int32", 1),
        "store_conf": (100, "optional", "StoreProto", None),
        "lmdbdata_conf": (190, "optional", "DataProto", None),
        "mnist_conf": (192, "optional", "MnistProto", None),
        "rgbimage_conf": (193, "optional", "RGBImageProto", None),
        "sharddata_conf": (194, "optional", "DataProto", None),
        "char_rnn_conf": (195, "optional", "CharRNNProto", None),
        "onehot_conf": (196, "optional", "OnehotProto", None),
        "activation_conf": (200, "optional", "ActivationProto", None),
        "convolution_conf": (201, "optional", "ConvolutionProto", None),
        "dropout_conf": (203, "optional", "DropoutProto", None),
        "dummy_conf": (204, "optional", "DummyProto", None),
        "innerproduct_conf": (205, "optional", "InnerProductProto", None),
        "lrn_conf": (206, "optional", "LRNProto", None),
        "pooling_conf": (207, "optional", "PoolingProto", None),
        "rbm_conf": (209, "optional", "RBMProto", None),
        "relu_conf": (211, "optional", "ReLUProto", None),
        "softmax_conf": (214, "optional", "SoftmaxProto", None),
        "gru_conf": (215, "optional", "GRUProto", None),
        "embedding_conf": (216, "optional", "EmbeddingProto", None),
        "bm_conf": (217, "optional", "BMProto", None),
        "softmaxloss_conf": (301, "optional", "SoftmaxLossProto", None),
        "argsort_conf": (401, "optional", "ArgSortProto", None),
        "concate_conf": (502, "optional", "ConcateProto", None),
        "slice_conf": (503, "optional", "SliceProto", None),
        "split_conf": (504, "optional", "SplitProto", None),
        "rnn_dummy_conf": (505, "optional", "RNNDummyProto", None),
    },
    "ParamProto": {
        "name": (1, "optional", "string", ""),
        "type": (3, "optional", "ParamType", "kParam"),
        "user_type": (4, "optional", "string", None),
        "init": (5, "optional", "ParamGenProto", None),
        "lr_scale": (15, "optional", "float", 1.0),
        "wd_scale": (16, "optional", "float", 1.0),
        "share_from": (60, "optional", "string", None),
        "id": (90, "optional", "int32", None),
        "owner": (91, "optional", "int32", -1),
        "partition_dim": (92, "optional", "int32", None),
        "shape": (93, "repeated", "int32", None),
    },
    "LRGenProto": {
        "type": (1, "optional", "ChangeMethod", "kUserChange"),
        "user_type": (2, "optional", "string", None),
        "base_lr": (3, "optional", "float", 0.01),
        "fixedstep_conf": (40, "optional", "FixedStepProto", None),
        "step_conf": (41, "optional", "StepProto", None),
        "linear_conf": (42, "optional", "LinearProto", None),
        "exponential_conf": (43, "optional", "ExponentialProto", None),
        "inverse_conf": (44, "optional", "InverseProto", None),
        "inverset_conf": (45, "optional", "InverseTProto", None),
    },
    "ParamGenProto": {
        "type": (1, "optional", "InitMethod", "kUserInit"),
        "user_type": (2, "optional", "string", None),
        "value": (3, "optional", "float", 1.0),
        "mean": (4, "optional", "float", 0.0),
        "std": (5, "optional", "float", 1.0),
        "low": (8, "optional", "float", -1.0),
        "high": (9, "optional", "float", 1.0),
    },
    "ActivationProto": {
        "type": (1, "optional", "ActivationType", "RELU"),
    },
    "OnehotProto": {
        "vocab_size": (1, "optional", "int32", 0),
    },
    "RGBImageProto": {
        "scale": (1, "optional", "float", 1.0),
        "cropsize": (2, "optional", "int32", 0),
        "mirror": (3, "optional", "bool", False),
        "meanfile": (4, "optional", "string", ""),
    },
    "SplitProto": {
        "num_splits": (1, "optional", "int32", 1),
    },
    "StoreProto": {
        "backend": (1, "optional", "string", None),
        "path": (2, "optional", "string", None),
        "separator": (3, "optional", "string", ","),
        "mean_file": (4, "optional", "string", None),
        "std_file": (5, "optional", "string", None),
        "mean_value": (6, "optional", "float", None),
        "std_value": (7, "optional", "float", None),
        "batchsize": (8, "repeated", "int32", None),
        "shape": (9, "repeated", "int32", None),
        "encoded": (10, "optional", "bool", False),
        "random_skip": (11, "optional", "int32", 0),
        "has_label": (12, "optional", "bool", True),
        "prefetching": (13, "optional", "bool", False),
    },
    "CharRNNProto": {
        "path": (1, "optional", "string", None),
        "vocab_path": (2, "optional", "string", None),
        "unroll_len": (3, "optional", "int32", 50),
        "batchsize": (4, "optional", "int32", 1),
    },
    "EmbeddingProto": {
        "vocab_size": (1, "optional", "int32", 0),
        "feature_dim": (2, "optional", "int32", 100),
    },
    "BMProto": {
    },
    "SoftmaxLossProto": {
        "topk": (1, "optional", "int32", 1),
        "scale": (30, "optional", "float", 1.0),
    },
    "ArgSortProto": {
        "topk": (1, "optional", "int32", 1),
    },
    "ConcateProto": {
        "concate_dim": (1, "optional", "int32", 0),
        "num_concates": (2, "optional", "int32", 1),
    },
    "ConvolutionProto": {
        "num_filters": (1, "optional", "int32", None),
        "kernel": (2, "optional", "int32", 3),
        "pad": (30, "optional", "int32", 0),
        "stride": (31, "optional", "int32", 1),
        "kernel_x": (41, "optional", "int32", 3),
        "kernel_y": (42, "optional", "int32", 3),
        "pad_x": (44, "optional", "int32", 0),
        "pad_y": (45, "optional", "int32", 0),
        "stride_x": (47, "optional", "int32", 1),
        "stride_y": (48, "optional", "int32", 1),
        "workspace_byte_limit": (50, "optional", "int32", 512),
    },
    "DataProto": {
        "path": (2, "required", "string", None),
        "batchsize": (4, "required", "int32", None),
        "random_skip": (30, "optional", "int32", 0),
    },
    "MnistProto": {
        "norm_a": (1, "required", "float", 1.0),
        "norm_b": (2, "required", "float", 0.0),
        "kernel": (30, "optional", "int32", 0),
        "sigma": (31, "optional", "float", 0.0),
        "alpha": (32, "optional", "float", 0.0),
        "beta": (33, "optional", "float", 0.0),
        "gamma": (34, "optional", "float", 0.0),
        "resize": (35, "optional", "int32", 0),
        "elastic_freq": (36, "optional", "int32", 0),
    },
    "DummyProto": {
        "input": (1, "optional", "bool", False),
        "output": (2, "optional", "bool", False),
        "shape": (3, "repeated", "int32", None),
    },
    "RNNDummyProto": {
        "dynamic_srclayer": (1, "optional", "string", None),
        "shape": (2, "repeated", "int32", None),
        "integer": (3, "optional", "bool", False),
        "low": (4, "optional", "float", 0.0),
        "high": (5, "optional", "float", 0.0),
    },
    "DropoutProto": {
        "dropout_ratio": (30, "optional", "float", 0.5),
    },
    "RBMProto": {
        "hdim": (1, "required", "int32", None),
        "bias_term": (2, "optional", "bool", True),
        "gaussian": (3, "optional", "bool", False),
    },
    "GRUProto": {
        "dim_hidden": (1, "required", "int32", None),
        "bias_term": (2, "optional", "bool", True),
    },
    "InnerProductProto": {
        "num_output": (1, "required", "int32", None),
        "bias_term": (30, "optional", "bool", True),
        "transpose": (31, "optional", "bool", False),
    },
    "LRNProto": {
        "local_size": (1, "required", "int32", 5),
        "alpha": (31, "optional", "float", 1.0),
        "beta": (32, "optional", "float", 0.75),
        "knorm": (34, "optional", "float", 1.0),
    },
    "PoolingProto": {
        "kernel": (1, "optional", "int32", 3),
        "pool": (30, "optional", "PoolingProto.PoolMethod", "MAX"),
        "pad": (31, "optional", "uint32", 0),
        "stride": (32, "optional", "uint32", 2),
        "kernel_x": (41, "optional", "int32", 3),
        "kernel_y": (42, "optional", "int32", 3),
        "pad_x": (44, "optional", "int32", 0),
        "pad_y": (45, "optional", "int32", 0),
        "stride_x": (47, "optional", "int32", 2),
        "stride_y": (48, "optional", "int32", 2),
    },
    "ReLUProto": {
        "negative_slope": (1, "optional", "float", 0.0),
    },
    "SliceProto": {
        "slice_dim": (1, "optional", "int32", 0),
        "num_slices": (2, "optional", "int32", 1),
    },
    "SoftmaxProto": {
        "num_softmax_per_instance": (1, "optional", "int32", 1),
    },
    "RMSPropProto": {
        "rho": (1, "required", "float", None),
    },
    "AdaDeltaProto": {
        "rho": (1, "required", "float", 0.9),
    },
    "AdamProto": {
        "beta1": (1, "required", "float", 0.9),
        "beta2": (2, "required", "float", 0.999),
    },
    "AdamMaxProto": {
        "beta1": (1, "required", "float", 0.9),
        "beta2": (2, "required", "float", 0.999),
    },
    "FixedStepProto": {
        "step": (28, "repeated", "int32", None),
        "step_lr": (29, "repeated", "float", None),
    },
    "StepProto": {
        "gamma": (35, "required", "float", 1.0),
        "change_freq": (40, "required", "int32", None),
    },
    "LinearProto": {
        "change_freq": (40, "required", "int32", None),
        "final_lr": (39, "required", "float", None),
    },
    "ExponentialProto": {
        "change_freq": (40, "required", "int32", None),
    },
    "InverseTProto": {
        "final_lr": (39, "required", "float", None),
    },
    "InverseProto": {
        "gamma": (1, "required", "float", 1.0),
        "pow": (2, "required", "float", 0.0),
    },
    "BlobProto": {
        "shape": (1, "repeated", "int32", None),
        "data": (2, "repeated", "float", None),
    },
    "BlobProtos": {
        "id": (2, "repeated", "int32", None),
        "version": (3, "repeated", "int32", None),
        "name": (4, "repeated", "string", None),
        "blob": (5, "repeated", "BlobProto", None),
    },
    "RecordProto": {
        "shape": (1, "repeated", "int32", None),
        "label": (2, "optional", "int32", None),
        "pixel": (3, "optional", "bytes", None),
        "data": (4, "repeated", "float", None),
    },
}

SINGA_EXTENSION_RANGES = {
    "JobProto": (101, 200), "AlgProto": (101, 200), "UpdaterProto": (101, 200),
    "LayerProto": (1001, 1100), "ParamProto": (101, 200), "LRGenProto": (101, 200),
    "ParamGenProto": (101, 200),
}
SINGA_PACKED = {("BlobProto", "data"), ("RecordProto", "data")}

SINGA_ENUMS = {
    "ActivationType": {"RELU": 1, "SIGMOID": 2, "TANH": 3, "STANH": 4},
    "AlgType": {"kBP": 1, "kCD": 2, "kBPTT": 3, "kUserAlg": 104},
    "LayerType": {
        "kCSVInput": 100, "kImagePreprocess": 101, "kRecordInput": 103, "kLMDBData": 190,
        "kLabel": 191, "kMnist": 192, "kRGBImage": 193, "kShardData": 194, "kCharRNN": 195,
        "kRNNLabel": 196, "kOneHot": 197, "kConvolution": 201, "kCConvolution": 202,
        "kDropout": 203, "kDummy": 204, "kInnerProduct": 205, "kLRN": 206, "kPooling": 207,
        "kCPooling": 208, "kRBMHid": 209, "kRBMVis": 210, "kReLU": 211, "kSTanh": 212,
        "kSigmoid": 213, "kSoftmax": 214, "kGRU": 215, "kEmbedding": 216, "kActivation": 217,
        "kBM": 218, "kCudnnConv": 250, "kCudnnPool": 251, "kCudnnLRN": 252, "kCudnnSoftmax": 253,
        "kCudnnActivation": 254, "kCudnnBM": 255, "kEuclideanLoss": 300, "kSoftmaxLoss": 301,
        "kCudnnSoftmaxLoss": 350, "kAccuracy": 400, "kArgSort": 401, "kCSVOutput": 402,
        "kRecordOutput": 403, "kCharRNNOutput": 404, "kBridgeDst": 500, "kBridgeSrc": 501,
        "kConcate": 502, "kSlice": 503, "kSplit": 504, "kRNNDummy": 505, "kUserLayer": 600,
    },
    "UpdaterType": {
        "kSGD": 1, "kAdaGrad": 2, "kRMSProp": 3, "kNesterov": 4, "kAdaDelta": 5, "kAdam": 6,
        "kAdamMax": 7, "kUserUpdater": 105,
    },
    "Phase": {
        "kUnknown": 0, "kTrain": 1, "kVal": 2, "kTest": 4, "kPositive": 8, "kNegative": 16,
        "kForward": 32, "kBackward": 64, "kLoss": 128, "kDeploy": 256, "kAggGrad": 512,
    },
    "ParamType": {"kParam": 0, "kUser": 103},
    "ChangeMethod": {
        "kFixed": 0, "kInverseT": 1, "kInverse": 2, "kExponential": 3, "kLinear": 4, "kStep": 5,
        "kFixedStep": 6, "kUserChange": 100,
    },
    "InitMethod": {
        "kConstant": 0, "kGaussian": 1, "kUniform": 2, "kGaussianSqrtFanIn": 4,
        "kUniformSqrtFanIn": 5, "kUniformSqrtFanInOut": 6, "kUserInit": 101,
    },
    "UnrollConnType": {
        "kUnrollOneToOne": 1, "kUnrollOneToAll": 2, "kUnrollFirstToLast": 3,
        "kUnrollCustomized": 4,
    },
    "PoolingProto.PoolMethod": {"MAX": 0, "AVG": 1},
}

# SINGA enum values this schema leaves out on purpose (a job file naming one gets the
# parser's "no value named" error, with a suggestion, instead of reaching code that has
# no meaning for it): Phase's flags above kTest are internal to SINGA's workers (CD
# phases, forward/backward flags), and kUnrollCustomized has no implementation in SINGA
# v0.3 either (the field it refers to, src_conn, does not exist).
# SINGA's Phase kForward / kBackward: those names are this schema's Direction values (enum
# values share the package's scope), so they cannot be declared
NOT_DECLARED = {("Phase", "kForward"), ("Phase", "kBackward")}

# Our aliases of SINGA values (allow_alias): the names SINGA's documentation uses.
ALIASES = {("UnrollConnType", "kOneToOne"): "kUnrollOneToOne",
           ("UnrollConnType", "kOneToAll"): "kUnrollOneToAll"}

_SCALARS = {descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
            descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
            descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
            descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
            descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
            descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
            descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool"}


def ours(message: str):
    return pb.DESCRIPTOR.pool.FindMessageTypeByName(f"rnnengine.{message}")


def our_enum(name: str):
    return pb.DESCRIPTOR.pool.FindEnumTypeByName(f"rnnengine.{name}")


def describe(f) -> tuple:
    """(number, label, type, default) of a field descriptor, written as the tables are."""
    label = "required" if f.is_required else "repeated" if f.is_repeated else "optional"
    kind = f.message_type or f.enum_type
    typ = kind.full_name.removeprefix("rnnengine.") if kind else _SCALARS[f.type]
    default = None
    if f.has_default_value:
        default = f.default_value
        if f.enum_type is not None:
            default = f.enum_type.values_by_number[default].name
        elif typ == "float":  # stored as float32: compare as float32
            default = float(np.float32(default))
    return f.number, label, typ, default


def singa_row(row: tuple) -> tuple:
    number, label, typ, default = row
    if typ == "float" and default is not None:
        default = float(np.float32(default))
    return number, label, typ, default


@pytest.mark.parametrize("message", sorted(SINGA_FIELDS))
def test_every_singa_field_has_singas_number_label_type_and_default(message):
    desc = ours(message)
    for name, row in SINGA_FIELDS[message].items():
        assert name in desc.fields_by_name, f"{message}.{name} is missing"
        got = describe(desc.fields_by_name[name])
        assert got == singa_row(row), f"{message}.{name}: ours {got}, SINGA's {row}"
        packed = desc.fields_by_name[name].is_packed
        assert packed == ((message, name) in SINGA_PACKED), f"{message}.{name} packed={packed}"


@pytest.mark.parametrize("enum", sorted(SINGA_ENUMS))
def test_every_singa_enum_value_is_singas(enum):
    values = our_enum(enum).values_by_name
    for name, number in SINGA_ENUMS[enum].items():
        if (enum, name) in NOT_DECLARED:
            assert name not in values, f"{enum}.{name} is declared: move it out of NOT_DECLARED"
            continue
        assert name in values, f"{enum}.{name} is missing"
        assert values[name].number == number, f"{enum}.{name} = {values[name].number}, SINGA's {number}"


def test_singas_extension_ranges_are_declared():
    for message, (lo, hi) in SINGA_EXTENSION_RANGES.items():
        assert ours(message).extension_ranges == [(lo, hi + 1)], message  # end is exclusive
    for message in SINGA_FIELDS:
        if message not in SINGA_EXTENSION_RANGES:
            assert ours(message).extension_ranges == [], message


def test_our_extensions_use_numbers_singa_never_used():
    extra = []
    for message, fields in SINGA_FIELDS.items():
        used = {row[0] for row in fields.values()}
        lo, hi = SINGA_EXTENSION_RANGES.get(message, (0, -1))
        for f in ours(message).fields:
            if f.name in fields:
                continue
            extra.append(f"{message}.{f.name}")
            assert f.number not in used, f"{message}.{f.name} = {f.number} is a SINGA number"
            assert not lo <= f.number <= hi, f"{message}.{f.name} = {f.number} is in SINGA's " \
                                             f"extension range {lo}-{hi}"
    # the list is engine.config's (what tells a job in SINGA's syntax from one of ours) and
    # docs/config.md's: adding an extension means listing and documenting it there; the
    # confs of the cells this project adds come from the registry
    ours_cells = {f"LayerProto.{cls.CONF_FIELD}" for t, cls in cell_classes().items()
                  if pb.LayerType.Name(t) not in SINGA_ENUMS["LayerType"]}
    assert ours_cells <= EXTENSION_FIELDS
    assert sorted(extra) == sorted(EXTENSION_FIELDS)
    added = {}
    for enum, values in SINGA_ENUMS.items():
        for v in our_enum(enum).values:
            if v.name in values:
                continue
            if (enum, v.name) in ALIASES:
                assert v.number == values[ALIASES[enum, v.name]], v.name
                continue
            assert v.number not in values.values(), f"{enum}.{v.name} = {v.number} is SINGA's"
            added.setdefault(enum, set()).add(v.name)
    assert added == EXTENSION_VALUES
    assert {v.name for v in our_enum("LayerType").values} - set(SINGA_ENUMS["LayerType"]) == \
        {pb.LayerType.Name(t) for t in cell_classes()} - {"kGRU"}


FEED_FORWARD = """
name: "ff"
neuralnet {
  layer_group { layer: "conv" layer: "pool" }
  layer { name: "lmdb" type: kLMDBData share_src_blobs: true
          lmdbdata_conf { path: "train_lmdb" batchsize: 64 random_skip: 100 } }
  layer { name: "shard" type: kShardData
          sharddata_conf { path: "train_shard" batchsize: 32 } }
  layer { name: "mnist" type: kMnist srclayers: "shard"
          mnist_conf { norm_a: 255 norm_b: 0.5 kernel: 7 sigma: 6 alpha: 36 beta: 15 gamma: 15
                       resize: 29 elastic_freq: 2 } }
  layer { name: "rgb" type: kRGBImage srclayers: "lmdb"
          rgbimage_conf { scale: 0.5 cropsize: 227 mirror: true meanfile: "mean.bin" } }
  layer { name: "store" type: kRecordInput
          store_conf { backend: "kvfile" path: "train.bin" mean_file: "mean.bin" std_value: 127.5
                       batchsize: 64 batchsize: 32 shape: 3 shape: 32 shape: 32 prefetching: true
                       random_skip: 5000 encoded: false } }
  layer { name: "conv" type: kCConvolution srclayers: "store"
          convolution_conf { num_filters: 32 kernel: 5 pad: 2 stride: 1 kernel_x: 5 kernel_y: 3
                             pad_x: 1 pad_y: 0 stride_x: 2 stride_y: 1
                             workspace_byte_limit: 256 } }
  layer { name: "pool" type: kCPooling srclayers: "conv"
          pooling_conf { pool: AVG kernel: 3 stride: 2 pad: 1 kernel_x: 3 kernel_y: 2 pad_x: 0
                         pad_y: 1 stride_x: 2 stride_y: 1 } }
  layer { name: "norm" type: kLRN srclayers: "pool"
          lrn_conf { local_size: 3 alpha: 5e-05 beta: 0.75 knorm: 2 } }
  layer { name: "bm" type: kBM srclayers: "norm" bm_conf { } }
  layer { name: "vis" type: kRBMVis srclayers: "bm" srclayers: "hid"
          rbm_conf { hdim: 1000 bias_term: false gaussian: true } }
  layer { name: "hid" type: kRBMHid srclayers: "vis" rbm_conf { hdim: 1000 } }
}
"""


def test_singas_feed_forward_settings_parse():
    job = parse_job(FEED_FORWARD, "ff.conf")
    lay = {layer.name: layer for layer in job.neuralnet.layer}
    assert list(job.neuralnet.layer_group[0].layer) == ["conv", "pool"]
    assert lay["lmdb"].share_src_blobs and lay["lmdb"].lmdbdata_conf.random_skip == 100
    assert (lay["shard"].sharddata_conf.path, lay["shard"].sharddata_conf.batchsize) == \
        ("train_shard", 32)
    m = lay["mnist"].mnist_conf
    assert (m.norm_a, m.norm_b, m.kernel, m.resize, m.elastic_freq) == (255, 0.5, 7, 29, 2)
    r = lay["rgb"].rgbimage_conf
    assert (r.scale, r.cropsize, r.mirror, r.meanfile) == (0.5, 227, True, "mean.bin")
    s = lay["store"].store_conf
    assert list(s.batchsize) == [64, 32] and list(s.shape) == [3, 32, 32] and s.prefetching
    c = lay["conv"].convolution_conf
    assert (c.num_filters, c.kernel, c.pad, c.stride, c.kernel_y, c.workspace_byte_limit) == \
        (32, 5, 2, 1, 3, 256)
    p = lay["pool"].pooling_conf
    assert p.pool == pb.PoolingProto.AVG and (p.kernel, p.stride, p.pad, p.kernel_y) == (3, 2, 1, 2)
    assert lay["norm"].lrn_conf.local_size == 3
    assert lay["norm"].lrn_conf.alpha == pytest.approx(5e-05)
    assert lay["bm"].HasField("bm_conf")
    assert (lay["vis"].rbm_conf.hdim, lay["vis"].rbm_conf.gaussian) == (1000, True)
    assert lay["hid"].rbm_conf.bias_term  # SINGA's default
    # SINGA's defaults where the file is silent
    assert pb.PoolingProto().pool == pb.PoolingProto.MAX and pb.PoolingProto().stride == 2
    assert pb.LRNProto().local_size == 5 and pb.ConvolutionProto().kernel == 3


def test_char_rnn_conf_numbers_are_singas_on_the_wire():
    """unroll_len is field 3 and batchsize field 4, as SINGA wrote them."""
    c = pb.CharRNNProto(unroll_len=50, batchsize=7)
    assert c.SerializeToString() == bytes([3 << 3, 50, 4 << 3, 7])


_EXT_FILE = "test_singa_proto_user_extension.proto"


def _register_user_extension():
    """A user's .proto extending our LayerProto and JobProto inside SINGA's ranges, as
    SINGA's examples (rnnlm) extended SINGA's: package userext, a message with one field,
    extension fields 1001 (LayerProto) and 101 (JobProto)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_EXT_FILE)
        return
    except KeyError:
        pass
    f = descriptor_pb2.FileDescriptorProto(name=_EXT_FILE, package="userext",
                                           dependency=["job.proto"], syntax="proto2")
    msg = f.message_type.add(name="WindowProto")
    msg.field.add(name="max_window", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    f.extension.add(name="window_conf", number=1001, extendee=".rnnengine.LayerProto",
                    type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                    type_name=".userext.WindowProto",
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    f.extension.add(name="run_tag", number=101, extendee=".rnnengine.JobProto",
                    type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool.AddSerializedFile(f.SerializeToString())


def test_a_user_extension_in_singas_ranges_parses():
    _register_user_extension()
    job = parse_job('name: "x" [userext.run_tag]: "r1"\n'
                    'neuralnet { layer { name: "data" user_type: "kData" '
                    '[userext.window_conf] { max_window: 10 } } }\n', "ext.conf")
    pool = descriptor_pool.Default()
    layer = job.neuralnet.layer[0]
    assert layer.Extensions[pool.FindExtensionByName("userext.window_conf")].max_window == 10
    assert job.Extensions[pool.FindExtensionByName("userext.run_tag")] == "r1"
    assert "[userext.window_conf]" in text_format.MessageToString(layer)
