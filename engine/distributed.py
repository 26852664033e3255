"""Data-parallel training on several workers: synchronous SGD over MPI (mpi4py).

N workers are N MPI ranks running the same job. Every global batch of B rows is split
into N shares of b = B / N rows (``InputLayer.take_share``): worker r reads rows
r·b .. r·b + b - 1 of the batch one worker would read (kCharRNN: its own contiguous
group of streams, whose state it carries; a record store: those rows of the same
seeded epoch order), so the shares together are exactly that batch.

Why the result is one worker's. Each loss divides by its batch rows (SINGA's
convention, engine/layers/loss.py), so worker r's gradient is g_r = (1/b) Σ_{rows of r}
∂ℓ. The one in-place Allreduce of the net's gradient buffer (``engine.params.GradBuffer``,
every param's grad a view of it) followed by a division by N gives

    (1/N) Σ_r g_r = (1/B) Σ_{all B rows} ∂ℓ,

the single-worker gradient of the global batch, on every worker alike. Clipping, the
non-finite check and the updater then run on identical numbers, so params stay bitwise
equal on every worker (``params_digest`` checks it at start-up and, in debug mode, at
every display). Metrics (sum, count) pairs are summed over the workers (the
"objective", a sum of per-worker batch means, is divided by N), together with the
workers' stop requests (SIGINT/SIGTERM), in one small float64 Allreduce per step, so
all workers stop after the same step.

Dropout and sampling draw from per-worker streams (``rank_seed``) derived from the
job's seed; with N > 1 they are not one worker's draws.

Checkpoints hold the whole batch's carried state: worker r's rows are gathered in rank
order (``gather_worker_state``), so a checkpoint looks like one worker's and resumes on
any number of workers that divides B (``share_worker_state`` takes a worker's rows).
Cursors, params and updater state are equal on every worker; rank 0 writes them.

Starting: ``mpiexec -n N python -m engine.train JOB`` (the ranks), or ``python -m
engine.train JOB --workers N`` / ``cluster { nworker_groups: N }``, which ``launch``es
that with the ``mpiexec`` installed beside this Python (the ``mpich`` wheel's).

GPU ranks (CuPy arrays): the gradient buffer is staged through host memory for the
Allreduce (these MPI builds are not CUDA-aware); untested here (no GPU).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import numpy as np

from engine.backend import to_host

#: the environment variable naming the file where a failing worker writes its line
#: (set by ``launch``, which prints it)
FAILURE_FILE = "RNN_ENGINE_FAILURE_FILE"

#: what to install for several workers
INSTALL = "pip install 'rnn-engine[mpi]' (mpi4py and the mpich runtime)"

#: (rank, size) variables that MPI launchers set in each process they start:
#: MPICH's hydra (PMI), Open MPI
_LAUNCHER_ENV = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


class DistributedError(Exception):
    """Several workers cannot start as asked (one line saying what to do)."""


def launcher_env() -> tuple[int, int] | None:
    """(rank, size) when this process was started by an MPI launcher, else None."""
    for rk, sz in _LAUNCHER_ENV:
        if rk in os.environ and sz in os.environ:
            try:
                return int(os.environ[rk]), int(os.environ[sz])
            except ValueError:
                continue
    return None


def workers_of_job(job) -> int | None:
    """Workers the job's ``cluster`` asks for: nworker_groups × nworkers_per_group (every
    worker synchronous), or None when it sets neither. DistributedError below 1."""
    c = job.cluster
    if not (c.HasField("nworker_groups") or c.HasField("nworkers_per_group")):
        return None
    for field in ("nworker_groups", "nworkers_per_group"):
        if getattr(c, field) < 1:
            raise DistributedError(f"cluster.{field} is {getattr(c, field)}; it must be at least 1")
    return int(c.nworker_groups) * int(c.nworkers_per_group)


def workers_wanted(flag: int | None, job) -> int:
    """How many workers to run: ``--workers`` when given (it wins over the job), else the
    job's cluster fields, else 1."""
    if flag is not None:
        if flag < 1:
            raise DistributedError(f"--workers {flag}: give at least 1")
        return flag
    return workers_of_job(job) or 1


def check_split(job, workers: int, path: str = "<job>") -> None:
    """DistributedError (one line) unless every input layer's batch (train phase, read from
    the job alone) splits evenly over ``workers``: checked before any worker is started,
    so an impossible ``--workers`` starts nothing."""
    if workers <= 1:
        return
    from engine.config import Phase, layers_in_phase  # noqa: PLC0415 - launcher only
    from engine.layers import layer_class  # noqa: PLC0415
    from engine.layers.base import InputLayer  # noqa: PLC0415
    for conf in layers_in_phase(job.neuralnet, Phase.TRAIN):
        cls = layer_class(conf.type)
        if cls is None or not issubclass(cls, InputLayer):
            continue
        rows = cls.configured_batch(conf)
        if rows and rows % workers:
            fits = [n for n in range(2, rows + 1) if rows % n == 0]
            raise DistributedError(
                f'{path}: layer "{conf.name}": batch size {rows} cannot be split evenly over '
                f"{workers} workers; use a batch size divisible by {workers}, or --workers "
                f"{' or '.join(map(str, fits[:6])) or '1'} (nothing was started)")


def check_world(world: "World", flag: int | None, job) -> None:
    """DistributedError (one line) when the launcher started a number of workers that
    contradicts ``--workers``, or, without the flag, the job's cluster fields."""
    if flag is not None:
        if flag != world.size:
            raise DistributedError(f"--workers {flag}, but mpiexec started {world.size} "
                                   f"worker(s); give mpiexec -n {flag} or --workers {world.size}")
        return
    n = workers_of_job(job)
    if n is not None and n != world.size:
        c = job.cluster
        raise DistributedError(
            f"the job asks for {n} worker(s) (cluster.nworker_groups {c.nworker_groups} x "
            f"nworkers_per_group {c.nworkers_per_group}), but {world.size} were started; pass "
            f"--workers {world.size} to override the job, or change its cluster fields")


def rank_seed(seed: int, rank: int, size: int) -> int:
    """The seed of worker ``rank``'s per-batch random streams (dropout, sampling): the job's
    seed for one worker; for several, a distinct seed per rank derived from it."""
    if size == 1:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED, int(rank)]).generate_state(1)
    return int(state[0])


def params_digest(params) -> str:
    """SHA-256 over every param's name, shape and bytes (host copies), in order."""
    h = hashlib.sha256()
    for p in params:
        a = np.ascontiguousarray(to_host(p.data))
        h.update(p.name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class World:
    """One worker, no MPI: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0

    def __init__(self):
        #: seconds spent in the gradient Allreduce, and how many were done
        self.allreduce_seconds = 0.0
        self.allreduce_count = 0

    @property
    def leads(self) -> bool:
        """Rank 0 prints, logs, plots and writes checkpoints."""
        return self.rank == 0

    def describe(self) -> str:
        return "1 worker"

    # ----------------------------------------------------------- collectives
    def allreduce_grads(self, grads) -> None:
        """Replace the gradient buffer ``grads.flat`` by the mean of all workers' buffers."""

    def _sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def allgather(self, obj) -> list:
        return [obj]

    def gather(self, obj) -> list | None:
        """Rank 0 gets every rank's ``obj`` in rank order; the others get None."""
        return [obj]

    def fail(self, line: str) -> None:
        """This worker failed on its own: report ``line`` (``error: worker <rank>: line``) and
        end every worker now with exit status 1."""
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)

    # -------------------------------------------------------- built on them
    def reduce_metrics(self, metrics: dict, stop: int | None = None) -> tuple[dict, int | None]:
        """Metrics of the whole batch from every worker's {name: [sum, count]}, and the stop
        request of any worker (SIGTERM before SIGINT), in one float64 sum. The
        "objective" (a sum of per-worker batch means) is divided by the number of
        workers. Every worker must pass the same metric names."""
        if self.size == 1:
            return metrics, stop
        keys = sorted(metrics)
        v = np.zeros(2 * len(keys) + 2)
        for i, k in enumerate(keys):
            v[2 * i], v[2 * i + 1] = metrics[k]
        v[-2] = stop == signal.SIGINT
        v[-1] = stop == signal.SIGTERM
        v = self._sum(v)
        out = {k: [float(v[2 * i]), float(v[2 * i + 1])] for i, k in enumerate(keys)}
        if "objective" in out:
            out["objective"][0] /= self.size
        agreed = signal.SIGTERM if v[-1] > 0 else (signal.SIGINT if v[-2] > 0 else None)
        return out, agreed

    def agree(self, failure: tuple[int, str] | None) -> tuple[int, str] | None:
        """Every worker's start-up result, the same on all: None when all started, else
        (exit status, line) of the first failing rank (the line names the rank when the
        workers did not all fail alike)."""
        every = self.allgather(failure)
        bad = [(r, f) for r, f in enumerate(every) if f is not None]
        if not bad:
            return None
        r, (code, line) = bad[0]
        if self.size > 1 and not (len(bad) == self.size and all(f == bad[0][1] for _, f in bad)):
            line = f"worker {r}: {line}"
        return code, line

    def same_params(self, params) -> int | None:
        """None when every worker holds bitwise the same params, else the first rank that
        differs from rank 0 (the same answer on every worker)."""
        if self.size == 1:
            return None
        every = self.allgather(params_digest(params))
        return next((r for r, d in enumerate(every) if d != every[0]), None)

    def gather_worker_state(self, state: dict) -> dict | None:
        """Rank 0: a Worker.state_dict of the whole batch, each worker's carried states and
        stream starts joined along the rows in rank order; the others: None."""
        every = self.gather(state)
        if every is None:
            return None
        if len(every) == 1:
            return every[0]
        arrays = {k: np.concatenate([s["arrays"][k] for s in every], axis=0)
                  for k in every[0]["arrays"]}
        meta = dict(every[0]["meta"])
        meta["prev_starts"] = {
            k: [sum((s["meta"]["prev_starts"][k][0] for s in every), []), v[1]]
            for k, v in every[0]["meta"]["prev_starts"].items()}
        return {"arrays": arrays, "meta": meta}

    def share_worker_state(self, arrays: dict, meta: dict) -> tuple[dict, dict]:
        """This worker's rows of a whole-batch Worker state (arrays, meta), as
        ``gather_worker_state`` wrote it; DistributedError when the rows do not split."""
        if self.size == 1:
            return arrays, meta

        def rows(a, what):
            n = len(a)
            if n % self.size:
                raise DistributedError(f"the checkpoint carries {what} for {n} rows, which do not "
                                       f"split over {self.size} workers")
            b = n // self.size
            return a[self.rank * b:(self.rank + 1) * b]

        mine = {k: rows(a, k) for k, a in arrays.items()}
        meta = dict(meta)
        meta["prev_starts"] = {k: [list(rows(v[0], f"stream starts of {k}")), v[1]]
                               for k, v in meta.get("prev_starts", {}).items()}
        return mine, meta


class MPIWorld(World):
    """One rank of an MPI job (mpi4py's COMM_WORLD)."""

    def __init__(self, comm, mpi):
        super().__init__()
        self.comm, self.MPI = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank = comm.Split_type(mpi.COMM_TYPE_SHARED).Get_rank()

    def describe(self) -> str:
        lib = self.MPI.Get_library_version().strip().splitlines()[0].strip()
        return f"{self.size} workers (MPI: {lib})"

    def allreduce_grads(self, grads) -> None:
        t0 = time.perf_counter()
        flat = grads.flat
        if isinstance(flat, np.ndarray):
            self.comm.Allreduce(self.MPI.IN_PLACE, flat)
        else:  # CuPy: stage through the host (untested without a GPU)
            host = np.ascontiguousarray(to_host(flat))
            self.comm.Allreduce(self.MPI.IN_PLACE, host)
            flat[...] = grads.xp.asarray(host)
        flat /= self.size
        self.allreduce_seconds += time.perf_counter() - t0
        self.allreduce_count += 1

    def _sum(self, values: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, out)
        return out

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def gather(self, obj) -> list | None:
        return self.comm.gather(obj, root=0)

    def fail(self, line: str) -> None:
        """The line goes to the launcher's failure file when ``launch`` started this job
        (mpiexec may drop what an aborting rank wrote last; the launcher prints the file),
        else to stderr, given a moment to be forwarded; then MPI_Abort ends every rank."""
        line = f"error: worker {self.rank}: {line}"
        sys.stdout.flush()
        path, written = os.environ.get(FAILURE_FILE), False
        if path:
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                written = True
            except OSError:
                pass
        if not written:
            print(line, file=sys.stderr, flush=True)
            time.sleep(0.5)
        self.comm.Abort(1)


def join() -> World:
    """This process's World: a plain one-worker World outside an MPI launcher (or in a
    world of one), else this rank of the MPI job. DistributedError (one line) when mpi4py
    is missing or its MPI is not the launcher's (every rank would see a world of one)."""
    env = launcher_env()
    if env is None or env[1] <= 1:
        return World()
    try:
        from mpi4py import MPI  # noqa: PLC0415 - optional, only under mpiexec
    except (ImportError, RuntimeError) as e:
        raise DistributedError(f"started by mpiexec as {env[1]} workers, but mpi4py cannot be "
                               f"used ({e}); {INSTALL}") from None
    world = MPIWorld(MPI.COMM_WORLD, MPI)
    if world.size != env[1]:
        right = find_mpiexec() or "the mpiexec installed with mpi4py's MPI (pip install mpich)"
        raise DistributedError(f"mpiexec started {env[1]} workers but each sees an MPI world of "
                               f"{world.size}: that mpiexec is not the one of mpi4py's MPI "
                               f"library; use {right}")
    return world


# ------------------------------------------------------------------- launching
def find_mpiexec() -> str | None:
    """The ``mpiexec`` installed beside this Python (the ``mpich`` wheel puts it in the
    environment's scripts folder, which may not be on PATH), or None."""
    seen = []
    for folder in (sysconfig.get_path("scripts"), os.path.join(sys.prefix, "bin"),
                   os.path.dirname(sys.executable)):
        p = pathlib.Path(folder) / "mpiexec"
        if p not in seen and p.is_file() and os.access(p, os.X_OK):
            return str(p)
        seen.append(p)
    return None


def blas_threads(workers: int) -> int:
    """BLAS threads per worker when ``workers`` share this machine: its cores / workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


#: the variables that set BLAS / OpenMP threads
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _die_with_parent() -> None:
    """In the mpiexec child: get SIGTERM when the launcher dies (Linux), so a killed
    launcher never leaves its workers running."""
    try:
        import ctypes  # noqa: PLC0415
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: lines of the MPI runtime itself (MPICH's error stacks and hydra's banners), not of a worker
_RUNTIME_LINE = re.compile(
    r"^[\s=]*(Abort\(|Fatal error in |P?MPI[A-Z]?[A-Za-z]*_|MPID|MPIR|MPII|MPIC|\(unknown\)\(\)|"
    r"$|BAD TERMINATION|PID \d+ RUNNING AT|EXIT CODE:|CLEANING UP REMAINING|"
    r"YOU CAN IGNORE THE BELOW|YOUR APPLICATION TERMINATED|This typically refers to a problem|"
    r"Please see the FAQ page|\[proxy:|\[mpiexec@|\[cli_\d+\]|internal_|Other MPI error|"
    r"Communication error|Killed by signal)")


class RuntimeLines:
    """Relays the ranks' stderr as it comes, holding back the MPI runtime's own lines: when
    a worker is killed, the others' runtime stacks (16 lines, in some runs) are replaced by
    the launcher's one line; otherwise they are shown at the end."""

    def __init__(self):
        self.held: list[str] = []

    @staticmethod
    def is_runtime(line: str) -> bool:
        return bool(_RUNTIME_LINE.match(line))

    def relay(self, stream, out) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if self.is_runtime(line):
                self.held.append(line)
                continue
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                pass

    def flush(self, out) -> None:
        for line in self.held:
            out.write(line)
        self.held = []


def launch(argv: list[str], workers: int) -> int:
    """Run ``mpiexec -n workers python -m engine.train argv`` and return its exit status.

    Each worker gets cores / workers BLAS threads unless OPENBLAS_NUM_THREADS,
    OMP_NUM_THREADS or MKL_NUM_THREADS is set. mpiexec runs in its own process group:
    a Ctrl-C or SIGTERM reaches it once, forwarded by this launcher, and mpiexec hands
    it to every worker (they finish the step, checkpoint and exit 130/143). An exit
    status other than 0, 1, 2, 130 or 143 (a worker killed) is reported in one line and
    becomes 1. A worker that fails on its own writes its line to a file named by
    FAILURE_FILE, printed here (mpiexec may drop an aborting rank's last output), status 1.
    DistributedError when mpi4py or its mpiexec is missing."""
    try:
        import mpi4py  # noqa: F401, PLC0415 - the package only: MPI is initialised by the ranks
    except ImportError:
        raise DistributedError(f"{workers} workers need MPI: {INSTALL}; or run with "
                               f"--workers 1") from None
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise DistributedError(f"{workers} workers need MPI's mpiexec beside {sys.executable}, "
                               f"and there is none: {INSTALL}")
    env = dict(os.environ)
    threads = str(blas_threads(workers))
    for var in THREAD_VARS:
        env.setdefault(var, threads)
    fd, failures = tempfile.mkstemp(prefix="rnn-engine-failure-", suffix=".txt")
    os.close(fd)
    env[FAILURE_FILE] = failures
    cmd = [mpiexec, "-n", str(workers), sys.executable, "-m", "engine.train", *argv]
    held = RuntimeLines()
    try:
        proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=_die_with_parent,
                                stderr=subprocess.PIPE)
        relay = threading.Thread(target=held.relay, args=(proc.stderr, sys.stderr), daemon=True)
        relay.start()

        def forward(signum, frame):
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
            relay.join(timeout=10)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        reported = pathlib.Path(failures).read_text(encoding="utf-8").splitlines()
    finally:
        os.unlink(failures)
    if reported:
        print(reported[0], file=sys.stderr)
        return 1
    if rc < 0:
        return 128 - rc
    if rc in (0, 1, 2, 130, 143):
        held.flush(sys.stderr)   # an ordinary end: the runtime's lines, if any, are shown
        return rc
    # a worker was killed: MPICH's error stacks from the others say only that, at length
    print(f"error: a worker ended abnormally (mpiexec exit status {rc}); the others were "
          f"stopped; continue from the last checkpoint with --resume", file=sys.stderr)
    return 1
