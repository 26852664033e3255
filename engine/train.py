"""``python -m engine.train JOB [--workspace DIR] [--steps N] [--gpu ID] [--resume] ...``

Trains (and validates / tests) as the job says; writes the unrolled graphs to
``<workspace>/visualization/``, metrics to ``<workspace>/metrics.jsonl`` and
checkpoints to ``<workspace>/checkpoints/``. A job with ``train_steps: 0`` and
``test_steps`` runs only its test phase (SINGA's way of sampling with a
sample job and ``checkpoint_path``).

Exit status: 0 done, 2 bad job/input (one line on stderr, ``--debug`` for the
traceback), 1 the run failed (non-finite numbers, ...), 130/143 stopped by
SIGINT/SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time

import numpy as np
from google.protobuf import text_format

from engine import checkpoint as ckpt
from engine import interop
from engine.backend import BackendError, keep_freed_memory, make_backend
from engine.config import ConfigError, Phase, job_dir, load_job
from engine.layers import kernels
from engine.layers.input import resolve_path
from engine.net import Net
from engine.planner import NotPlannable, make_worker
from engine.plot import PlotUnavailable, plot_metrics
from engine.proto import job_pb2 as pb
from engine.metrics import MetricsLog, Progress, derived_metrics, fmt_metrics, fmt_time, merge_metrics
from engine.workspace import (ensure_workspace, load_params, net_info, param_arrays, phases_of,
                              workspace_of, write_graphs)
from engine.layers import LayerError
from engine.updaters import Updater, UpdaterError, describe, global_grad_norm
from engine.worker import ContinuityError


class RunError(Exception):
    """The run cannot go on (message is one line)."""


class Stop(Exception):
    def __init__(self, signum):
        self.signum = signum


class Trainer:
    """The job loop: train steps, displays, evaluations, checkpoints."""

    def __init__(self, job: pb.JobProto, path: str, args):
        self.job, self.path, self.args = job, path, args
        self.ws = workspace_of(job, args.workspace)
        ensure_workspace(self.ws)
        self.seed = args.seed if args.seed is not None else job.seed
        self.train_steps = args.steps if args.steps is not None else job.train_steps
        if self.train_steps != job.train_steps:
            job.train_steps = self.train_steps
        gpu = args.gpu if args.gpu is not None else (job.gpu[0] if job.gpu else None)
        self.backend = make_backend(gpu, np.float32)
        self.phases = phases_of(job)
        self.unrolled = write_graphs(job, path, self.ws, self.phases)
        self.out = sys.stdout
        self.log = MetricsLog(self.ws / "metrics.jsonl")
        self.ckpt_dir = self.ws / "checkpoints"
        self.stop_signal = None
        self.progress = None

    # ----------------------------------------------------------- building
    def build(self) -> None:
        job = self.job
        vocab = None
        init_arrays = None
        torch_files = []  # PyTorch's layout: mapped onto the net once it is built
        if job.checkpoint_path:
            init_arrays = {}
            for cp in job.checkpoint_path:
                path = resolve_path(cp, {"job_dir": str(job_dir(self.path))})
                if interop.is_torch_file(path):
                    torch_files.append(path)
                    continue
                arrays, meta = ckpt.load(path)
                init_arrays.update(arrays)
                vocab = vocab or meta.get("vocab")
        self.resume_from = None
        resume = self.args.resume or job.resume
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        if existing and not resume and job.train_steps > 0:
            raise ConfigError(f"{self.ckpt_dir} already holds checkpoints (newest: step "
                              f"{existing[-1][0]}); continue with --resume, or start over in "
                              f"another --workspace (nothing was overwritten)")
        if not resume:
            self.log.truncate_after(-1)
        if resume:
            found = ckpt.newest_valid(self.ckpt_dir, warn=self.say)
            if found is None:
                self.say(f"no valid checkpoint in {self.ckpt_dir}; starting from step 0")
            else:
                self.resume_from = found
                vocab = found[2].get("vocab") or vocab
        info = net_info(self.path, self.ws, self.seed, vocab)
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
            self.nets[ph] = net
            self.workers[ph], note = make_worker(net, self.seed, carry, executor)
            if ph == self.phases[0]:
                self.executor_note = note
        self.main = main
        self.vocab = main.info.get("vocab")
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

    # -------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        w = self.workers[Phase.TRAIN]
        arrays = param_arrays(self.main)
        for k, v in self.updater.state_dict().items():
            arrays[f"updater/{k}"] = v
        ws = w.state_dict()
        arrays.update({f"worker/{k}": v for k, v in ws["arrays"].items()})
        meta = {"step": self.step, "job": text_format.MessageToString(self.job),
                "job_path": str(self.path), "vocab": self.vocab, "seed": self.seed,
                "worker": ws["meta"], "time": time.time()}
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
            w.load_state_dict({k[7:]: v for k, v in arrays.items() if k.startswith("worker/")},
                              meta.get("worker", {}))
        self.step = int(meta["step"])
        self.log.truncate_after(self.step)
        self.say(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ running
    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.clear()
        print(msg, file=self.out, flush=True)

    def banner(self) -> None:
        job, main = self.job, self.main
        self.say(f"job {job.name or '(unnamed)'}: {self.path}")
        cell_maths = kernels.describe(self.backend.dtype, self.backend.xp)
        self.say(f"workspace {self.ws}  backend {self.backend.describe()}, {cell_maths}  "
                 f"seed {self.seed}")
        for line in main.info.get("notes", []):
            self.say(line)
        g = self.unrolled[self.phases[0]].graph
        self.say(f"unrolled {self.phases[0].label} net: {g.number_of_nodes()} nodes, "
                 f"{g.number_of_edges()} edges, {main.param_count():,} params")
        for line in main.describe():
            self.say(line)
        self.say(self.executor_note)
        if self.updater is not None:
            self.say(f"updater {describe(job.updater)}")

    def evaluate(self, ph: Phase, steps: int) -> dict:
        w = self.workers[ph]
        w.reset()  # every evaluation reads the same batches from the same state
        t0 = time.time()
        vals = self._measure(w, steps)
        self.log.write({"step": self.step, "phase": ph.label, **vals,
                        "seconds": round(time.time() - t0, 3)})
        self.say(f"step {self.step:>6}  {ph.label:<5} {fmt_metrics(vals)}")
        return vals

    def diagnose(self, w, snap) -> str:
        """Where a batch went non-finite: the first unrolled node whose output is not
        finite; else the batch is run again from ``snap`` (same data, same params) noting
        the first node whose incoming gradient is not finite; else the first param whose
        gradient is not finite."""
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
        return "every output is finite but the loss overflowed"

    def _due_next(self, freq: int, after: int) -> bool:
        """Will the step about to run (number self.step + 1) be a due step?"""
        n = self.step + 1
        return freq > 0 and n % freq == 0 and n > after

    def dump_debug(self, w) -> None:
        """visualization/debug_step<N>.json: per-node output/gradient and per-param statistics."""
        path = self.ws / "visualization" / f"debug_step{self.step + 1}.json"
        path.write_text(json.dumps({"step": self.step + 1, "nodes": w.node_stats,
                                    "params": w.param_stats}, indent=1))
        self.say(f"debug statistics {path} (draw them: python tools/graph.py "
                 f"{self.ws / 'visualization' / 'train_net.json'} net.svg --stats {path})")

    @staticmethod
    def _measure(w, steps: int) -> dict:
        """Forward ``steps`` batches without training; the derived metrics over all of them."""
        total: dict = {}
        for _ in range(steps):
            merge_metrics(total, w.run_batch(train=False))
        return derived_metrics(total, w.net)

    def _due(self, freq: int, after: int) -> bool:
        return freq > 0 and self.step % freq == 0 and self.step > after

    def run(self) -> int:
        job = self.job
        self.banner()
        if Phase.TRAIN not in self.nets:
            return self.run_test_only()
        w = self.workers[Phase.TRAIN]
        total, t_disp, n_disp = {}, time.time(), 0
        t_start = time.time()
        self.progress = Progress(self.train_steps, self.step)
        lr = 0.0
        preds_per_batch = None
        while self.step < self.train_steps:
            if self.stop_signal is not None:
                raise Stop(self.stop_signal)
            dump = self.debug and (
                self._due_next(job.disp_freq, job.disp_after) or self.step + 1 == self.train_steps)
            w.record = dump
            snap = w.snapshot()
            metrics = w.run_batch(train=True)
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
                    continue
                raise RunError(msg + "; lower the learning rate or clip gradients (the last good "
                                     "checkpoint is kept)")
            stats = self.updater.update(self.step, grad_norm=norm)
            lr = stats["lr"]
            self.step += 1
            merge_metrics(total, metrics)
            n_disp += 1
            if preds_per_batch is None:
                preds_per_batch = loss[1]
            self.progress.update(self.step)
            if self._due(job.disp_freq, job.disp_after) or self.step == self.train_steps:
                dt = max(1e-9, time.time() - t_disp)
                vals = derived_metrics(total, self.main)
                rate = n_disp * (preds_per_batch or 0) / dt
                unit = "chars" if "bpc" in vals else "samples"
                self.log.write({"step": self.step, "phase": "train", **vals, "lr": lr,
                                f"{unit}_per_s": round(rate, 1),
                                "elapsed": round(time.time() - t_start, 3)})
                self.say(f"step {self.step:>6}  train {fmt_metrics(vals)}  lr {lr:.4g}  "
                         f"{rate:,.0f} {unit}/s  {fmt_time(time.time() - t_start)}")
                total, t_disp, n_disp = {}, time.time(), 0
            if Phase.VAL in self.workers and (self._due(job.validate_freq, job.validate_after)
                                              or self.step == self.train_steps):
                self.evaluate(Phase.VAL, job.validate_steps)
            if Phase.TEST in self.workers and (self._due(job.test_freq, job.test_after)
                                               or self.step == self.train_steps):
                self.evaluate(Phase.TEST, job.test_steps)
            if self._due(job.checkpoint_freq, job.checkpoint_after) or \
                    self.step == self.train_steps:
                self.say(f"checkpoint {self.save_checkpoint()}")
        self.progress.clear()
        self.say(f"done: {self.step} steps in {fmt_time(time.time() - t_start)}; "
                 f"checkpoints in {self.ckpt_dir}")
        self.plot()
        return 0

    def plot(self) -> None:
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
            self.log.write({"step": self.step, "phase": ph.label, **vals})
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
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    ap.add_argument("--seed", type=int, help="override the job's seed")
    ap.add_argument("--graph-only", action="store_true",
                    help="only write visualization/<phase>_net.json and stop")
    ap.add_argument("--executor", choices=["auto", "planned", "reference"],
                    help="auto (default): the planned executor when the net fits, else node by "
                         "node; --debug defaults to reference")
    ap.add_argument("--debug", action="store_true",
                    help="show tracebacks; run the reference (node-by-node) executor")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    trainer = None
    try:
        job = load_job(args.job)
        if args.graph_only:
            ws = workspace_of(job, args.workspace)
            ensure_workspace(ws)
            for ph, u in write_graphs(job, args.job, ws, phases_of(job)).items():
                g = u.graph
                print(f"wrote {ws / 'visualization' / (ph.label + '_net.json')} "
                      f"({g.number_of_nodes()} nodes, {g.number_of_edges()} edges)")
            return 0
        trainer = Trainer(job, args.job, args)
        keep_freed_memory()  # reuse each batch's large temporaries (see engine/backend.py)

        def on_signal(signum, frame):
            trainer.stop_signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        # overflow is detected and reported by the loop itself, not by numpy warnings
        np.seterr(over="ignore", invalid="ignore", divide="ignore")
        try:
            trainer.build()
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
    except (ConfigError, BackendError, ckpt.CheckpointError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotPlannable as e:
        if args.debug:
            raise
        print(f"error: --executor planned: {e}; use --executor auto", file=sys.stderr)
        return 2
    except (RunError, ContinuityError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still one line
        if args.debug:
            raise
        if isinstance(e, (LayerError, UpdaterError)):
            print(f"error: {args.job}: {e}", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
