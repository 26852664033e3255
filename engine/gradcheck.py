"""``python -m engine.gradcheck JOB``: prove a net's gradients by finite differences.

Builds the job's train net in float64 on NumPy (whatever GPU the job names: its
``gpu`` field is not used, and ``--cpu`` is accepted so that the same command line
serves engine.train, engine.sample and this), loads one batch, and compares
each param's analytic gradient (the BPTT worker's backward: the reference
executor's and, where the net fits it, the planned executor's) with central
differences of the objective (the sum over loss copies of scale x the mean
over the batch of the per-row loss) at every entry of small params and at a
random sample of entries of large ones. Prints the worst relative error per
param; exits 1 when any is above ``--tol`` or not finite (a NaN or infinite analytic
gradient anywhere in the param, or a non-finite finite difference, is a failure,
never "ok"). Options that would check nothing or divide by zero (``--eps`` not
> 0, ``--samples`` < 1, ``--max-full`` < 0, ``--tol`` not a finite number >= 0)
and a net without params are errors: one line, exit 2.

relative error = |analytic - numeric| / max(|analytic| + |numeric|, 1e-3 * g_max, 1e-7)
where g_max is the largest analytic gradient entry of that param: entries a
thousand times smaller than the param's largest are below what central
differences of a float64 objective resolve, so their error is measured
against that floor instead of their own size.
"""
from __future__ import annotations

import sys

from engine.stopping import StopSignals

# Before the imports below: a Ctrl-C while they load (or while this short command runs)
# is one line on stderr and exit 130, not a traceback.
_STOPS = StopSignals(sys.stderr).install() if __name__ == "__main__" else None

import argparse  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from engine import cli  # noqa: E402
from engine.backend import device_of, make_backend, to_host  # noqa: E402
from engine.config import ConfigError, Phase, load_job  # noqa: E402
from engine.net import Net  # noqa: E402
from engine.proto import job_pb2 as pb  # noqa: E402
from engine.workspace import job_alg, net_info, workspace_of  # noqa: E402
from engine.unroll import unroll  # noqa: E402
from engine.planner import NotPlannable, PlannedWorker  # noqa: E402
from engine.worker import Worker  # noqa: E402


#: --executor -> the executors checked, in order
EXECUTORS = {"both": ("reference", "planned"), "reference": ("reference",), "planned": ("planned",)}


class GradcheckError(ValueError):
    """Options under which the check would prove nothing; the message names the option."""


def check_options(eps: float, max_full: int, samples: int, tol: float | None = None) -> None:
    """GradcheckError unless eps > 0 (finite), max_full >= 0, samples >= 1 and, when given,
    tol is a finite number >= 0 (NaN would make every comparison pass)."""
    if not (math.isfinite(eps) and eps > 0):
        raise GradcheckError(f"--eps {eps:g}: the finite-difference step must be a finite positive "
                             f"number (default 1e-3)")
    if max_full < 0:
        raise GradcheckError(f"--max-full {max_full}: give a size >= 0 up to which every entry "
                             f"of a param is checked (default 300)")
    if samples < 1:
        raise GradcheckError(f"--samples {samples}: params larger than --max-full {max_full} "
                             f"would not be checked at all; give --samples 1 or more")
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise GradcheckError(f"--tol {tol:g}: the tolerance must be a finite number >= 0 "
                             f"(default 1e-4)")


def build(job: pb.JobProto, path: str, seed: int = 0, workspace=None, phase=Phase.TRAIN,
          executor: str = "reference", gpu: int | None = None):
    """A float64 net and worker over one loaded batch (state starts from zeros), on NumPy
    or, with ``gpu``, on that GPU (CuPy): ``executor`` "reference" (node by node) or
    "planned" (NotPlannable when the net does not fit the planner)."""
    ws = workspace_of(job, workspace)
    u = unroll(job.neuralnet, phase, job.name, where=str(path))
    net = Net(u, make_backend(gpu, np.float64), net_info(path, ws, seed, alg=job_alg(job)),
              seed=seed, where=str(path))
    if not net.losses:
        raise ConfigError(f"{path}: the net has no loss layer, so there is no objective to check")
    if not net.params:
        raise ConfigError(f"{path}: the net has no params, so there is no gradient to check")
    if executor == "planned":
        w = PlannedWorker(net, seed=seed, carry=pb.kResetBatch)
    else:
        w = Worker(net, seed=seed, carry=pb.kResetBatch)
    w.load()
    return net, w


def objective(w: Worker) -> float:
    """Forward the loaded batch (same dropout masks every time) and return the objective."""
    metrics: dict = {}
    w.forward(True, metrics)
    return w.host_values(metrics["objective"][0])[0]


def check(net: Net, w: Worker, eps: float = 1e-3, max_full: int = 300, samples: int = 40,
          seed: int = 0) -> dict[str, float]:
    """Worst relative error per param name; NaN for a param whose analytic gradient has a
    non-finite entry or whose finite difference is not finite (a failure under any
    tolerance). GradcheckError for options that check nothing (see check_options)."""
    check_options(eps, max_full, samples)
    for p in net.params:
        p.grad[...] = 0
    metrics: dict = {}
    w.forward(True, metrics)
    w.backward()
    rng = np.random.default_rng(seed)
    worst = {}
    for p in net.params:
        g = to_host(p.grad).copy()
        if not np.isfinite(g).all():
            worst[p.name] = math.nan
            continue
        flat = p.data.reshape(-1)
        n = flat.size
        idx = np.arange(n) if n <= max(max_full, samples) else rng.choice(n, size=samples,
                                                                             replace=False)
        err = 0.0
        floor = max(1e-7, 1e-3 * float(np.abs(g).max()))
        for k in idx:
            old = float(flat[k])
            flat[k] = old + eps
            lp = objective(w)
            flat[k] = old - eps
            lm = objective(w)
            flat[k] = old
            num = (lp - lm) / (2 * eps)
            if not math.isfinite(num):
                err = math.nan
                break
            ana = g.reshape(-1)[k]
            err = max(err, abs(ana - num) / max(abs(ana) + abs(num), floor))
        worst[p.name] = err
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.gradcheck", description=__doc__.splitlines()[0])
    ap.add_argument("job")
    ap.add_argument("--eps", type=float, default=1e-3, help="finite-difference step")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted relative error")
    ap.add_argument("--samples", type=int, default=40, help="entries checked per large param")
    ap.add_argument("--max-full", type=int, default=300, help="params up to this size: every entry")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", type=int,
                    help="check on this GPU (CuPy, float64); the default is the CPU (NumPy), "
                         "whatever the job's gpu field says")
    ap.add_argument("--cpu", action="store_true",
                    help="accepted for a job that names a GPU (gpu: 0); without --gpu the "
                         "check runs on the CPU (NumPy, float64)")
    ap.add_argument("--executor", choices=list(EXECUTORS), default="both",
                    help="which executor's backward to check: both (default; the planned one "
                         "where the net fits it), reference or planned")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    try:
        check_options(a.eps, a.max_full, a.samples, a.tol)
        job = load_job(a.job)
        runs = {}
        for executor in EXECUTORS[a.executor]:
            try:
                net, w = build(job, a.job, a.seed, executor=executor,
                               gpu=device_of(a.cpu, a.gpu))
            except NotPlannable as e:
                if a.executor == "planned":
                    raise ConfigError(f"{a.job}: the planned executor does not run this net: {e}")
                print(f"planned executor: not checked, the net does not fit it ({e})")
                continue
            runs[executor] = check(net, w, a.eps, a.max_full, a.samples, a.seed)
    except Exception as e:  # noqa: BLE001 - every failure is one line (engine/cli.py)
        if a.debug:
            raise
        return cli.report(e, a.job, inputs=(GradcheckError,))
    failed = False
    for executor, worst in runs.items():
        above = [k for k, v in worst.items() if v > a.tol]
        nonfinite = [k for k, v in worst.items() if math.isnan(v)]
        width = max(len(k) for k in worst)
        if len(runs) > 1:
            print(f"{executor} executor:")
        for name, err in worst.items():
            verdict = ("FAIL (gradient or objective not finite)" if math.isnan(err)
                       else "FAIL" if err > a.tol else "ok")
            print(f"{name:<{width}}  worst relative error {err:.2e}  {verdict}")
        summary = (f"gradcheck ({executor}): {len(worst) - len(above) - len(nonfinite)} params "
                   f"within tolerance {a.tol:g}, {len(above)} above")
        if nonfinite:
            summary += f", {len(nonfinite)} not finite"
        print(summary)
        failed = failed or bool(above or nonfinite)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
