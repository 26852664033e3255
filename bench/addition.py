"""bi-LSTM 100 on the addition problem: the engine and PyTorch, each in its own processes.

    python -m bench.addition [--steps N] [--warmup N] [--pairs N] [--framework ...]
                             [--emulate-avx2] [--json FILE]

The engine trains the net of ``configs/addition-bilstm.conf`` (a forward and a backward
LSTM 100 over sequences of 50 to 55 steps, zero-padded to 55 with masks, their states
joined into one linear read-out, Euclidean loss, Adam, values clipped at ±100, batch
100) as ``engine.train`` builds it, on data from ``tools/make_seqdata.py addition-long``.
PyTorch trains ``nn.LSTM(2, 100, bidirectional=True)`` over the same zero-padded batches
with the same read-out and settings (the reference of docs/bidirectional.md). Method as
``bench.charrnn``: one process per measurement, engine and PyTorch alternating for
``--pairs`` pairs, ``--warmup`` untimed steps, then ``--steps`` timed ones; step time = the
median of the per-process medians (min–max over processes); the speed ratio per pair.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import charrnn  # noqa: E402
from bench.charrnn import child_env, cpu_model, describe_blas, thread_pools  # noqa: E402

CONF = ROOT / "configs" / "addition-bilstm.conf"
N_TRAIN = 3000          # sequences generated for the benchmark (timing only)


def data(tmp: pathlib.Path) -> pathlib.Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_seqdata as gen
    folder = tmp / "data"
    gen.write_task("addition-long", folder, seed=0, n_train=N_TRAIN, n_val=100)
    return folder


class EngineRunner(charrnn.EngineRunner):
    """configs/addition-bilstm.conf's training net; ``step`` is bench.charrnn's, one step as
    engine.train runs it."""

    def __init__(self, tmp: pathlib.Path):
        from google.protobuf import text_format

        from engine.backend import make_backend
        from engine.config import Phase, load_job
        from engine.net import Net
        from engine.planner import make_worker
        from engine.unroll import unroll
        from engine.updaters import Updater
        from engine.workspace import job_alg, net_info

        folder = data(tmp)
        job = load_job(CONF)
        for layer in job.neuralnet.layer:
            if layer.HasField("store_conf"):
                layer.store_conf.path = str(folder / pathlib.PurePosixPath(layer.store_conf.path).name)
        path = tmp / "job.conf"
        path.write_text(text_format.MessageToString(job), encoding="utf-8")
        self.backend = make_backend(None)
        self.net = Net(unroll(job.neuralnet, Phase.TRAIN), self.backend,
                       net_info(path, tmp / "ws", 0, alg=job_alg(job)), seed=0)
        self.worker, self.note = make_worker(self.net, 0, job.train_one_batch.state_carry)
        self.updater = Updater(job.updater, self.net.params, self.backend.xp)
        self.step_no = 0

    def describe(self) -> str:
        from engine.layers import kernels
        return (f"{self.note}; {kernels.describe()}; NumPy BLAS: "
                f"{describe_blas(thread_pools())}")


class TorchRunner:
    """nn.LSTM(2, 100, bidirectional=True) over the same zero-padded batches: the forward
    direction's output at each row's last valid step and the backward one's at step 0, one
    linear read-out, mean squared error, Adam 3e-3, gradient values clipped at 100."""

    def __init__(self, tmp: pathlib.Path):
        import torch
        from torch import nn

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        with np.load(data(tmp) / "train.npz") as d:
            self.x = torch.from_numpy(np.asarray(d["x"], dtype=np.float32))
            self.y = torch.from_numpy(np.asarray(d["y"], dtype=np.float32)).reshape(-1)
            self.lengths = torch.from_numpy(np.asarray(d["lengths"], dtype=np.int64))
        self.torch, self.B, self.cursor = torch, 100, 0
        self.lstm = nn.LSTM(self.x.shape[2], 100, bidirectional=True, batch_first=True)
        self.head = nn.Linear(200, 1)
        self.params = list(self.lstm.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.Adam(self.params, lr=0.003)

    def step(self) -> float:
        torch, B = self.torch, self.B
        if self.cursor + B > self.x.shape[0]:
            self.cursor = 0
        sl = slice(self.cursor, self.cursor + B)
        self.cursor += B
        x, y, n = self.x[sl], self.y[sl], self.lengths[sl]
        out, _ = self.lstm(x)
        fwd = out[torch.arange(B), n - 1, :100]
        bwd = out[:, 0, 100:]
        pred = self.head(torch.cat([fwd, bwd], dim=1)).reshape(-1)
        loss = 0.5 * ((pred - y) ** 2).sum() / B
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_value_(self.params, 100)
        self.opt.step()
        return float(loss.detach())

    def describe(self) -> str:
        torch = self.torch
        return (f"PyTorch {torch.__version__}, CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def child_main(kind: str, steps: int, warmup: int) -> int:
    if kind == "engine":
        from engine.backend import keep_freed_memory
        keep_freed_memory()   # as engine.train does
    with tempfile.TemporaryDirectory() as tmp:
        runner = EngineRunner(pathlib.Path(tmp)) if kind == "engine" else TorchRunner(pathlib.Path(tmp))
        for _ in range(warmup):
            runner.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = runner.step()
            times.append(time.perf_counter() - t)
    print(json.dumps({"kind": kind, "step_s": times, "last_loss": loss, "about": runner.describe()}))
    return 0


def run_child(kind: str, steps: int, warmup: int) -> dict:
    env, _ = child_env(kind, os.environ)
    r = subprocess.run([sys.executable, "-m", "bench.addition", "--child", kind, "--steps",
                        str(steps), "--warmup", str(warmup)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()
        raise RuntimeError(f"{kind} process failed: {last[-1] if last else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.addition", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--framework", default="both", choices=["engine", "pytorch", "both"])
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="as bench.charrnn --emulate-avx2: both frameworks' math libraries on AVX2")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    ap.add_argument("--child", choices=["engine", "pytorch"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.pairs < 1:
        ap.error("--steps and --pairs must be >= 1, --warmup >= 0")
    if a.child:
        return child_main(a.child, a.steps, a.warmup)
    kinds = ("engine", "pytorch") if a.framework == "both" else (a.framework,)
    charrnn.EMULATE_AVX2[0] = a.emulate_avx2
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; bi-LSTM 100, addition problem, "
          f"batch 100, unroll 55; {a.pairs} pair(s), {a.warmup} warm-up + {a.steps} timed "
          f"steps per process" + ("; AVX2 emulated (bench.charrnn --emulate-avx2)"
                                  if a.emulate_avx2 else ""), flush=True)
    meds: dict = {k: [] for k in kinds}
    about = {}
    try:
        for i in range(a.pairs):
            line = []
            for k in kinds:
                rep = run_child(k, a.steps, a.warmup)
                meds[k].append(statistics.median(rep["step_s"]))
                about[k] = rep["about"]
                line.append(f"{k} {meds[k][-1] * 1000:.2f} ms/step")
            print(f"  pair {i + 1}: " + ", ".join(line), flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = {"cpu": cpu_model(), "about": about}
    for k in kinds:
        m = meds[k]
        res[k] = {"median_step_s": statistics.median(m), "min_step_s": min(m), "max_step_s": max(m)}
        print(f"  {k:<8} {statistics.median(m) * 1000:7.2f} ms/step (min-max {min(m) * 1000:.2f}-"
              f"{max(m) * 1000:.2f})  {about[k]}")
    if len(kinds) == 2:
        pairs = [p / e for e, p in zip(meds["engine"], meds["pytorch"])]
        res["ratio_speed_pairs"] = pairs
        print(f"  engine/PyTorch speed {statistics.median(pairs):.2f} (min-max {min(pairs):.2f}-"
              f"{max(pairs):.2f} over {len(pairs)} pairs)")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
