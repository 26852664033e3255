"""Where one char-rnn training step of the engine spends its time.

    python -m bench.profile [--case gru512|lstm512|rnn512|gru128|gru512x2] [--steps N]
                            [--warmup N] [--kernels native|numpy] [--clock wall|cpu]
                            [--gpu ID] [--json FILE]

Builds the engine's model of ``bench.charrnn`` for the case (same job, data and
updater), runs ``--warmup`` steps, then ``--steps`` steps with probes and as
many without, alternating, and prints per part of a step its median time over
the probed steps, in ms and as a share of the probed step:

- step GEMMs forward: each step's ``W_h h`` (or ``[W_h W_x b] [h; x; 1]`` when
  the input is folded into the step GEMM);
- gate maths forward / backward: the cell's element-wise step (the NumPy
  formulas or the fused kernels, ``engine/layers/cells.py``);
- input projections: ``W_x X + b`` for all steps at once as one GEMM (layers that
  neither fold their input nor read one-hot rows: any layer above the first), or, for
  one-hot input (a kOneHot source), the gather of W_x's columns (the LSTM and RNN: each
  step's, added to its W_h h, inside the step GEMM when the packed one runs, and then
  counted there; the GRU: there z's and r's, and c's per step, counted here, or else all
  steps' at once);
- step GEMMs backward: each step's ``W_h^T dpre`` (on the packed step GEMM with what rides
  along: the one-hot scatter into dW_x, the copy into the weight gradient's layout, the
  next step's dy);
- weight and input gradients: everything a recurrent layer does after its
  backward step loop, which is the weight-gradient GEMMs of the batch (and the
  input gradient's GEMM for a layer whose input needs one);
- recurrent layers, the rest: the rest of their block calls (Python per step,
  masking, state copies, the set-up of the stacked blocks);
- output layer + loss: the layers with params other than the recurrent ones,
  and the loss, forward and backward;
- data, one-hot, labels: loading the batch and the parameterless layers;
- updater: clipping and the RMSProp step;
- the rest: the step's time outside all of the above (zeroing gradients, the
  executor's own work).

The probes wrap public methods (the layers' block calls, their cells' forward
and backward, the worker's ``load``, the updater's ``update``) and time the
recurrent layers' ``xp.matmul`` through a thin proxy of their array module.
Each probe costs about a microsecond; the unprobed steps, timed alongside,
show the total without them.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.charrnn import CASES, EngineRunner  # noqa: E402

#: the clock of every probe: wall time, or this thread's CPU time (``--clock cpu``)
CLOCK = [time.perf_counter]

PARTS = (
    ("step_gemm_fwd", "step GEMMs forward"),
    ("gates_fwd", "gate maths forward"),
    ("proj_gemm", "input projections (GEMM, or one-hot gathers)"),
    ("step_gemm_bwd", "step GEMMs backward"),
    ("gates_bwd", "gate maths backward"),
    ("grads", "weight and input gradients (after the step loop)"),
    ("rec_rest", "recurrent layers, the rest"),
    ("output", "output layer + loss"),
    ("input", "data, one-hot, labels"),
    ("updater", "updater"),
    ("rest", "the rest"),
)


class Probes:
    """Per-step totals of the parts (``PARTS``) and the bookkeeping the probes share. While
    ``on`` is False the probes call straight through."""

    def __init__(self):
        self.on = False
        self.depth = 0           # nesting of the layer and updater probes
        self.step: dict = {}
        self.phase = None        # "fwd" / "bwd" inside a recurrent block call
        self.inner = 0.0         # time of the probed events inside the current block call
        self.last_end = 0.0      # end of the last probed event inside it

    def add(self, part: str, dt: float) -> None:
        self.step[part] = self.step.get(part, 0.0) + dt

    def event(self, part: str, t0: float) -> None:
        """An event inside a recurrent block call that began at ``t0`` and ends now."""
        t1 = CLOCK[0]()
        self.add(part, t1 - t0)
        self.inner += t1 - t0
        self.last_end = t1


class TimedXP:
    """The layer's array module with ``matmul`` timed (everything else passes through)."""

    def __init__(self, xp, probes: Probes, B: int):
        self._xp, self._probes, self._B = xp, probes, B

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def matmul(self, *args, **kwargs):
        p = self._probes
        if not p.on:
            return self._xp.matmul(*args, **kwargs)
        t0 = CLOCK[0]()
        r = self._xp.matmul(*args, **kwargs)
        step = r.shape[-1] == self._B       # a step's (rows, B) product; else a whole batch's
        if p.phase == "fwd":
            p.event("step_gemm_fwd" if step else "proj_gemm", t0)
        else:                                   # the weight gradients' GEMMs, after the loop
            p.event("step_gemm_bwd" if step else "grads", t0)
        return r


def _timed(fn, probes: Probes, part: str):
    """Time ``fn`` into ``part``; a call inside another probed call of this kind (a block
    call that runs the layer's per-copy ``forward``) counts once, in the outer one."""
    def call(*args, **kwargs):
        if not probes.on or probes.depth:
            return fn(*args, **kwargs)
        probes.depth += 1
        t0 = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            probes.add(part, CLOCK[0]() - t0)
            probes.depth -= 1
    return call


def _timed_event(fn, probes: Probes, part):
    """Time ``fn`` as an event of ``part`` (a name, or a function giving it at the call)."""
    def call(*args, **kwargs):
        if not probes.on:
            return fn(*args, **kwargs)
        t0 = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            probes.event(part if isinstance(part, str) else part(), t0)
    return call


def _timed_step(fn, probes: Probes, part: str):
    """A cell's step (``step_forward``/``step_backward``): its time less the probed events
    inside it (the step's product GEMMs, one-hot gathers) is ``part``, the gate maths."""
    def call(*args, **kwargs):
        if not probes.on:
            return fn(*args, **kwargs)
        inner0, t0 = probes.inner, CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = CLOCK[0]()
            own = (t1 - t0) - (probes.inner - inner0)
            probes.add(part, own)
            probes.inner += own
            probes.last_end = t1
    return call


def _timed_block(fn, probes: Probes, phase: str):
    """A recurrent layer's block call: what its probed events do not cover is "rec_rest",
    except after the last event of the backward call, which is "grads"."""
    def call(*args, **kwargs):
        if not probes.on:
            return fn(*args, **kwargs)
        probes.phase, probes.inner = phase, 0.0
        t0 = probes.last_end = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = CLOCK[0]()
            tail = t1 - probes.last_end if phase == "bwd" else 0.0
            probes.add("grads", tail)
            probes.add("rec_rest", (t1 - t0) - probes.inner - tail)
            probes.phase = None
    return call


def install(runner: EngineRunner, probes: Probes, B: int) -> None:
    """Wrap the runner's layers, worker and updater with probes (instance attributes)."""
    for lay in runner.net.layers.values():
        if lay.recurrent:
            lay.xp = TimedXP(lay.xp, probes, B)
            for fwd, bwd in (("step_forward", "step_backward"),
                             ("formula_forward", "formula_backward")):
                setattr(lay, fwd, _timed_step(getattr(lay, fwd), probes, "gates_fwd"))
                setattr(lay, bwd, _timed_step(getattr(lay, bwd), probes, "gates_bwd"))
            lay.forward_block = _timed_block(lay.forward_block, probes, "fwd")
            lay.backward_block = _timed_block(lay.backward_block, probes, "bwd")
            continue
        part = "output" if (lay.has_params or lay.is_loss) else "input"
        for name in ("forward", "backward", "forward_block", "backward_block"):
            setattr(lay, name, _timed(getattr(lay, name), probes, part))
    runner.worker.load = _timed(runner.worker.load, probes, "input")
    runner.updater.update = _timed(runner.updater.update, probes, "updater")


class gathers_probed:
    """While open, the recurrent layers' one-hot column gathers (``cells.gather_columns`` and
    ``cells.gather_steps``, module functions the layers call by name) count as input
    projections, and the packed step GEMM (``kernels.step_gemm``, ``kernels.Packed``: the
    packing of W_h counts too) as the step GEMMs of its phase."""

    def __init__(self, probes: Probes):
        self.probes = probes

    NAMES = ("gather_columns", "gather_steps")
    STEP = ("step_gemm", "Packed")

    def __enter__(self):
        from engine.layers import cells, kernels
        self.cells, self.kernels = cells, kernels
        self.plain = {n: getattr(cells, n) for n in self.NAMES}
        for n, fn in self.plain.items():
            setattr(cells, n, _timed_event(fn, self.probes, "proj_gemm"))
        self.plain_step = {n: getattr(kernels, n) for n in self.STEP}
        for n, fn in self.plain_step.items():
            setattr(kernels, n, _timed_event(fn, self.probes, self.step_part))
        return self

    def step_part(self) -> str:
        return "step_gemm_fwd" if self.probes.phase == "fwd" else "step_gemm_bwd"

    def __exit__(self, *exc):
        for n, fn in self.plain.items():
            setattr(self.cells, n, fn)
        for n, fn in self.plain_step.items():
            setattr(self.kernels, n, fn)


def profile(case: str, steps: int, warmup: int, gpu: int | None = None) -> dict:
    """Probed and plain step times of ``case``, alternating (see the module docstring);
    on the CuPy stand-in also the host<->device traffic of the plain steps."""
    B = CASES[case][2]
    probes = Probes()
    with tempfile.TemporaryDirectory() as tmp, gathers_probed(probes):
        runner = EngineRunner(case, pathlib.Path(tmp), "auto", gpu)
        traffic = getattr(runner.backend.xp, "TRAFFIC", None)   # the stand-in counts
        counted = {}
        install(runner, probes, B)
        for _ in range(warmup):
            runner.step()
        plain, probed, totals = [], [], []
        for _ in range(steps):
            probes.on = False
            if traffic is not None:
                traffic.reset()
            t0 = CLOCK[0]()
            runner.step()
            plain.append(CLOCK[0]() - t0)
            if traffic is not None:
                for k, v in traffic.snapshot().items():
                    counted[k] = counted.get(k, 0) + v
            probes.on, probes.step = True, {}
            t0 = CLOCK[0]()
            runner.step()
            total = CLOCK[0]() - t0
            probes.on = False
            step = dict(probes.step)
            step["rest"] = total - sum(step.values())
            probed.append(step)
            totals.append(total)
        note = runner.describe()
    parts = {k: statistics.median(s.get(k, 0.0) for s in probed) for k, _ in PARTS}
    return {"case": case, "steps": steps, "warmup": warmup, "executor": note["executor"],
            "kernels": note["kernels"], "blas": note["blas"],
            "probed_step_s": statistics.median(totals), "plain_step_s": statistics.median(plain),
            "parts_s": parts, "device": runner.backend.describe(),
            "traffic_per_step": ({k: v / steps for k, v in counted.items()}
                                 if traffic is not None else None)}


def print_profile(r: dict) -> None:
    cell, H, B, T, V, layers = CASES[r["case"]]
    print(f"{r['case']}: {cell} {H} x{layers} batch {B} unroll {T} vocab {V}; {r['executor']}; "
          f"{r.get('device', 'numpy')}")
    print(f"{r['kernels']}; {r['blas']}")
    print(f"{r['steps']} probed steps and {r['steps']} plain ones alternating, after "
          f"{r['warmup']} warm-up steps; medians per part; {r['clock']} time")
    total = r["probed_step_s"]
    print(f"{'part':<52}{'ms/step':>9}{'share':>8}")
    for k, label in PARTS:
        v = r["parts_s"][k]
        print(f"{label:<52}{v * 1000:9.2f}{100 * v / total:7.1f}%")
    print(f"{'step (probed)':<52}{total * 1000:9.2f}")
    print(f"{'step (plain, no probes)':<52}{r['plain_step_s'] * 1000:9.2f}")
    t = r.get("traffic_per_step")
    if t is not None:
        print(f"host<->device per step (plain steps): {t['h2d']:g} copies to the device "
              f"({t['h2d_bytes']:,.0f} bytes), {t['d2h']:g} from it ({t['d2h_bytes']:,.0f} bytes), "
              f"{t['sync']:g} scalar waits")
    elif r.get("device", "").startswith("cupy"):
        print("host<->device per step: counted on the CuPy stand-in only "
              "(python tests/standin/run.py -m bench.profile --gpu 0)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="lstm512", choices=list(CASES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kernels", choices=["native", "numpy"],
                    help="the cell kernels (default: RNN_ENGINE_KERNELS, else native)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time (default), or the main thread's CPU time: with "
                         "OPENBLAS_NUM_THREADS=1 a measure that other processes on a busy "
                         "machine hardly disturb")
    ap.add_argument("--gpu", type=int, help="profile the step on this GPU (CuPy); under "
                    "tests/standin/run.py the stand-in's host<->device counts are printed")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    from engine.backend import keep_freed_memory
    from engine.layers import kernels
    keep_freed_memory()   # as engine.train does
    if a.kernels:
        kernels.use(a.kernels)
    CLOCK[0] = time.perf_counter if a.clock == "wall" else time.thread_time
    r = profile(a.case, a.steps, a.warmup, a.gpu)
    r["clock"] = a.clock
    print_profile(r)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
