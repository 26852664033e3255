"""``python -m engine.train JOB [--workspace DIR] [--steps N] [--gpu ID] [--resume] ...``

Trains (and validates / tests) as the job says; writes the unrolled graphs to
``<workspace>/visualization/``, metrics to ``<workspace>/metrics.jsonl`` and
checkpoints to ``<workspace>/checkpoints/``. A job with ``train_steps: 0`` and
``test_steps`` runs only its test phase (SINGA's way of sampling with a
sample job and ``checkpoint_path``).

Exit status: 0 done, 2 bad job/input (one line on stderr, ``--debug`` for the
traceback), 1 the run failed (non-finite numbers, ...), 130/143 stopped by
SIGINT/SIGTERM after writing a checkpoint.

Several workers (``--workers N``, ``cluster { nworker_groups: N }``, or started by
``mpiexec -n N``) train one job data-parallel: see engine/distributed.py. Rank 0
prints, logs, plots and checkpoints; the update step (``Trainer.train_step``) is the
same on every worker.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import traceback

import numpy as np
from google.protobuf import text_format

from engine import checkpoint as ckpt
from engine import distributed as dist
from engine import interop
from engine.backend import BackendError, device_of, keep_freed_memory, make_backend
from engine.config import ConfigError, Phase, job_dir, load_job
from engine.layers.input import resolve_path
from engine.net import Net
from engine.planner import NotPlannable, make_worker
from engine.plot import PlotUnavailable, plot_metrics
from engine.proto import job_pb2 as pb
from engine.metrics import MetricsLog, Progress, derived_metrics, fmt_metrics, fmt_time, merge_metrics
from engine.workspace import (ensure_workspace, job_alg, load_params, net_info, param_arrays,
                              phases_of, workspace_of, write_graphs)
from engine.layers import LayerError
from engine.unroll import unroll
from engine.updaters import Updater, UpdaterError, describe, global_grad_norm
from engine.worker import ContinuityError


class RunError(Exception):
    """The run cannot go on (message is one line). Raised alike on every worker (it is
    decided on numbers all workers share), so rank 0 alone reports it."""


class Stop(Exception):
    def __init__(self, signum):
        self.signum = signum


class Trainer:
    """The job loop: train steps, displays, evaluations, checkpoints."""

    def __init__(self, job: pb.JobProto, path: str, args, world: dist.World | None = None):
        self.job, self.path, self.args = job, path, args
        #: the workers this one trains with (engine/distributed.py); one by default
        self.world = world or dist.World()
        self.ws = workspace_of(job, args.workspace)
        ensure_workspace(self.ws)
        self.seed = args.seed if args.seed is not None else job.seed
        self.train_steps = args.steps if args.steps is not None else job.train_steps
        if self.train_steps != job.train_steps:
            job.train_steps = self.train_steps
        gpu = device_of(args.cpu, args.gpu, job.gpu)
        if gpu is not None:
            gpu += self.world.local_rank  # workers on one machine take consecutive GPUs
        dtype = np.float64 if args.dtype == "float64" else np.float32
        self.backend = make_backend(gpu, dtype)
        self.cpu_note = (f"--cpu: the job's gpu {', '.join(map(str, job.gpu))} is not used"
                         if args.cpu and job.gpu else "")
        self.phases = phases_of(job)
        if self.world.leads:
            self.unrolled = write_graphs(job, path, self.ws, self.phases)
        else:
            self.unrolled = {ph: unroll(job.neuralnet, ph, job.name, where=str(path))
                             for ph in self.phases}
        self.out = sys.stdout
        self.log = MetricsLog(self.ws / "metrics.jsonl")
        self.ckpt_dir = self.ws / "checkpoints"
        self.stop_signal = None
        #: a stop request any worker got, agreed over all of them after each step
        self.stop_agreed = None
        self.progress = None

    # ----------------------------------------------------------- building
    def build(self) -> None:
        job = self.job
        vocab, encoding = None, None
        init_arrays = None
        torch_files = []  # PyTorch's layout: mapped onto the net once it is built
        if job.checkpoint_path:
            init_arrays = {}
            for cp in job.checkpoint_path:
                path = resolve_path(cp, {"job_dir": str(job_dir(self.path))})
                if interop.is_torch_file(path):
                    torch_files.append(path)
                    continue
                arrays, meta = ckpt.load_any(path)  # this engine's .npz or SINGA's BlobProtos
                init_arrays.update(arrays)
                if not vocab and meta.get("vocab"):
                    vocab, encoding = meta["vocab"], meta.get("encoding")
        self.resume_from = None
        resume = self.args.resume or job.resume
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if existing and not resume and job.train_steps > 0:
            raise ConfigError(f"{self.ckpt_dir} already holds checkpoints (newest: step "
                              f"{existing[-1][0]}); continue with --resume, or start over in "
                              f"another --workspace (nothing was overwritten)")
        if not resume and self.world.leads:
            self.log.truncate_after(-1)
        if resume:
            found = ckpt.newest_valid(self.ckpt_dir, warn=self.say)
            if found is None:
                self.say(f"no valid checkpoint in {self.ckpt_dir}; starting from step 0")
            else:
                self.resume_from = found
                if found[2].get("vocab"):
                    vocab, encoding = found[2]["vocab"], found[2].get("encoding")
        info = net_info(self.path, self.ws, self.seed, vocab, encoding, job_alg(job))
        if not self.world.leads:
            del info["workspace"]  # only rank 0 writes into the workspace (vocab.txt)
        carry = job.train_one_batch.state_carry
        self.debug = bool(self.args.debug or job.debug)
        executor = self.args.executor or ("reference" if self.debug else "auto")
        self.nets, self.workers = {}, {}
        main = None
        for ph in self.phases:
            net = Net(self.unrolled[ph], self.backend, info if main is None else dict(info),
                      seed=self.seed, where=self.path)
            if main is None:
                main = net
                info = net.info
            else:
                net.share_params_from(main)
            self.take_shares(net)
            self.nets[ph] = net
            self.workers[ph], note = make_worker(
                net, dist.rank_seed(self.seed, self.world.rank, self.world.size), carry, executor)
            if ph == self.phases[0]:
                self.executor_note = note
        self.main = main
        self.vocab = main.info.get("vocab")
        self.encoding = main.info.get("encoding", "utf-8")  # the unit of the vocabulary
        if init_arrays is not None:
            for path in torch_files:
                init_arrays.update(interop.load_torch_file(main, path))
            load_params(main, init_arrays, ", ".join(job.checkpoint_path))
        self.updater = None
        if Phase.TRAIN in self.nets:
            self.updater = Updater(job.updater, main.params, self.backend.xp)
        self.step = 0
        if self.resume_from is not None:
            p, arrays, meta = self.resume_from
            self._restore(p, arrays, meta)

    def take_shares(self, net: Net) -> None:
        """Each input layer of ``net`` delivers only this worker's share of its batches
        (nothing to do for one worker)."""
        if self.world.size > 1:
            for lay in net.inputs:
                lay.take_share(self.world.rank, self.world.size)

    # -------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Write step<N>.npz (every worker takes part: rank 0 gathers the carried state of
        the whole batch and writes); returns its path on rank 0, "" on the others."""
        w = self.workers[Phase.TRAIN]
        ws = self.world.gather_worker_state(w.state_dict())
        if not self.world.leads:
            return ""
        arrays = param_arrays(self.main)
        for k, v in self.updater.state_dict().items():
            arrays[f"updater/{k}"] = v
        arrays.update({f"worker/{k}": v for k, v in ws["arrays"].items()})
        meta = {"step": self.step, "job": text_format.MessageToString(self.job),
                "job_path": str(self.path), "vocab": self.vocab, "encoding": self.encoding,
                "seed": self.seed, "worker": ws["meta"], "workers": self.world.size,
                "time": time.time()}
        path = ckpt.save(self.ckpt_dir / f"step{self.step}.npz", arrays, meta)
        ckpt.prune(self.ckpt_dir, self.job.keep_checkpoints, protect=path)
        return str(path)

    def _restore(self, path, arrays, meta) -> None:
        load_params(self.main, arrays, str(path))
        if self.updater is not None:
            self.updater.load_state_dict({k[8:]: v for k, v in arrays.items()
                                          if k.startswith("updater/")})
        w = self.workers.get(Phase.TRAIN)
        if w is not None:
            try:
                mine = self.world.share_worker_state(
                    {k[7:]: v for k, v in arrays.items() if k.startswith("worker/")},
                    meta.get("worker", {}))
            except dist.DistributedError as e:
                raise ckpt.CheckpointError(f"{path}: {e}; resume with a number of workers "
                                           f"that divides them") from None
            w.load_state_dict(*mine)
        self.step = int(meta["step"])
        if self.world.leads:
            self.log.truncate_after(self.step)
        self.say(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ running
    def say(self, msg: str) -> None:
        """Print a line (rank 0 only)."""
        if not self.world.leads:
            return
        if self.progress is not None:
            self.progress.clear()
        print(msg, file=self.out, flush=True)

    def log_record(self, record: dict) -> None:
        """Append to metrics.jsonl (rank 0 only)."""
        if self.world.leads:
            self.log.write(record)

    def banner(self) -> None:
        job, main = self.job, self.main
        self.say(f"job {job.name or '(unnamed)'}: {self.path}")
        self.say(f"workspace {self.ws}  backend {self.backend.describe()}  seed {self.seed}")
        if self.cpu_note:
            self.say(self.cpu_note)
        if self.world.size > 1:
            w = self.workers[self.phases[0]]
            self.say(f"data parallel: {self.world.describe()}, {w.batchsize} rows each of every "
                     f"batch; gradients {main.grads.nbytes / 1e6:.2f} MB in one Allreduce per step")
        for line in main.info.get("notes", []):
            self.say(line)
        g = self.unrolled[self.phases[0]].graph
        self.say(f"unrolled {self.phases[0].label} net: {g.number_of_nodes()} nodes, "
                 f"{g.number_of_edges()} edges, {main.param_count():,} params")
        for line in main.describe():
            self.say(line)
        self.say(self.executor_note)
        note = self.state_note()
        if note:
            self.say(note)
        if self.updater is not None:
            self.say(f"updater {describe(job.updater)}")

    def state_note(self) -> str:
        """For a net with recurrent layers: how the state passes from batch to batch, and
        the setting that gives SINGA v0.3's behaviour (every batch starts from zeros)."""
        if Phase.TRAIN not in self.workers or not any(
                lay.recurrent for lay in self.main.layers.values()):
            return ""
        policy = self.workers[Phase.TRAIN].policy
        if policy == pb.kResetBatch:
            return "state between batches: every batch starts from zeros (as SINGA v0.3)"
        how = {pb.kCarry: "carried (kCarry)",
               pb.kResetBoundary: "carried, reset where the data starts new sequences or a "
                                  "stream wraps (kResetBoundary)"}.get(policy, "carried")
        auto = " by default for text streams" if \
            self.job.train_one_batch.state_carry == pb.kCarryAuto else ""
        return (f"state between batches: {how}{auto}; SINGA v0.3 starts every batch from "
                f"zeros: train_one_batch {{ state_carry: kResetBatch }} does that")

    def check_same_params(self, when: str) -> None:
        """RunError on every worker when their params are not bitwise equal (several workers)."""
        bad = self.world.same_params(self.main.params)
        if bad is not None:
            raise RunError(f"{when}, the params of worker {bad} differ from worker 0's; the "
                           f"workers must run the same code, job and data")

    def evaluate(self, ph: Phase, steps: int) -> dict:
        w = self.workers[ph]
        w.reset()  # every evaluation reads the same batches from the same state
        t0 = time.time()
        vals = self._measure(w, steps)
        self.log_record({"step": self.step, "phase": ph.label, **vals,
                         "seconds": round(time.time() - t0, 3)})
        self.say(f"step {self.step:>6}  {ph.label:<5} {fmt_metrics(vals)}")
        return vals

    def diagnose(self, w, snap) -> str:
        """Where a batch went non-finite: the first unrolled node whose output is not
        finite; else the batch is run again from ``snap`` (same data, same params) noting
        the first node whose incoming gradient is not finite; else the first param whose
        gradient is not finite. With several workers each looks at its own share (no
        collective inside) and rank 0 names the first worker that found a node or param."""
        where = self._diagnose_share(w, snap)
        if self.world.size == 1:
            return where
        every = self.world.gather(where)
        if every is None:
            return ""
        found = [(r, x) for r, x in enumerate(every) if x != self.NO_CULPRIT]
        r, x = found[0] if found else (0, every[0])
        return f"worker {r}: {x}"

    NO_CULPRIT = "every output is finite but the loss overflowed"

    def _diagnose_share(self, w, snap) -> str:
        node = w.first_nonfinite_output()
        if node is not None:
            return f"first non-finite output at {node}"
        w.restore(snap)
        w.probe, w.first_bad_grad = True, None
        try:
            w.run_batch(train=True)
        finally:
            w.probe = False
        if w.first_bad_grad is not None:
            return f"outputs finite; first non-finite gradient arriving at {w.first_bad_grad}"
        bad_p = [p.name for p in self.main.params if not bool(self.backend.xp.isfinite(p.grad).all())]
        if bad_p:
            return f"outputs and their gradients finite; first non-finite gradient in param {bad_p[0]}"
        return self.NO_CULPRIT

    def _due_next(self, freq: int, after: int) -> bool:
        """Will the step about to run (number self.step + 1) be a due step?"""
        n = self.step + 1
        return freq > 0 and n % freq == 0 and n > after

    def dump_debug(self, w) -> None:
        """visualization/debug_step<N>.json: per-node output/gradient and per-param statistics
        (rank 0's share of the batch when several workers train)."""
        if not self.world.leads:
            return
        path = self.ws / "visualization" / f"debug_step{self.step + 1}.json"
        path.write_text(json.dumps({"step": self.step + 1, "nodes": w.node_stats,
                                    "params": w.param_stats}, indent=1))
        self.say(f"debug statistics {path} (draw them: python tools/graph.py "
                 f"{self.ws / 'visualization' / 'train_net.json'} net.svg --stats {path})")

    def _measure(self, w, steps: int) -> dict:
        """Forward ``steps`` batches without training; the derived metrics over all of them
        (and over every worker's share)."""
        total: dict = {}
        for _ in range(steps):
            merge_metrics(total, w.run_batch(train=False))
        total, _ = self.world.reduce_metrics(total)
        return derived_metrics(total, w.net)

    def _due(self, freq: int, after: int) -> bool:
        return freq > 0 and self.step % freq == 0 and self.step > after

    def train_step(self, w) -> dict | None:
        """One training step, the worker's update step, the same on every worker: load
        this worker's share of the batch, forward, backward (``w.run_batch``); combine the
        gradients (one Allreduce of the gradient buffer: the whole batch's gradient) and
        the metrics and stop requests (one small sum) over the workers; then the
        non-finite check, clipping and the update, on numbers every worker shares.
        Returns the batch's metrics, or None when it was skipped (skip_nonfinite)."""
        job = self.job
        dump = self.debug and (
            self._due_next(job.disp_freq, job.disp_after) or self.step + 1 == self.train_steps)
        w.record = dump
        snap = w.snapshot()
        metrics = w.run_batch(train=True)
        self.world.allreduce_grads(self.main.grads)
        metrics, self.stop_agreed = self.world.reduce_metrics(metrics, self.stop_signal)
        if dump:
            w.record = False
            self.dump_debug(w)
        loss = metrics.get("loss", [0.0, 1.0])
        xp = self.backend.xp
        norm = global_grad_norm(self.main.params, xp)  # finite norm: every gradient finite
        bad = not math.isfinite(loss[0]) or (not math.isfinite(norm) and not all(
            bool(xp.isfinite(p.grad).all()) for p in self.main.params))
        if bad:
            where = self.diagnose(w, snap)
            msg = f"step {self.step + 1}: non-finite loss or gradient; {where}"
            if job.skip_nonfinite:
                self.say(f"warning: {msg}; batch skipped (skip_nonfinite)")
                self.step += 1
                return None
            raise RunError(msg + "; lower the learning rate or clip gradients (the last good "
                                 "checkpoint is kept)")
        stats = self.updater.update(self.step, grad_norm=norm)
        self.lr = stats["lr"]
        self.step += 1
        return metrics

    def _stop_requested(self):
        """The signal to stop on, if any: this process's own with one worker, else the
        request agreed over all workers after the last step."""
        return self.stop_signal if self.world.size == 1 else self.stop_agreed

    def run(self) -> int:
        job = self.job
        self.banner()
        self.check_same_params("at start-up")
        if Phase.TRAIN not in self.nets:
            return self.run_test_only()
        w = self.workers[Phase.TRAIN]
        total, t_disp, n_disp = {}, time.time(), 0
        t_start = time.time()
        steps_start, reduce_s0, step_s = self.step, 0.0, 0.0
        self.progress = Progress(self.train_steps, self.step) if self.world.leads else None
        self.lr = 0.0
        preds_per_batch = None
        while self.step < self.train_steps:
            stop = self._stop_requested()
            if stop is not None:
                raise Stop(stop)
            t_step = time.perf_counter()
            metrics = self.train_step(w)
            step_s += time.perf_counter() - t_step
            if metrics is None:
                continue
            lr = self.lr
            merge_metrics(total, metrics)
            n_disp += 1
            if preds_per_batch is None:
                preds_per_batch = metrics.get("loss", [0.0, 1.0])[1]
            if self.progress is not None:
                self.progress.update(self.step)
            if self._due(job.disp_freq, job.disp_after) or self.step == self.train_steps:
                dt = max(1e-9, time.time() - t_disp)
                vals = derived_metrics(total, self.main)
                rate = n_disp * (preds_per_batch or 0) / dt
                unit = "chars" if "bpc" in vals else "samples"
                extra = {}
                if self.world.size > 1:
                    spent = self.world.allreduce_seconds - reduce_s0
                    extra["allreduce_ms"] = round(1000 * spent / n_disp, 3)
                    reduce_s0 = self.world.allreduce_seconds
                self.log_record({"step": self.step, "phase": "train", **vals, "lr": lr,
                                 f"{unit}_per_s": round(rate, 1), **extra,
                                 "elapsed": round(time.time() - t_start, 3)})
                self.say(f"step {self.step:>6}  train {fmt_metrics(vals)}  lr {lr:.4g}  "
                         f"{rate:,.0f} {unit}/s  {fmt_time(time.time() - t_start)}")
                total, t_disp, n_disp = {}, time.time(), 0
                if self.debug:
                    self.check_same_params(f"at step {self.step}")
            if Phase.VAL in self.workers and (self._due(job.validate_freq, job.validate_after)
                                              or self.step == self.train_steps):
                self.evaluate(Phase.VAL, job.validate_steps)
            if Phase.TEST in self.workers and (self._due(job.test_freq, job.test_after)
                                               or self.step == self.train_steps):
                self.evaluate(Phase.TEST, job.test_steps)
            if self._due(job.checkpoint_freq, job.checkpoint_after) or \
                    self.step == self.train_steps:
                path = self.save_checkpoint()
                self.say(f"checkpoint {path}")
        if self.progress is not None:
            self.progress.clear()
        took = time.time() - t_start
        self.say(f"done: {self.step} steps in {fmt_time(took)}; checkpoints in {self.ckpt_dir}")
        if self.world.size > 1 and self.step > steps_start:
            n = self.step - steps_start
            self.say(f"allreduce: {1000 * self.world.allreduce_seconds / n:.3f} ms per step "
                     f"on rank 0, {100 * self.world.allreduce_seconds / max(1e-9, step_s):.1f}% "
                     f"of its {1000 * step_s / n:.1f} ms training step")
        self.plot()
        return 0

    def plot(self) -> None:
        if not self.world.leads:
            return
        try:
            self.say(f"plot {plot_metrics(self.ws)}")
        except PlotUnavailable as e:
            self.say(f"note: no plot: {e}")

    def run_test_only(self) -> int:
        ph = Phase.TEST if Phase.TEST in self.workers else self.phases[0]
        steps = self.job.test_steps or 1
        w = self.workers[ph]
        vals = self._measure(w, steps)
        if vals:
            self.log_record({"step": self.step, "phase": ph.label, **vals})
            self.say(f"{ph.label}: {fmt_metrics(vals)}")
        for lay in w.net.layers.values():
            text = lay.report()
            if text:
                self.say(f"--- text written by layer {lay.name} ---")
                self.say(text)
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Train (and validate / test) a job file; writes graphs, metrics and "
                    "checkpoints to the job's workspace.")
    ap.add_argument("job", help="job file (protobuf text format)")
    ap.add_argument("--workspace", help="output folder (default: the job's cluster.workspace)")
    ap.add_argument("--steps", type=int, help="override train_steps")
    ap.add_argument("--gpu", type=int, help="train on this GPU (CuPy)")
    ap.add_argument("--cpu", action="store_true",
                    help="train on the CPU (NumPy) even when the job names a GPU (gpu: 0)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    ap.add_argument("--seed", type=int, help="override the job's seed")
    ap.add_argument("--graph-only", action="store_true",
                    help="only write visualization/<phase>_net.json and stop")
    ap.add_argument("--executor", choices=["auto", "planned", "reference"],
                    help="auto (default): the planned executor when the net fits, else node by "
                         "node; --debug defaults to reference")
    ap.add_argument("--debug", action="store_true",
                    help="show tracebacks; run the reference (node-by-node) executor")
    ap.add_argument("--workers", type=int,
                    help="train data-parallel on N workers (MPI ranks; overrides the job's "
                         "cluster.nworker_groups x nworkers_per_group)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="training precision; float64 is for tests and checks (default float32)")
    return ap


# ------------------------------------------------------------------ workers
class WorkersFailed(Exception):
    """Another worker failed to start; every worker knows (exit status, line)."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code, self.line = code, line


def start_workers(args, argv: list[str]):
    """The World this process trains in, or an exit status when this process is done:
    outside mpiexec, more than one worker asked for (``--workers`` or the job's cluster)
    launches them (engine/distributed.py) and returns their exit status; under mpiexec,
    this rank's World. A problem is one line ``error: ...`` (rank 0 only), status 2."""
    env = dist.launcher_env()
    try:
        if env is None and not args.graph_only:
            n = dist.workers_wanted(args.workers, load_job(args.job))
            if n > 1:
                return dist.launch(argv, n)
        return dist.join()
    except (ConfigError, dist.DistributedError) as e:
        if env is None or env[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


def failure(e: Exception, args) -> tuple[int, str]:
    """(exit status, one line) for an exception that ends a run."""
    if isinstance(e, (ConfigError, BackendError, ckpt.CheckpointError, dist.DistributedError)):
        return 2, str(e)
    if isinstance(e, NotPlannable):
        return 2, f"--executor planned: {e}; use --executor auto"
    if isinstance(e, (RunError, ContinuityError)):
        return 1, str(e)
    if isinstance(e, (LayerError, UpdaterError)):
        return 2, f"{args.job}: {e}"
    return 1, f"{type(e).__name__}: {e} (run with --debug for the traceback)"


def report_failure(world: dist.World, started: bool, e: Exception, args) -> int:
    """Report ``e`` and return the exit status. One worker: its line. Several: before
    training started, every worker agrees on the first failing one's line (rank 0
    prints it: a bad job is one line, status 2, on every worker alike); a failure every
    worker shares (RunError, WorkersFailed) is printed by rank 0; any other failure of
    one worker prints its line, naming it, and aborts every worker with status 1
    (MPI_Abort) so none waits for it forever."""
    if isinstance(e, WorkersFailed):
        code, line = e.code, e.line
    else:
        if args.debug:
            traceback.print_exc()
        code, line = failure(e, args)
    if world.size == 1:
        print(f"error: {line}", file=sys.stderr)
        return code
    if not started:
        code, line = world.agree((code, line))
    elif not isinstance(e, (RunError, WorkersFailed)):
        world.fail(line)  # ends every worker
    if world.leads:
        print(f"error: {line}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    world = start_workers(args, argv)
    if isinstance(world, int):
        return world
    trainer = None
    started = False
    try:
        job = load_job(args.job)
        if args.graph_only:
            if world.leads:
                ws = workspace_of(job, args.workspace)
                ensure_workspace(ws)
                for ph, u in write_graphs(job, args.job, ws, phases_of(job)).items():
                    g = u.graph
                    print(f"wrote {ws / 'visualization' / (ph.label + '_net.json')} "
                          f"({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)")
            started = True
            world.agree(None)
            return 0
        dist.check_world(world, args.workers, job)
        trainer = Trainer(job, args.job, args, world)
        keep_freed_memory()  # reuse each batch's large temporaries (see engine/backend.py)

        def on_signal(signum, frame):
            trainer.stop_signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        # overflow is detected and reported by the loop itself, not by numpy warnings
        np.seterr(over="ignore", invalid="ignore", divide="ignore")
        try:
            trainer.build()
            started = True
            problem = world.agree(None)  # did every worker start? (one: it did)
            if problem is not None:
                raise WorkersFailed(*problem)
            return trainer.run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    except Stop as st:
        where = trainer.save_checkpoint() if trainer.updater is not None else "(nothing to save)"
        name = "SIGINT" if st.signum == signal.SIGINT else "SIGTERM"
        trainer.say(f"stopped by {name} at step {trainer.step}; checkpoint {where}; continue with "
                    f"--resume")
        return 130 if st.signum == signal.SIGINT else 143
    except Exception as e:  # noqa: BLE001 - every failure is one line (and its exit status)
        if args.debug and world.size == 1:
            raise
        return report_failure(world, started, e, args)


if __name__ == "__main__":
    sys.exit(main())
