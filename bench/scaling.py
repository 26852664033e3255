"""Data-parallel scaling: measured on this machine, projected over a network.

    python -m bench.scaling JOB [--max-workers 64] [--mode strong|weak] [--steps N]
                            [--warmup N] [--threads T] [--network GBPS:LATENCY_US ...]
                            [--local-pairs K] [--local-steps N] [--plot FILE] [--json FILE]

What it measures, each on this machine:

1. Compute per step at the per-worker batch b of N workers: the job's training step
   (forward, backward, clipping, update) on the rows one worker of N reads
   (``InputLayer.take_share``), with the reduction left out, timed step by step after
   ``--warmup`` steps; the median of ``--steps``; each b in a process of its own, with
   ``--threads`` BLAS threads when given. ``--mode strong`` (default) keeps the
   job's batch B and gives each worker b = B / N, for every N <= ``--max-workers`` that
   divides B; ``--mode weak`` gives every worker B (a global batch of N·B), for N = 1, 2,
   4, ... ``--max-workers``.
2. The in-place Allreduce of the model's gradient buffer (S bytes) between two local
   ranks (``mpiexec -n 2``, shared memory): median of 50 after 5 warm-up. Skipped, and
   said so, without mpi4py.
3. With ``--local-pairs K`` (and MPI): the job trained ``--local-steps`` steps by one
   worker with two BLAS threads and by two workers with one thread each, alternately,
   K times; steps/s (the steady second half of each run) and, for two workers, the
   Allreduce time per step and its share of the step, from the run's metrics.

Projection for N workers, one per machine, over a network of bandwidth W and
latency L (a ring Allreduce):

    t_allreduce(N) = 2 (N - 1) / N · S / W + 2 (N - 1) · L          (0 for N = 1)
    t_step(N)      = t_compute(b_N) + t_allreduce(N)
    throughput(N)  = N · p(b_N) / t_step(N)      p: predictions (chars or samples) per worker step
    speed-up(N)    = throughput(N) / throughput(1),  efficiency(N) = speed-up(N) / N

The projection assumes compute and communication do not overlap (the engine reduces
after the whole backward pass) and that every worker has a machine like this one.
Defaults: 10 Gb/s with 50 µs and 100 Gb/s with 5 µs. Tables go to stdout; ``--plot``
draws throughput and efficiency against N (matplotlib, the ``plot`` extra).
"""
from __future__ import annotations

import argparse
import json
import math
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

from engine import distributed as dist  # noqa: E402
from engine.backend import keep_freed_memory  # noqa: E402
from engine.common import PICTURE_SUFFIXES, output_problem  # noqa: E402
from engine.config import ConfigError, Phase, load_job  # noqa: E402


class Share(dist.World):
    """Worker 0 of ``size`` workers, alone: it reads its share of every batch and its
    collectives are the identity (the compute of one worker, without the reduction)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size


def worker_counts(B: int, most: int, mode: str) -> list[int]:
    if mode == "weak":
        return [2 ** k for k in range(int(math.log2(most)) + 1)]
    return [n for n in range(1, min(B, most) + 1) if B % n == 0]


def compute_time(job_path: str, workers: int, steps: int, warmup: int, tmp: pathlib.Path,
                 weak: bool, threads: int | None) -> dict:
    """Median seconds of one worker's training step at its share of the batch, measured in
    a process of its own (with ``threads`` BLAS threads when given)."""
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in dist.THREAD_VARS})
    cmd = [sys.executable, "-m", "bench.scaling", job_path, "--compute-child",
           str(1 if weak else workers), "--steps", str(steps), "--warmup", str(warmup),
           "--json", str(tmp / f"compute{workers}.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"compute child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads((tmp / f"compute{workers}.json").read_text())


def compute_child(job_path: str, workers: int, steps: int, warmup: int, out: str) -> None:
    from engine.train import Trainer, build_parser  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        args = build_parser().parse_args([job_path, "--workspace", str(pathlib.Path(d) / "ws"),
                                          "--steps", str(steps + warmup)])
        t = Trainer(load_job(job_path), job_path, args, world=Share(workers))
        t.build()
        res = _time_steps(t, steps, warmup)
    pathlib.Path(out).write_text(json.dumps(res))


def _time_steps(t, steps: int, warmup: int) -> dict:
    w = t.workers[Phase.TRAIN]
    times, preds = [], 0.0
    for k in range(steps + warmup):
        t0 = time.perf_counter()
        m = t.train_step(w)
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
            preds = (m or {}).get("loss", [0, 0])[1] or preds
    return {"rows": w.batchsize, "seconds": statistics.median(times), "preds": preds,
            "text": any(lay.text for lay in t.main.inputs), "grad_bytes": t.main.grads.nbytes}


def allreduce_local(nbytes: int) -> dict | None:
    """Median seconds of an in-place Allreduce of ``nbytes`` float32 between 2 local ranks."""
    if dist.find_mpiexec() is None:
        return None
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        return None
    r = subprocess.run([dist.find_mpiexec(), "-n", "2", sys.executable, "-m", "bench.scaling",
                        "--allreduce-child", str(nbytes)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"allreduce child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def allreduce_child(nbytes: int) -> None:
    from mpi4py import MPI  # noqa: PLC0415

    comm = MPI.COMM_WORLD
    a = np.ones(max(1, nbytes // 4), np.float32)
    times = []
    for k in range(55):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, a)
        dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if k >= 5:
            times.append(dt)
    if comm.rank == 0:
        print(json.dumps({"bytes": int(a.nbytes), "seconds": statistics.median(times),
                          "min": min(times), "max": max(times)}))


def local_pairs(job_path: str, pairs: int, steps: int, tmp: pathlib.Path) -> dict:
    """One worker with 2 BLAS threads against two workers with 1 thread each, alternating."""
    from google.protobuf import text_format  # noqa: PLC0415

    job = load_job(job_path)
    job.disp_freq = steps // 2
    job.validate_freq = job.test_freq = 0
    job.validate_steps = job.test_steps = 0
    job.checkpoint_freq = 0
    job.train_steps = steps
    src = tmp / "local.conf"
    src.write_text(text_format.MessageToString(job))
    out = {"one_2threads": [], "two_1thread": [], "allreduce_ms": [], "step_ms_two": []}
    env0 = {k: v for k, v in os.environ.items() if k not in dist.THREAD_VARS}
    for k in range(pairs):
        for kind in ("one_2threads", "two_1thread"):
            ws = tmp / f"local-{kind}-{k}"
            threads = "2" if kind == "one_2threads" else "1"
            env = dict(env0, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
                       MKL_NUM_THREADS=threads)
            cmd = [sys.executable, "-m", "engine.train", str(src), "--workspace", str(ws)]
            if kind == "two_1thread":
                cmd += ["--workers", "2"]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                               timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"{kind}: {r.stderr.strip()}")
            recs = [json.loads(x) for x in (ws / "metrics.jsonl").read_text().splitlines()]
            last = [x for x in recs if x["phase"] == "train"][-1]
            out[kind].append(next(v for key, v in last.items() if key.endswith("_per_s")))
            for line in r.stdout.splitlines():
                if line.startswith("allreduce:"):
                    # "allreduce: X ms per step on rank 0, Y% of its Z ms training step"
                    parts = line.split()
                    out["allreduce_ms"].append(float(parts[1]))
                    out["step_ms_two"].append(float(parts[-4]))
    return out


def project(compute: dict, nbytes: int, networks: list[tuple[float, float]]) -> list[dict]:
    rows = []
    base = None
    for n, c in sorted(compute.items()):
        for gbps, lat_us in networks:
            bw = gbps * 1e9 / 8
            ar = 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat_us * 1e-6
            step = c["seconds"] + ar
            thr = n * c["preds"] / step
            rows.append({"workers": n, "network": f"{gbps:g} Gb/s, {lat_us:g} us",
                         "rows_per_worker": c["rows"], "compute_ms": 1e3 * c["seconds"],
                         "allreduce_ms": 1e3 * ar, "step_ms": 1e3 * step, "throughput": thr})
    for r in rows:
        if r["workers"] == 1:
            base = r["throughput"]
    for r in rows:
        r["speedup"] = r["throughput"] / base
        r["efficiency"] = r["speedup"] / r["workers"]
    return rows


def plot(rows: list[dict], path: str, unit: str, title: str) -> str:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'rnn-engine[plot]')"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    nets = sorted({r["network"] for r in rows}, key=lambda s: float(s.split()[0]))
    for net in nets:
        rs = [r for r in rows if r["network"] == net]
        ns = [r["workers"] for r in rs]
        a.plot(ns, [r["throughput"] for r in rs], "o-", label=net)
        b.plot(ns, [r["efficiency"] for r in rs], "o-", label=net)
    rs = [r for r in rows if r["network"] == nets[0]]
    base = next(r["throughput"] for r in rs if r["workers"] == 1)
    a.plot([r["workers"] for r in rs], [base * r["workers"] for r in rs], "k:", label="ideal")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers N")
        ax.grid(True, alpha=0.3)
        ax.legend()
    a.set_yscale("log")
    a.set_ylabel(f"{unit}/s")
    b.set_ylabel("efficiency (speed-up / N)")
    b.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot {path}"


def network(text: str) -> tuple[float, float]:
    """GBPS:LATENCY_US: a bandwidth > 0 and a latency >= 0, both finite."""
    try:
        gbps, lat = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give GBPS:LATENCY_US, e.g. 10:50") from None
    if not (math.isfinite(gbps) and gbps > 0 and math.isfinite(lat) and lat >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the bandwidth must be a finite number of "
                                         f"Gb/s above 0 and the latency a finite number of "
                                         f"µs >= 0, e.g. 10:50")
    return gbps, lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("job", nargs="?")
    ap.add_argument("--max-workers", type=int, default=64)
    ap.add_argument("--mode", choices=["strong", "weak"], default="strong")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--network", type=network, action="append",
                    help="bandwidth in Gb/s and latency in µs, e.g. 10:50 (repeatable)")
    ap.add_argument("--local-pairs", type=int, default=0)
    ap.add_argument("--local-steps", type=int, default=40)
    ap.add_argument("--plot")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int,
                    help="BLAS threads of the compute measurement (default: as the environment)")
    ap.add_argument("--allreduce-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--compute-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.allreduce_child is not None:
        allreduce_child(a.allreduce_child)
        return 0
    if a.compute_child is not None:
        keep_freed_memory()
        np.seterr(over="ignore", invalid="ignore", divide="ignore")
        compute_child(a.job, a.compute_child, a.steps, a.warmup, a.json)
        return 0
    if not a.job:
        ap.error("give a job file")
    if a.steps < 1 or a.warmup < 0 or a.max_workers < 1 or a.local_steps < 4:
        print("error: --steps and --max-workers must be >= 1, --warmup >= 0, --local-steps >= 4",
              file=sys.stderr)
        return 2
    bad = ((a.json and output_problem(a.json, "--json"))
           or (a.plot and output_problem(a.plot, "--plot", PICTURE_SUFFIXES)))
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    networks = a.network or [(10.0, 50.0), (100.0, 5.0)]
    keep_freed_memory()
    np.seterr(over="ignore", invalid="ignore", divide="ignore")
    try:
        load_job(a.job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"job {a.job}; {os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; mode {a.mode}; compute with "
          f"{a.threads or os.environ.get('OPENBLAS_NUM_THREADS') or 'default'} BLAS threads")
    result: dict = {"job": a.job, "mode": a.mode, "load": load}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        first = compute_time(a.job, 1, a.steps, a.warmup, tmp, True, a.threads)
        B = first["rows"]
        unit = "chars" if first["text"] else "samples"
        compute = {}
        for n in worker_counts(B, a.max_workers, a.mode):
            c = first if n == 1 or a.mode == "weak" else compute_time(
                a.job, n, a.steps, a.warmup, tmp, False, a.threads)
            compute[n] = c
            if a.mode == "weak" and n > 1:
                continue
            print(f"compute  N={n:<3} {c['rows']:>4} rows/worker  {1e3 * c['seconds']:8.2f} ms "
                  f"per step  ({c['preds']:g} {unit} per worker step)")
        S = first["grad_bytes"]
        ar = allreduce_local(S)
        result.update(compute={str(k): v for k, v in compute.items()}, grad_bytes=S,
                      allreduce_local=ar)
        if ar is None:
            print(f"gradients {S / 1e6:.3f} MB; local Allreduce not measured: {dist.INSTALL}")
        else:
            print(f"gradients {S / 1e6:.3f} MB; Allreduce between 2 local ranks "
                  f"{1e3 * ar['seconds']:.3f} ms (median of 50; {1e3 * ar['min']:.3f}-"
                  f"{1e3 * ar['max']:.3f})")
        if a.local_pairs > 0:
            if ar is None:
                print("local comparison skipped: no MPI")
            else:
                lp = local_pairs(a.job, a.local_pairs, a.local_steps, tmp)
                result["local"] = lp
                one, two = lp["one_2threads"], lp["two_1thread"]
                print(f"local, {a.local_pairs} alternating pairs of {a.local_steps}-step runs "
                      f"({unit}/s of the second half; median, min-max):")
                print(f"  1 worker x 2 BLAS threads  {statistics.median(one):10,.0f}  "
                      f"({min(one):,.0f}-{max(one):,.0f})")
                print(f"  2 workers x 1 BLAS thread  {statistics.median(two):10,.0f}  "
                      f"({min(two):,.0f}-{max(two):,.0f})  ratio "
                      f"{statistics.median(t / o for t, o in zip(two, one)):.2f}")
                if lp["allreduce_ms"]:
                    arm, stm = statistics.median(lp["allreduce_ms"]), statistics.median(lp["step_ms_two"])
                    print(f"  Allreduce {arm:.3f} ms per step ({100 * arm / stm:.1f}% of the "
                          f"{stm:.1f} ms step, rank 0, waiting for the other rank included)")
    rows = project(compute, S, networks)
    result["projection"] = rows
    for net in dict.fromkeys(r["network"] for r in rows):
        print(f"\nprojection, ring Allreduce over {net}:")
        print(f"{'N':>4} {'rows/w':>7} {'compute ms':>11} {'allreduce ms':>13} {'step ms':>9} "
              f"{unit + '/s':>13} {'speed-up':>9} {'efficiency':>11}")
        for r in rows:
            if r["network"] == net:
                print(f"{r['workers']:>4} {r['rows_per_worker']:>7} {r['compute_ms']:>11.2f} "
                      f"{r['allreduce_ms']:>13.3f} {r['step_ms']:>9.2f} {r['throughput']:>13,.0f} "
                      f"{r['speedup']:>9.2f} {r['efficiency']:>11.2f}")
    if a.plot:
        print(plot(rows, a.plot, unit, f"{pathlib.Path(a.job).name}: {a.mode} scaling, "
                                       f"gradients {S / 1e6:.2f} MB"))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
