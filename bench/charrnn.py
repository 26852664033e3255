"""char-rnn training speed: the engine against PyTorch, side by side in one process.

    python -m bench.charrnn [--case gru512|lstm512|rnn512|gru128|gru512x2|all] [--steps N]
                            [--warmup N] [--executor planned|reference] [--json FILE] [--no-memory]

For each case both train the same model (one-hot input, recurrent layer(s),
linear head, softmax cross-entropy summed over steps and averaged over the
batch, RMSProp rho 0.95 lr 0.002, element-wise clipping to ±5, state carried
across batches) on the same random text, float32, on all cores. After a
warm-up the two alternate, a few steps each, so machine noise hits both alike.
Reported per framework: median step time, characters per second, model GFLOP/s
(forward + backward GEMM FLOPs), the fraction of this machine's float32 GEMM
peak (measured with NumPy at start), and peak memory (each framework trained
alone in a child process: peak RSS minus the RSS after imports and set-up).
Then the ratio engine / PyTorch. Both run with glibc's malloc told to keep freed
memory for reuse (``engine.backend.keep_freed_memory``, which ``engine.train``
sets too); it is one process, so PyTorch's allocations get the same setting.
PyTorch is optional (``pip install
torch==2.13.0``); without it only the engine is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = {
    #          cell   hidden batch unroll vocab layers
    "gru512": ("GRU", 512, 50, 50, 101, 1),
    "lstm512": ("LSTM", 512, 50, 50, 101, 1),
    "rnn512": ("RNN", 512, 50, 50, 101, 1),
    "gru128": ("GRU", 128, 32, 50, 101, 1),
    "gru512x2": ("GRU", 512, 50, 50, 101, 2),
}
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}


def gemm_peak() -> float:
    """Best float32 GEMM rate of NumPy on this machine, GFLOP/s."""
    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def blas_info() -> str:
    """NumPy's BLAS and the kernel it runs (threadpoolctl, from the ``bench`` extra), and
    the OPENBLAS_* variables that choose that kernel, when set."""
    forced = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OPENBLAS_"))
    try:
        import threadpoolctl
    except ImportError:
        desc = "BLAS kernel unknown (pip install threadpoolctl)"
    else:
        libs = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        desc = "; ".join(f"{i.get('internal_api')} {i.get('version')} kernel {i.get('architecture')}, "
                         f"{i.get('num_threads')} threads" for i in libs) or "no BLAS found"
    return desc + (f" (set here: {forced})" if forced else "")


def model_flops(cell, H, B, T, V, layers) -> float:
    """GEMM FLOPs of one training step (forward, backward data and weight gradients)."""
    G = GATES[cell]
    rows = T * B
    f = 0.0
    D = V
    for layer in range(layers):
        f += 2 * rows * D * G * H * (2 if layer == 0 else 3)  # input proj: fwd + dW (+ dX above layer 0)
        f += 2 * rows * H * G * H * 3                          # recurrent: fwd + dW + dh
        D = H
    f += 2 * rows * H * V * 3                                  # output layer: fwd + dW + dX
    return f


def corpus(path: pathlib.Path, V: int, n: int = 400_000) -> None:
    alphabet = [chr(c) for c in range(33, 33 + V - 1)] + ["\n"]
    ids = np.random.default_rng(0).integers(0, V, n)
    path.write_text("".join(alphabet[i] for i in ids), encoding="utf-8")


def job_text(case: str, data: pathlib.Path, ws: pathlib.Path) -> str:
    cell, H, B, T, V, layers = CASES[case]
    conf = {"GRU": "gru_conf", "LSTM": "lstm_conf", "RNN": "rnn_conf"}[cell]
    rec = ""
    src = "onehot"
    for k in range(layers):
        rec += (f'layer {{ name: "rnn{k + 1}" type: k{cell} srclayers: "{src}" '
                f'{conf} {{ dim_hidden: {H} }} }}\n')
        src = f"rnn{k + 1}"
    return f"""name: "bench-{case}" train_steps: 1000000
train_one_batch {{ alg: kBPTT }}
updater {{ type: kRMSProp rmsprop_conf {{ rho: 0.95 }}
  learning_rate {{ type: kFixed base_lr: 0.002 }} clip_low: -5 clip_high: 5 }}
neuralnet {{ unroll_len: {T}
layer {{ name: "data" type: kCharRNN unroll_len: 1
  char_rnn_conf {{ path: "{data}" batchsize: {B} unroll_len: {T} }} }}
layer {{ name: "onehot" type: kOneHot srclayers: "data" unroll_conn_type: kUnrollOneToAll
  onehot_conf {{ vocab_size: {V} }} }}
layer {{ name: "label" type: kRNNLabel srclayers: "data" unroll_conn_type: kUnrollOneToAll }}
{rec}layer {{ name: "ip1" type: kInnerProduct srclayers: "{src}" innerproduct_conf {{ num_output: {V} }} }}
layer {{ name: "loss" type: kSoftmaxLoss srclayers: "ip1" srclayers: "label" }}
}}
cluster {{ workspace: "{ws}" }}
"""


class EngineRunner:
    def __init__(self, case, tmp: pathlib.Path, executor: str):
        from engine.backend import make_backend
        from engine.config import Phase, normalise, parse_job, validate
        from engine.net import Net
        from engine.planner import make_worker
        from engine.workspace import net_info
        from engine.unroll import unroll
        from engine.updaters import Updater

        V = CASES[case][4]
        data = tmp / "text.txt"
        if not data.exists():
            corpus(data, V)
        job = parse_job(job_text(case, data, tmp / "ws"), "bench")
        normalise(job)
        validate(job)
        info = net_info(tmp / "job.conf", tmp / "ws", 0)
        info["vocab"] = [chr(c) for c in range(33, 33 + V - 1)] + ["\n"]
        self.net = Net(unroll(job.neuralnet, Phase.TRAIN), make_backend(None), info, seed=0)
        self.worker, self.note = make_worker(self.net, 0, executor=executor)
        self.updater = Updater(job.updater, self.net.params, np)
        self.step_no = 0

    def step(self) -> float:
        m = self.worker.run_batch(train=True)
        self.updater.update(self.step_no)
        self.step_no += 1
        return m["loss"][0] / m["loss"][1]


class TorchRunner:
    def __init__(self, case):
        import torch
        from torch import nn

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        cell, H, B, T, V, layers = CASES[case]
        self.torch, self.T, self.B, self.V = torch, T, B, V
        mod = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[cell]
        self.rnn = mod(V, H, num_layers=layers)
        self.head = nn.Linear(H, V)
        self.params = list(self.rnn.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.RMSprop(self.params, lr=0.002, alpha=0.95, eps=1e-8)
        L = 400_000 // B
        self.streams = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, L)))
        self.cursor = 0
        self.state = None
        self.eye = torch.eye(V)

    def step(self) -> float:
        torch, T, B = self.torch, self.T, self.B
        if self.cursor + T + 1 > self.streams.shape[1]:
            self.cursor = 0
            self.state = None
        chunk = self.streams[:, self.cursor:self.cursor + T + 1]   # (B, T+1), B contiguous streams
        self.cursor += T
        x = self.eye[chunk[:, :T].T]              # (T, B, V) one-hot
        y = chunk[:, 1:T + 1].T.reshape(-1)
        out, state = self.rnn(x, self.state)
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        logits = self.head(out.reshape(T * B, -1))
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum") / B
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        for p in self.params:
            p.grad.clamp_(-5, 5)
        self.opt.step()
        return float(loss.detach()) / T


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def memory_child(framework: str, case: str, steps: int, executor: str) -> dict:
    """Peak RSS of training ``steps`` steps alone in a child process (MiB)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.charrnn import _mem_main; "
            f"_mem_main({framework!r}, {case!r}, {steps}, {executor!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mem_main(framework, case, steps, executor):
    """Peak RSS of training, over the RSS of the set-up model with its math library warm:
    a small GEMM first (BLAS/oneDNN buffers and thread pools are not the model's), then
    the peak counter is reset (/proc/self/clear_refs 5) and ``steps`` steps run."""
    from engine.backend import keep_freed_memory
    keep_freed_memory()  # the same allocator setting as the timed runs, for either framework
    with tempfile.TemporaryDirectory() as tmp:
        if framework == "engine":
            runner = EngineRunner(case, pathlib.Path(tmp), executor)
            a = np.ones((64, 64), np.float32)
            a @ a
        else:
            runner = TorchRunner(case)
            t = runner.torch.ones(64, 64)
            t @ t
        base = _rss_mib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        for _ in range(steps):
            runner.step()
        peak = _hwm_mib()
        print(json.dumps({"peak_rss_mib": round(peak, 1), "base_rss_mib": round(base, 1),
                          "train_mib": round(peak - base, 1)}))


def run_case(case, steps, warmup, executor, peak, memory) -> dict:
    cell, H, B, T, V, layers = CASES[case]
    flops = model_flops(cell, H, B, T, V, layers)
    res = {"case": case, "cell": cell, "hidden": H, "batch": B, "unroll": T, "vocab": V,
           "layers": layers, "gflop_per_step": round(flops / 1e9, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"engine": EngineRunner(case, pathlib.Path(tmp), executor)}
        res["engine_executor"] = runners["engine"].note
        if have_torch():
            runners["pytorch"] = TorchRunner(case)
        times = {k: [] for k in runners}
        losses = {k: [] for k in runners}
        for r in runners.values():
            for _ in range(warmup):
                r.step()
        per_round = 3
        done = 0
        while done < steps:
            for k, r in runners.items():
                for _ in range(min(per_round, steps - done)):
                    t = time.perf_counter()
                    losses[k].append(r.step())
                    times[k].append(time.perf_counter() - t)
            done += per_round
    for k, ts in times.items():
        med = statistics.median(ts)
        gf = flops / med / 1e9
        res[k] = {"median_step_s": round(med, 5), "chars_per_s": round(B * T / med, 1),
                  "gflops": round(gf, 2), "peak_fraction": round(gf / peak, 3),
                  "last_loss": round(losses[k][-1], 4)}
        if memory:
            res[k].update(memory_child(k, case, max(3, warmup + 2), executor))
    if "pytorch" in res:
        res["ratio_speed"] = round(res["engine"]["chars_per_s"] / res["pytorch"]["chars_per_s"], 3)
        if memory and "train_mib" in res["engine"] and "train_mib" in res["pytorch"]:
            res["ratio_memory"] = round(res["engine"]["train_mib"] / max(1e-9, res["pytorch"]["train_mib"]), 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.charrnn", description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="all", choices=[*CASES, "all"])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per framework")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--executor", default="auto", choices=["auto", "planned", "reference"])
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    ap.add_argument("--json", help="also write the results as one JSON object to this file")
    a = ap.parse_args(argv)
    from engine.backend import keep_freed_memory
    # as engine.train does; process-wide, so PyTorch's allocations get it as well
    malloc = "keeps freed memory" if keep_freed_memory() else "default (no glibc)"
    peak = gemm_peak()
    blas = blas_info()
    print(f"float32 GEMM peak (NumPy, 2048^3): {peak:.1f} GFLOP/s; cores {os.cpu_count()}; "
          f"PyTorch {'present' if have_torch() else 'absent'}\nNumPy BLAS: {blas}\n"
          f"malloc (both frameworks, one process): {malloc}")
    cases = list(CASES) if a.case == "all" else [a.case]
    results = []
    for case in cases:
        r = run_case(case, a.steps, a.warmup, a.executor, peak, not a.no_memory)
        results.append(r)
        print(f"\n{case}: {r['cell']} {r['hidden']} x{r['layers']} batch {r['batch']} unroll "
              f"{r['unroll']} vocab {r['vocab']} ({r['gflop_per_step']} GFLOP/step; "
              f"{r['engine_executor']})")
        for k in ("engine", "pytorch"):
            if k in r:
                x = r[k]
                mem = (f"  peak mem +{x['train_mib']:.0f} MiB" if "train_mib" in x else "")
                print(f"  {k:<8} {x['median_step_s'] * 1000:8.1f} ms/step  {x['chars_per_s']:10,.0f} "
                      f"chars/s  {x['gflops']:7.1f} GFLOP/s  {100 * x['peak_fraction']:5.1f}% of peak"
                      f"{mem}")
        if "ratio_speed" in r:
            print(f"  engine/PyTorch speed {r['ratio_speed']:.2f}" +
                  (f", memory {r['ratio_memory']:.2f}" if "ratio_memory" in r else ""))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"gemm_peak_gflops": round(peak, 1),
                                                    "numpy_blas": blas, "malloc": malloc,
                                                    "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
