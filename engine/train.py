"""``python -m engine.train JOB [--workspace DIR] [--steps N] [--gpu ID] [--resume] ...``

Trains (and validates / tests) as the job says; writes the unrolled graphs to
``<workspace>/visualization/``, metrics to ``<workspace>/metrics.jsonl`` and
checkpoints to ``<workspace>/checkpoints/``. A job with ``train_steps: 0`` and
``test_steps`` runs only its test phase (SINGA's way of sampling with a
sample job and ``checkpoint_path``).

Exit status: 0 done, 2 bad job/input or a workspace that cannot be used, found
before the first step (one line on stderr, ``--debug`` for the traceback), 1 the
run started and failed (non-finite numbers, a checkpoint or the metrics log could
not be written, ...), 130/143 stopped by SIGINT/SIGTERM (after writing a
checkpoint when steps had run since the last one).

Signals are handled from the first line below to the last save (engine/stopping.py).

Several workers (``--workers N``, ``cluster { nworker_groups: N }``, or started by
``mpiexec -n N``) train one job data-parallel: see engine/distributed.py. Rank 0
prints, logs, plots and checkpoints; the update step (``Trainer.train_step``) is the
same on every worker, and a stop signal is agreed over the workers after each step.
"""
from __future__ import annotations

import sys

from engine.stopping import StopSignals

# Before the imports below: a Ctrl-C while they load is one line, exit 130 (not a traceback).
_STOPS = StopSignals(sys.stdout).install() if __name__ == "__main__" else None

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np
from google.protobuf import text_format

from engine import checkpoint as ckpt
from engine import cli
from engine import distributed as dist
from engine import interop
from engine.backend import device_of, keep_freed_memory, make_backend
from engine.config import (ConfigError, Phase, check_trains, file_in_singa_syntax, job_dir,
                           layers_in_phase, load_job)
from engine.layers import kernels, layer_class
from engine.layers.base import InputLayer
from engine.layers.input import resolve_path
from engine.layers.recurrent import describe_cells
from engine.net import Net
from engine.planner import NotPlannable, make_worker
from engine.plot import PlotUnavailable, plot_metrics
from engine.proto import job_pb2 as pb
from engine.metrics import (MetricsError, MetricsLog, Progress, derived_metrics, fmt_metrics,
                            fmt_time, host_metrics, merge_metrics)
from engine.stopping import ABORT, DEFER, ForcedExit, Stop, exit_status, signal_name
from engine.workspace import (check_layout, ensure_workspace, job_alg, load_params,
                              lock_workspace, net_info, param_arrays, phases_of, workspace_of,
                              write_graphs)
from engine.unroll import unroll
from engine.updaters import Updater, describe, grad_norm_squared, learning_rate
from engine.worker import ContinuityError


class RunError(Exception):
    """The run cannot go on (message is one line). Raised alike on every worker (it is
    decided on numbers all workers share), so rank 0 alone reports it."""


def new_window() -> dict:
    """The display window being accumulated: metric sums ({name: [sum, count]}), the
    steps merged into them and the steps skipped (non-finite). Saved in checkpoints."""
    return {"total": {}, "steps": 0, "skipped": 0}


class Trainer:
    """The job loop: train steps, displays, evaluations, checkpoints."""

    def __init__(self, job: pb.JobProto, path: str, args, stops: StopSignals | None = None,
                 world: dist.World | None = None):
        # without ``stops`` (a Trainer used as a library) no signal handler is installed
        self.job, self.path, self.args = job, path, args
        self.stops = stops if stops is not None else StopSignals()
        #: the workers this one trains with (engine/distributed.py); one by default
        self.world = world or dist.World()
        #: a stop request any worker got, agreed over all of them after each step
        self.stop_agreed = None
        self.out = sys.stdout
        self.progress = None
        self.seed = args.seed if args.seed is not None else job.seed
        self.train_steps = args.steps if args.steps is not None else job.train_steps
        if self.train_steps != job.train_steps:
            job.train_steps = self.train_steps
            check_trains(job, path, f"--steps {self.train_steps}")
        gpu = device_of(args.cpu, args.gpu, job.gpu)
        if gpu is not None:
            gpu += self.world.local_rank  # workers on one machine take consecutive GPUs
        dtype = np.float64 if args.dtype == "float64" else np.float32
        self.backend = make_backend(gpu, dtype)
        self.cpu_note = (f"--cpu: the job's gpu {', '.join(map(str, job.gpu))} is not used"
                         if args.cpu and job.gpu else "")
        self.phases = phases_of(job)
        self.ws = workspace_of(job, args.workspace)
        self.ckpt_dir = self.ws / "checkpoints"
        self.log = MetricsLog(self.ws / "metrics.jsonl")
        self.lock = None
        self.updater = None
        self.step = 0
        self.saved_step = None  # the step of the newest checkpoint on disk (None: none)
        self.steps_run = 0  # training steps run by this process
        self.window = new_window()
        self.resume = bool(args.resume or job.resume)
        #: a job in SINGA's syntax also gets SINGA's checkpoint files (checkpoint/step<N>-worker0)
        self.singa_files = file_in_singa_syntax(path)
        precheck_inputs(job, path)   # what needs no graph first (a 100000-copy unroll)
        if self.world.leads:  # rank 0 alone takes and writes the workspace
            self.accept()
            self.unrolled = write_graphs(job, path, self.ws, self.phases)
        else:
            self.unrolled = {ph: unroll(job.neuralnet, ph, job.name, where=str(path))
                             for ph in self.phases}

    # ------------------------------------------------------- the workspace
    def accept(self) -> None:
        """Take the workspace, or refuse it, before anything in it changes: its exclusive
        lock (another run holding it is named), the kinds of its entries, and whether its
        checkpoints may be continued (``--resume``) or must be left alone. Then the
        temporary files that killed processes left are removed (and named)."""
        ensure_workspace(self.ws)
        self.lock = lock_workspace(self.ws)
        check_layout(self.ws)
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if existing and not self.resume and self.job.train_steps > 0:
            raise ConfigError(f"{self.ckpt_dir} already holds checkpoints (newest: step "
                              f"{existing[-1][0]}); continue with --resume, or start over in "
                              f"another --workspace (nothing was overwritten)")
        records = self.log.count()
        if records and not existing and not self.resume and self.job.train_steps > 0:
            raise ConfigError(f"{self.log.path} already holds {records} metrics record(s) of a "
                              f"run that wrote no checkpoint; continue with --resume (its "
                              f"records are kept), or start over in another --workspace "
                              f"(nothing was overwritten)")
        self.lock.stamp()   # accepted: the lock names this run
        for p in ckpt.remove_stale_temps(self.ws, self.ckpt_dir, self.ws / "visualization"):
            self.say(f"removed {p}, a temporary file of a process that no longer runs")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
                if not path.exists():
                    raise ConfigError(f"{self.path}: checkpoint_path {cp}: no such checkpoint; "
                                      f"the workspace {self.ws} holds "
                                      f"{ckpt.workspace_listing(self.ws)}")
                if interop.is_torch_file(path):
                    torch_files.append(path)
                    continue
                arrays, meta = ckpt.load_any(path)  # this engine's .npz or SINGA's BlobProtos
                init_arrays.update(arrays)
                if not vocab and ckpt.meta_vocab(path, meta):
                    vocab, encoding = meta["vocab"], meta.get("encoding")
        self.resume_from = None
        if self.resume:
            found = ckpt.newest_valid(self.ckpt_dir, warn=self.say, need=ckpt.RESUME_META)
            if found is None:
                self.say(f"no valid checkpoint in {self.ckpt_dir}; starting from step 0")
            else:
                self.resume_from = found
                if ckpt.meta_vocab(found[0], found[2]):
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
            fresh = load_params(main, init_arrays, ", ".join(job.checkpoint_path), partial=True)
            if fresh:
                self.say(f"warning: checkpoint_path {', '.join(job.checkpoint_path)} holds no "
                         f"{', '.join(fresh)}: initialised, not loaded (as SINGA does)")
        self.updater = None
        if Phase.TRAIN in self.nets:
            self.updater = Updater(job.updater, main.params, self.backend.xp)
        self.step = 0
        if self.resume_from is not None:
            p, arrays, meta = self.resume_from
            self._restore(p, arrays, meta)
        # the log holds what led to this step: newer records (of a run that went further
        # and was killed, or of one whose checkpoints are all invalid) are dropped. A job
        # that does not train (SINGA's sample.conf, in the training job's workspace) only
        # adds its record: the training run's log is not its own to shorten
        if self.world.leads and Phase.TRAIN in self.nets:
            self.log.truncate_after(self.step if self.resume else -1)

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
            self.saved_step = self.step  # rank 0 writes it
            return ""
        arrays = ckpt.join(param=param_arrays(self.main), updater=self.updater.state_dict(),
                           worker=ws["arrays"])
        meta = {"step": self.step, "job": text_format.MessageToString(self.job),
                "job_path": str(self.path), "vocab": self.vocab, "encoding": self.encoding,
                "seed": self.seed, "worker": ws["meta"], "workers": self.world.size,
                "time": time.time(), "batchsize": self.batch_rows(w),
                "display": {**self.window, "total": host_metrics(self.window["total"],
                                                                 self.backend.xp)}}
        path = ckpt.save(self.ckpt_dir / f"step{self.step}.npz", arrays, meta)
        if self.singa_files:   # SINGA's own file beside ours: what its sample.conf points at
            ckpt.save_singa(self.ws / "checkpoint" / f"step{self.step}-worker0",
                            ckpt.section(arrays, "param"), step=self.step)
        self.saved_step = self.step
        ckpt.prune(self.ckpt_dir, self.job.keep_checkpoints, protect=path)
        return str(path)

    def batch_rows(self, w) -> int:
        """Rows of the whole batch (every worker's share together)."""
        return w.batchsize * self.world.size

    def _restore(self, path, arrays, meta) -> None:
        self._check_batchsize(path, arrays, meta)
        load_params(self.main, arrays, str(path))
        if self.updater is not None:
            self.updater.load_state_dict(ckpt.section(arrays, "updater"))
        w = self.workers.get(Phase.TRAIN)
        if w is not None:
            try:
                mine = self.world.share_worker_state(ckpt.section(arrays, "worker"),
                                                     meta.get("worker", {}))
            except dist.DistributedError as e:
                raise ckpt.CheckpointError(f"{path}: {e}; resume with a number of workers "
                                           f"that divides them") from None
            w.load_state_dict(*mine)
        self.step = self.saved_step = int(meta["step"])
        window = meta.get("display")
        if isinstance(window, dict) and isinstance(window.get("total"), dict):
            self.window = window  # the display after the resume averages its whole window
        self.say(f"resumed from {path} at step {self.step}")

    def _check_batchsize(self, path, arrays, meta) -> None:
        """The carried state and the data cursors of a checkpoint hold one row per
        sequence of the batch: resuming needs the batch size it was written with (its
        meta says; older checkpoints: the rows of the carried state)."""
        w = self.workers.get(Phase.TRAIN)
        if w is None:
            return
        rows = meta.get("batchsize")
        if not isinstance(rows, int):
            rows = next((int(a.shape[0]) for k, a in sorted(ckpt.section(arrays, "worker").items())
                         if k.startswith("carry/") and a.ndim >= 1), None)
        if rows is not None and rows != self.batch_rows(w):
            raise ConfigError(f"{path}: the checkpoint was written with batch size {rows} and "
                              f"the job now has {self.batch_rows(w)}; --resume needs the batch size it "
                              f"was trained with (to start a new run from its params, give it "
                              f"as checkpoint_path in another --workspace)")

    # ------------------------------------------------------------ running
    def say(self, msg: str) -> None:
        """Print a line (rank 0 only). When the reader of stdout went away (``| head``),
        the run stops as on SIGTERM (at the end of the step, with a checkpoint; exit 141,
        128 + SIGPIPE) and what it has to say goes on to ``<workspace>/train.log``."""
        if not self.world.leads:
            return
        if self.progress is not None:
            self.progress.clear()
        try:
            print(msg, file=self.out, flush=True)
        except BrokenPipeError:
            self._stdout_closed()
            print(msg, file=self.out, flush=True)

    def _stdout_closed(self) -> None:
        """stdout's reader is gone: the rest of the narrative to train.log, stdout itself to
        /dev/null (so that no flush fails at exit), and a stop at the next safe point."""
        self.out = open(self.ws / "train.log", "a", encoding="utf-8")
        self.progress = None
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        self.stops.stream = self.out
        if self.stops.pending is None:
            self.stops.pending = signal.SIGPIPE

    def log_record(self, record: dict) -> None:
        """Append to metrics.jsonl (rank 0 only)."""
        if self.world.leads:
            self.log.write(record)

    def banner(self) -> None:
        job, main = self.job, self.main
        self.say(f"job {job.name or '(unnamed)'}: {self.path}")
        cell_maths = kernels.describe(self.backend.dtype, self.backend.xp)
        per_cell = describe_cells(main.layers.values())
        if per_cell:
            cell_maths += f" ({per_cell})"
        self.say(f"workspace {self.ws}  backend {self.backend.describe()}, {cell_maths}  "
                 f"seed {self.seed}")
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
        if not any(lay.recurrent for lay in self.main.layers.values()):
            return ""
        if Phase.TRAIN not in self.workers:
            w = next(iter(self.workers.values()), None)
            if w is None or not w.feedback:
                return ""
            if w.policy == pb.kResetBatch:
                return ("sampling: every symbol starts from a zero state (state_carry: "
                        "kResetBatch, as SINGA v0.3's sample net); the symbol drawn is still fed "
                        "back")
            return ("sampling: the recurrent state is carried from each symbol to the next "
                    "(SINGA v0.3's sample net started every symbol from a zero state; "
                    "train_one_batch { state_carry: kResetBatch } does that)")
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
        try:
            vals = self._measure(w, steps)
        except Stop:
            self.say(f"step {self.step:>6}  {ph.label:<5} interrupted after {self.measured} of "
                     f"{steps} batches (not recorded)")
            raise
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
        where, bad_here = self._diagnose_share(w, snap)
        if self.world.size == 1:
            return where
        every = self.world.gather((where, bad_here))
        if every is None:
            return ""
        # the first worker that found a node or param, else the first whose own share of the
        # batch gave a non-finite loss (a label of 1e30 in its rows), else worker 0
        found = ([(r, x) for r, (x, _) in enumerate(every) if x != self.NO_CULPRIT]
                 or [(r, x) for r, (x, bad) in enumerate(every) if bad])
        r, x = found[0] if found else (0, every[0][0])
        b = w.batchsize
        return f"worker {r} (rows {r * b}-{(r + 1) * b - 1} of the batch): {x}"

    NO_CULPRIT = "every output is finite but the loss overflowed"

    def _diagnose_share(self, w, snap) -> tuple[str, bool]:
        """(what this worker finds in its share of the batch, whether its own metrics of
        that share are non-finite)."""
        node = w.first_nonfinite_output()
        if node is not None:
            return f"first non-finite output at {node}", True
        w.restore(snap)
        w.probe, w.first_bad_grad = True, None
        try:
            mine = w.run_batch(train=True)
        finally:
            w.probe = False
        bad_here = any(not math.isfinite(v[0]) for v in mine.values())
        if w.first_bad_grad is not None:
            return (f"outputs finite; first non-finite gradient arriving at {w.first_bad_grad}",
                    True)
        bad_p = [p.name for p in self.main.params if not bool(self.backend.xp.isfinite(p.grad).all())]
        if bad_p:
            return (f"outputs and their gradients finite; first non-finite gradient in param "
                    f"{bad_p[0]}", True)
        return self.NO_CULPRIT, bad_here

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
        (and over every worker's share). A stop signal ends it between two batches (``Stop``;
        ``self.measured`` batches ran); with several workers only between training steps,
        where they agree on it."""
        total: dict = {}
        self.measured = 0
        for _ in range(steps):
            if self.world.size == 1:
                self.stops.check()
            merge_metrics(total, w.run_batch(train=False))
            self.measured += 1
        w.host_values()  # the layers' checks of these batches
        total, _ = self.world.reduce_metrics(host_metrics(total, self.backend.xp))
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
        if self.world.size > 1:  # the workers sum host numbers
            metrics = host_metrics(metrics, self.backend.xp)
        metrics, self.stop_agreed = self.world.reduce_metrics(metrics, self.stops.pending)
        if dump:
            w.record = False
            self.dump_debug(w)
        xp = self.backend.xp
        # the step's one read from a GPU: the loss, the gradient norm and the layers' checks
        loss, norm_sq = w.host_values(metrics.get("loss", [0.0])[0],
                                      grad_norm_squared(self.main.params, xp))
        norm = math.sqrt(norm_sq) if math.isfinite(norm_sq) else math.inf
        bad = not math.isfinite(loss) or (not math.isfinite(norm) and not all(
            bool(xp.isfinite(p.grad).all()) for p in self.main.params))
        if bad:
            where = self.diagnose(w, snap)
            msg = f"step {self.step + 1}: non-finite loss or gradient; {where}"
            if not job.skip_nonfinite:
                raise RunError(msg + "; lower the learning rate or clip gradients (the last "
                                     "good checkpoint is kept)")
            # a skipped step still counts: displays, evaluations and checkpoints due
            # at it (and at the end) happen as scheduled; the state it would carry on may
            # hold its non-finite numbers, so the next batch starts from zeros
            w.drop_carry()
            self.say(f"warning: {msg}; batch skipped (skip_nonfinite), the next one starts "
                     f"from a zero state")
            return None
        self.updater.update(self.step, grad_norm=norm)
        return metrics

    def check_stop(self) -> None:
        """Raise Stop at the safe point between two steps: one worker, when a signal came;
        several, when any of them got one (agreed in the last step's metrics sum), so that
        every worker stops after the same step."""
        if self.world.size == 1:
            self.stops.check()
        elif self.stop_agreed is not None:
            raise Stop(self.stop_agreed)

    def run(self) -> int:
        job = self.job
        self.banner()
        self.check_same_params("at start-up")
        if Phase.TRAIN not in self.nets:
            return self.run_test_only()
        w = self.workers[Phase.TRAIN]
        self.t_start = self.t_disp = time.time()
        self.n_rate, self.preds_per_batch = 0, None  # steps timed since the last display
        self.step_s, self.reduce_s0 = 0.0, 0.0  # time in training steps; Allreduce at the last display
        self.progress = Progress(self.train_steps, self.step) if self.world.leads else None
        skipped = 0
        self.stops.phase = DEFER
        while self.step < self.train_steps:
            self.check_stop()
            t_step = time.perf_counter()
            metrics = self.train_step(w)
            self.step_s += time.perf_counter() - t_step
            if metrics is None:
                self.window["skipped"] += 1
                skipped += 1
            else:
                merge_metrics(self.window["total"], metrics)
                self.window["steps"] += 1
                if self.preds_per_batch is None:  # (one read, at the first step)
                    self.preds_per_batch = float(metrics.get("loss", [0.0, 1.0])[1])
            self.step += 1
            self.steps_run += 1
            self.n_rate += 1
            if self.progress is not None:
                self.progress.update(self.step)
            if self._due(job.disp_freq, job.disp_after) or self.step == self.train_steps:
                self.display()
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
                self.say(f"checkpoint {self.save_checkpoint()}")
        if self.progress is not None:
            self.progress.clear()
        self.stops.phase = ABORT  # every step and checkpoint is on disk: nothing left to keep
        note = f" ({skipped} skipped: non-finite)" if skipped else ""
        self.say(f"done: {self.step} steps{note} in {fmt_time(time.time() - self.t_start)}; "
                 f"checkpoints in {self.ckpt_dir}")
        n = self.steps_run
        if self.world.size > 1 and n:
            spent = self.world.allreduce_seconds
            self.say(f"allreduce: {1000 * spent / n:.3f} ms per step on rank 0, "
                     f"{100 * spent / max(1e-9, self.step_s):.1f}% of its "
                     f"{1000 * self.step_s / n:.1f} ms training step")
        try:
            self.plot()
        except Stop as st:
            self.say(f"stopped by {signal_name(st.signum)} while drawing the plot; every step "
                     f"and checkpoint is saved")
            return exit_status(st.signum)
        return 0

    def display(self) -> None:
        """The training record of the display window that ends at this step: metrics
        averaged over its steps (a resumed run continues the window its checkpoint
        saved), the learning rate, speed, elapsed time, and how many steps were skipped."""
        total, n, skipped = self.window["total"], self.window["steps"], self.window["skipped"]
        now = time.time()
        vals = derived_metrics(host_metrics(total, self.backend.xp), self.main) if n else {}
        rate = self.n_rate * (self.preds_per_batch or 0) / max(1e-9, now - self.t_disp)
        unit = "chars" if any(lay.text for lay in self.main.inputs) else "samples"
        lr = learning_rate(self.job.updater.learning_rate, self.step - 1)
        rec = {"step": self.step, "phase": "train", **vals, "lr": lr,
               f"{unit}_per_s": round(rate, 1), "elapsed": round(now - self.t_start, 3)}
        if skipped:
            rec["skipped"] = skipped
        if self.world.size > 1 and self.n_rate:
            spent = self.world.allreduce_seconds - self.reduce_s0
            rec["allreduce_ms"] = round(1000 * spent / self.n_rate, 3)
            self.reduce_s0 = self.world.allreduce_seconds
        self.log_record(rec)
        shown = fmt_metrics(vals) if n else "every step since the last display was skipped"
        self.say(f"step {self.step:>6}  train {shown}  lr {lr:.4g}  {rate:,.0f} {unit}/s  "
                 f"{fmt_time(now - self.t_start)}" + (f"  ({skipped} skipped)" if skipped else ""))
        self.window = new_window()
        self.t_disp, self.n_rate = now, 0

    def plot(self) -> None:
        """The learning curve, metrics.png. It comes after every step and checkpoint is on
        disk, so whatever keeps it from being drawn (no matplotlib, a bad MPLBACKEND,
        metrics.png a folder, ...) is a note, never a failed run. Rank 0 only."""
        if not self.world.leads:
            return
        try:
            self.say(f"plot {plot_metrics(self.ws)}")
        except PlotUnavailable as e:
            self.say(f"note: no plot: {e}")
        except Exception as e:  # noqa: BLE001 - see the docstring
            first = (str(e).splitlines() or [""])[0]
            self.say(f"warning: no plot: {type(e).__name__}: {first} (the run itself is "
                     f"complete)")

    def run_test_only(self) -> int:
        ph = Phase.TEST if Phase.TEST in self.workers else self.phases[0]
        steps = self.job.test_steps or 1
        w = self.workers[ph]
        self.stops.phase = DEFER
        try:
            vals = self._measure(w, steps)
        except Stop as st:
            self.report_text(w)  # what was generated so far is kept
            self.say(f"stopped by {signal_name(st.signum)} after {self.measured} of {steps} "
                     f"{ph.label} batches (metrics not recorded)")
            return exit_status(st.signum)
        if vals:
            self.log_record({"step": self.step, "phase": ph.label, **vals})
            self.say(f"{ph.label}: {fmt_metrics(vals)}")
        self.report_text(w)
        return 0

    def report_text(self, w) -> None:
        if not self.world.leads:
            return
        for lay in w.net.layers.values():
            text = lay.report()
            if text:
                self.say(f"--- text written by layer {lay.name} ---")
                self.say(text)


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


def precheck_inputs(job, path) -> None:
    """ConfigError for a data problem the job alone shows (each input layer's ``precheck``)."""
    info = {"job_dir": str(job_dir(path))}
    for ph in phases_of(job):
        for conf in layers_in_phase(job.neuralnet, ph):
            cls = layer_class(conf.type)
            if cls is not None and issubclass(cls, InputLayer):
                problem = cls.precheck(conf, info)
                if problem:
                    raise ConfigError(f'{path}: layer "{conf.name}": {problem}')


def start_workers(args, argv: list[str]):
    """The World this process trains in, or an exit status when this process is done:
    outside mpiexec, more than one worker asked for (``--workers`` or the job's cluster)
    launches them (engine/distributed.py) and returns their exit status; under mpiexec,
    this rank's World. A problem is one line ``error: ...`` (rank 0 only), status 2."""
    env = dist.launcher_env()
    try:
        if env is None and not args.graph_only:
            job = load_job(args.job)
            n = dist.workers_wanted(args.workers, job)
            if n > 1:
                dist.check_split(job, n, args.job)   # before anything starts
                return dist.launch(argv, n)
        return dist.join()
    except (ConfigError, dist.DistributedError) as e:
        if env is None or env[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


def failure(e: Exception, args, trainer=None) -> tuple[int, str]:
    """(exit status, one line) for an exception that ends a run. The job, its input or the
    workspace at fault is 2 when found before the first step; a workspace that cannot be
    written once steps ran (a checkpoint, the metrics log) is a failed run, 1."""
    if isinstance(e, cli.INPUT_ERRORS + (MetricsError, dist.DistributedError)):
        return (1 if trainer is not None and trainer.steps_run else 2), str(e)
    if isinstance(e, NotPlannable):
        return 2, f"--executor planned: {e}; use --executor auto"
    if isinstance(e, (RunError, ContinuityError)):
        return 1, str(e)
    return cli.failure(e, args.job)


def report_failure(world: dist.World, started: bool, e: Exception, args, trainer=None) -> int:
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
        code, line = failure(e, args, trainer)
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


#: the largest step count a job file can hold (train_steps is an int32)
MAX_STEPS = 2 ** 31 - 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stops = _STOPS if _STOPS is not None else StopSignals(sys.stdout).install()
    stops.phase = ABORT  # until the loops: a signal stops at once (nothing to keep yet)
    trainer, world, started = None, None, False
    try:
        try:
            if args.steps is not None and args.steps > MAX_STEPS:
                raise ConfigError(f"--steps is {args.steps}; it must be at most {MAX_STEPS} "
                                  f"(train_steps is a 32-bit number in a job file)")
            if args.steps is not None and args.steps < 0:
                raise ConfigError(f"--steps is {args.steps}; it must be >= 0 (0: no training, "
                                  f"only the test phase)")
            world = start_workers(args, argv)
            if isinstance(world, int):  # this process launched the workers, and they ended
                return world
            job = load_job(args.job)
            if args.graph_only:
                if world.leads:
                    graph_only(job, args)
                started = True
                world.agree(None)
                return 0
            dist.check_world(world, args.workers, job)
            trainer = Trainer(job, args.job, args, stops, world)
            keep_freed_memory()  # reuse each batch's large temporaries (see engine/backend.py)
            # overflow is detected and reported by the loop itself, not by numpy warnings
            np.seterr(over="ignore", invalid="ignore", divide="ignore")
            trainer.build()
            started = True
            problem = world.agree(None)  # did every worker start? (one: it did)
            if problem is not None:
                raise WorkersFailed(*problem)
            return trainer.run()
        except Stop as st:
            return stopped(trainer, stops, st.signum)
        except Exception as e:  # noqa: BLE001 - every failure is one line (and its exit status)
            if args.debug and (world is None or world.size == 1):
                raise
            return report_failure(world or dist.World(), started, e, args, trainer)
    except ForcedExit as fx:
        return forced_exit(trainer, fx.signum)
    finally:
        if trainer is not None:
            trainer.release()
        stops.uninstall()


def graph_only(job, args) -> int:
    """--graph-only: the unrolled graphs of the job's phases, written under the lock."""
    ws = workspace_of(job, args.workspace)
    ensure_workspace(ws)
    lock = lock_workspace(ws)
    try:
        check_layout(ws)
        trained = ckpt.list_checkpoints(ws / "checkpoints")
        for ph, u in write_graphs(job, args.job, ws, phases_of(job), keep=bool(trained)).items():
            g = u.graph
            print(f"wrote {ws / 'visualization' / (ph.label + '_net.json')} "
                  f"({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)")
    finally:
        lock.release()
    return 0


def stopped(trainer: Trainer | None, stops: StopSignals, signum: int) -> int:
    """A stop signal ended the run: write a checkpoint when steps ran since the newest
    one (signals keep being handled until it is on disk; see engine/stopping.py), say
    where to continue from, and exit 128 + signum. A checkpoint that cannot be written
    is one error line naming it, exit 1."""
    name = signal_name(signum)
    if trainer is None or trainer.updater is None or trainer.steps_run == 0:
        have = (f"; the newest checkpoint is step {trainer.saved_step}"
                if trainer is not None and trainer.saved_step is not None else "")
        line = f"stopped by {name} before the first step; nothing to save{have}"
        if trainer is not None:
            trainer.say(line)           # rank 0; train.log when stdout was closed
        else:
            print(line, flush=True)
        return exit_status(signum)
    if trainer.saved_step == trainer.step:
        trainer.say(f"stopped by {name} at step {trainer.step}; checkpoint "
                    f"{trainer.ckpt_dir / f'step{trainer.step}.npz'} holds it; continue with "
                    f"--resume")
        return exit_status(signum)
    stops.saving(f"writing the checkpoint of step {trainer.step}")
    try:
        where = trainer.save_checkpoint()
    except ckpt.CheckpointError as e:
        if trainer.world.leads:
            print(f"error: stopped by {name} at step {trainer.step}, but its checkpoint could "
                  f"not be written: {e}", file=sys.stderr)
        return 1
    trainer.say(f"stopped by {name} at step {trainer.step}; checkpoint {where}; continue with "
                f"--resume")
    return exit_status(signum)


def forced_exit(trainer: Trainer | None, signum: int) -> int:
    """The third signal: leave without the save in progress, saying what is lost."""
    if trainer is None or trainer.steps_run == 0 or trainer.saved_step == trainer.step:
        lost = "nothing is lost"
    elif trainer.saved_step is None:
        lost = f"steps 1 to {trainer.step} are lost (no checkpoint was written)"
    else:
        lost = (f"steps {trainer.saved_step + 1} to {trainer.step} are lost; the newest "
                f"checkpoint is step {trainer.saved_step}")
    print(f"error: stopped by a third signal ({signal_name(signum)} first) without a "
          f"checkpoint; {lost}", file=sys.stderr)
    return exit_status(signum)


if __name__ == "__main__":
    sys.exit(main())
