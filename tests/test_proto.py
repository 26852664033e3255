"""The committed engine/proto/job_pb2.py is what tools/gen_proto.py makes of proto/job.proto."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from engine.proto import job_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools is not installed (pip install grpcio-tools)")
def test_generated_module_is_up_to_date(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fresh = (tmp_path / "job_pb2.py").read_bytes()
    committed = (ROOT / "engine" / "proto" / "job_pb2.py").read_bytes()
    assert fresh == committed, ("engine/proto/job_pb2.py is out of date with proto/job.proto; "
                                "run: python tools/gen_proto.py")


def test_singa_numbers_are_kept():
    """Field numbers and enum values that binary compatibility with SINGA relies on."""
    layer = pb.LayerProto.DESCRIPTOR.fields_by_name
    assert {n: layer[n].number for n in ("name", "srclayers", "param", "include", "exclude",
                                         "type", "unroll_len", "unroll_index",
                                         "unroll_conn_type", "shift")} == {
        "name": 1, "srclayers": 3, "param": 12, "include": 14, "exclude": 15, "type": 20,
        "unroll_len": 23, "unroll_index": 24, "unroll_conn_type": 25, "shift": 26}
    assert pb.NetProto.DESCRIPTOR.fields_by_name["unroll_len"].number == 22
    assert (pb.kUnrollOneToOne, pb.kUnrollOneToAll, pb.kUnrollFirstToLast) == (1, 2, 3)
    assert (pb.kGRU, pb.kCharRNN, pb.kRNNLabel, pb.kOneHot, pb.kRNNDummy) == (215, 195, 196, 197, 505)
    assert (pb.kTrain, pb.kVal, pb.kTest) == (1, 2, 4)
