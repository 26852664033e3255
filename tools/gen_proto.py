"""Generate engine/proto/job_pb2.py from proto/job.proto.

Run ``python tools/gen_proto.py`` after editing the schema. Uses the protoc
shipped in grpcio-tools (pip), so no system protoc is needed. The generated
module is committed; tests/test_proto.py fails when it is out of date.

``python tools/gen_proto.py --out DIR`` writes into DIR instead (used by that test).
"""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "engine" / "proto"


def generate(out_dir: pathlib.Path) -> pathlib.Path:
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_proto: grpcio-tools is missing; run: pip install grpcio-tools")
    out_dir.mkdir(parents=True, exist_ok=True)  # protoc does not create it
    rc = protoc.main([
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        str(PROTO_DIR / "job.proto"),
    ])
    if rc != 0:
        sys.exit(f"gen_proto: protoc failed with status {rc}")
    return out_dir / "job_pb2.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    print(generate(args.out))


if __name__ == "__main__":
    main()
