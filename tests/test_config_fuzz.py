"""Property: a mutated job file either loads (and builds) or fails with one ConfigError."""
from __future__ import annotations

import pathlib
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charjobs import char_job
from engine.backend import make_backend
from engine.config import ConfigError, Phase, load_job
from engine.net import Net
from engine.workspace import net_info
from engine.unroll import unroll

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENUMS = ["kGRU", "kLSTM", "kRNN", "kOneHot", "kInnerProduct", "kSoftmaxLoss", "kConvolution",
         "kUnrollOneToAll", "kUnrollFirstToLast", "kOneToOne", "kTrain", "kVal", "kTest",
         "kRMSProp", "kAdam", "kStep", "kUniform", "kBPTT", "kBP", "kCD", "kRNNDummy", "kArgSort",
         "kCharRNN", "kRNNLabel", "kDropout", "kSlice", "kConcate", "kEmbedding", "kNope"]
NUMBERS = ["0", "1", "-1", "2", "3", "50", "-7", "1000000", "0.5", "1e40", "nan", "x"]
STRINGS = ['"data"', '"onehot"', '"label"', '"rnn1"', '"loss"', '"a#b"', '""', '"w"', '"ip1"']


@st.composite
def mutated(draw, text: str):
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        k = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "number", "enum", "string", "swap"]))
        line = lines[k]
        if op == "delete":
            del lines[k]
        elif op == "duplicate":
            lines.insert(k, line)
        elif op == "number" and re.search(r"-?\d+(\.\d+)?", line):
            lines[k] = re.sub(r"-?\d+(\.\d+)?", draw(st.sampled_from(NUMBERS)), line, count=1)
        elif op == "enum" and re.search(r"\bk[A-Z]\w*", line):
            lines[k] = re.sub(r"\bk[A-Z]\w*", draw(st.sampled_from(ENUMS)), line, count=1)
        elif op == "string" and '"' in line:
            lines[k] = re.sub(r'"[^"]*"', draw(st.sampled_from(STRINGS)), line, count=1)
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[k], lines[j] = lines[j], lines[k]
    return "\n".join(lines) + "\n"


def _try(path: pathlib.Path, build: bool) -> None:
    try:
        job = load_job(path)
        for ph in (Phase.TRAIN, Phase.VAL, Phase.TEST):
            u = unroll(job.neuralnet, ph, job.name, where=str(path))
            if build and ph == Phase.TRAIN and u.graph.number_of_nodes() < 400:
                Net(u, make_backend(None, np.float32), net_info(path, path.parent / "ws", 0),
                    where=str(path))
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg.strip() and msg.startswith(str(path)), msg


_TINY = None


def tiny_job_text(tmp: pathlib.Path) -> str:
    return char_job(tmp, hidden=6, batch=2, unroll=4, stacked=True).read_text()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_tiny_job_builds_or_fails_cleanly(tmp_path, data):
    text = tiny_job_text(tmp_path)
    path = tmp_path / "mut.conf"
    path.write_text(data.draw(mutated(text)))
    _try(path, build=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_shipped_configs_load_or_fail_cleanly(tmp_path, data):
    confs = sorted((ROOT / "configs").glob("*.conf"))
    src = data.draw(st.sampled_from(confs))
    path = tmp_path / "mut.conf"
    path.write_text(data.draw(mutated(src.read_text())))
    _try(path, build=False)
