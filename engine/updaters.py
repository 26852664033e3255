"""Optimisers (UpdaterProto) and learning-rate schedules (LRGenProto).

Learning rate at global step ``s`` (``learning_rate(conf, s)``), by ChangeMethod:

  kFixed        base_lr
  kInverseT     base_lr / (1 + s / inverset_conf.final_lr)
  kInverse      base_lr * (1 + inverse_conf.gamma * s) ^ (-inverse_conf.pow)
  kExponential  base_lr / 2 ^ (s / exponential_conf.change_freq)        (no floor)
  kLinear       (1 - r) * base_lr + r * linear_conf.final_lr,
                r = min(s / linear_conf.change_freq, 1)   (stays at final_lr after the ramp)
  kStep         base_lr * step_conf.gamma ^ floor(s / step_conf.change_freq)
  kFixedStep    step_lr[i] for the largest i with step[i] <= s; step_lr[0] before step[0]
                (as SINGA's FixedStepLRGen)

Each update (``Updater.update(step)``), for every param p with summed gradient g = p.grad:

  1. grad_norm = sqrt(sum over params of sum(g^2))             (reported, before clipping)
  2. if clip_norm > 0 and grad_norm > clip_norm: g *= clip_norm / grad_norm   (all params)
  3. if clip_low != clip_high: g = clip(g, clip_low, clip_high)   (element-wise)
  4. if weight_decay > 0: g += weight_decay * p.wd_scale * w
  5. lr = learning_rate(conf.learning_rate, step) * p.lr_scale, then the rule of
     ``Updater`` below updates w = p.data in place.

Steps 2-4 modify ``p.grad`` in place (as SINGA does): after ``update`` it holds the
gradient the rule used. The worker zeroes it before the next batch anyway.

Float proto fields are stored as float32, so 0.002 reads back as 0.0020000000949...;
every float read from a conf (and a Param's lr_scale / wd_scale) goes through
``pfloat``, which rounds to 7 significant digits, so schedules see the value written
in the job file. All scalars are Python floats: they never upcast float32 arrays.
"""
from __future__ import annotations

import math

import numpy as np

from engine.backend import to_host
from engine.layers import kernels
from engine.common import number_problem
from engine.proto import job_pb2 as pb

#: state_dict key of the update counter t (param keys are "<param name>/<slot>")
T_KEY = "@t"


class UpdaterError(ValueError):
    """A bad updater / learning-rate configuration or a state that does not fit."""


def pfloat(x) -> float:
    """A float proto field as the decimal the user wrote: rounded to 7 significant digits."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.7g}")


# ------------------------------------------------------------ learning rate

_CHANGE_NAMES = {pb.kFixed: "kFixed", pb.kInverseT: "kInverseT", pb.kInverse: "kInverse",
                 pb.kExponential: "kExponential", pb.kLinear: "kLinear", pb.kStep: "kStep",
                 pb.kFixedStep: "kFixedStep"}


def _change_name(t: int) -> str:
    try:
        return pb.ChangeMethod.Name(t)
    except ValueError:
        return str(t)


#: the sub-conf each change method reads (kFixed reads none)
_LR_SUBCONF = {pb.kFixedStep: "fixedstep_conf", pb.kStep: "step_conf", pb.kLinear: "linear_conf",
               pb.kExponential: "exponential_conf", pb.kInverse: "inverse_conf",
               pb.kInverseT: "inverset_conf"}


def _number(field: str, value: float, rule: str = "", ok: bool = True) -> float:
    """``value`` when it is finite and ``ok``; else UpdaterError with config.number_problem's
    line ("<field> is <value>; it must be [a finite number] <rule>")."""
    bad = number_problem(field, value, rule, ok)
    if bad:
        raise UpdaterError(bad)
    return value


def _freq(conf: pb.LRGenProto, sub: str, what: str) -> int:
    freq = int(getattr(conf, sub).change_freq)
    if freq <= 0:
        raise UpdaterError(f"updater.learning_rate.{sub}.change_freq is {freq} for "
                           f"{_change_name(conf.type)}; set it to a positive number of steps "
                           f"({what})")
    return freq


def _fixedstep_table(conf: pb.LRGenProto) -> tuple[list[int], list[float]]:
    fs = conf.fixedstep_conf
    steps = [int(s) for s in fs.step]
    lrs = [pfloat(v) for v in fs.step_lr]
    if len(steps) != len(lrs):
        raise UpdaterError(f"updater.learning_rate.fixedstep_conf has {len(steps)} step and "
                           f"{len(lrs)} step_lr entries; give one step_lr per step")
    if not steps:
        raise UpdaterError("updater.learning_rate.fixedstep_conf is empty for kFixedStep; give "
                           "at least one 'step: N step_lr: X' pair")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise UpdaterError(f"updater.learning_rate.fixedstep_conf.step {steps} is not strictly "
                           f"ascending; list the thresholds in increasing order")
    for i, v in enumerate(lrs):
        _number(f"updater.learning_rate.fixedstep_conf.step_lr[{i}]", v, ">= 0", v >= 0)
    return steps, lrs


def _refuse_other_subconfs(conf, own, subconfs, where: str, chosen: str) -> None:
    """UpdaterError when ``conf`` sets a sub-conf other than ``own``, the one the ``chosen``
    type reads: it would be ignored without a word."""
    for sub in subconfs:
        if sub != own and conf.HasField(sub):
            raise UpdaterError(f"{where}.{sub} does not apply to {chosen}"
                               + (f" (which reads {own})" if own else "") + f"; remove {sub}")


def check_schedule(conf: pb.LRGenProto) -> None:
    """UpdaterError (one line naming the field) for a schedule that cannot run:
    a sub-conf of another change method (it would be ignored), base_lr not a finite
    number >= 0, and per method: kStep gamma finite > 0; kInverse gamma and pow finite
    >= 0; kInverseT final_lr finite > 0; kLinear final_lr finite >= 0; kStep, kLinear,
    kExponential change_freq > 0; kFixedStep step ascending, one step_lr (finite >= 0)
    per step. An unsupported change method is an error too."""
    t = conf.type
    own = _LR_SUBCONF.get(t)
    if t in _CHANGE_NAMES:
        _refuse_other_subconfs(conf, own, _LR_SUBCONF.values(), "updater.learning_rate",
                               f"learning_rate.type {_change_name(t)}")
    base = pfloat(conf.base_lr)
    _number("updater.learning_rate.base_lr", base, ">= 0", base >= 0)
    field = f"updater.learning_rate.{own}"
    if t == pb.kFixed:
        return
    if t == pb.kInverseT:
        final = pfloat(conf.inverset_conf.final_lr)
        _number(f"{field}.final_lr", final, "> 0", final > 0)
    elif t == pb.kInverse:
        gamma, power = pfloat(conf.inverse_conf.gamma), pfloat(conf.inverse_conf.pow)
        _number(f"{field}.gamma", gamma, ">= 0", gamma >= 0)
        _number(f"{field}.pow", power, ">= 0", power >= 0)
    elif t == pb.kExponential:
        _freq(conf, own, "steps per halving")
    elif t == pb.kLinear:
        _freq(conf, own, "length of the ramp")
        final = pfloat(conf.linear_conf.final_lr)
        _number(f"{field}.final_lr", final, ">= 0", final >= 0)
    elif t == pb.kStep:
        _freq(conf, own, "steps between decays")
        gamma = pfloat(conf.step_conf.gamma)
        _number(f"{field}.gamma", gamma, "> 0", gamma > 0)
    elif t == pb.kFixedStep:
        _fixedstep_table(conf)
    else:
        unset = " (unset: SINGA's default)" if not conf.HasField("type") else ""
        raise UpdaterError(f"updater.learning_rate.type {_change_name(t)}{unset} is not "
                           f"supported; set learning_rate {{ type: ... }} to one of "
                           f"{', '.join(_CHANGE_NAMES.values())}")


def learning_rate(conf: pb.LRGenProto, step: int) -> float:
    """Learning rate of schedule ``conf`` at global step ``step`` (see the module docstring);
    UpdaterError for a schedule ``check_schedule`` refuses."""
    step = int(step)
    if step < 0:
        raise UpdaterError(f"learning rate asked for step {step}; steps start at 0")
    check_schedule(conf)
    t = conf.type
    base = pfloat(conf.base_lr)
    if t == pb.kFixed:
        return base
    if t == pb.kInverseT:
        return base / (1.0 + step / pfloat(conf.inverset_conf.final_lr))
    if t == pb.kInverse:
        gamma = pfloat(conf.inverse_conf.gamma)
        return base * (1.0 + gamma * step) ** (-pfloat(conf.inverse_conf.pow))
    if t == pb.kExponential:
        return base / 2.0 ** (step / conf.exponential_conf.change_freq)
    if t == pb.kLinear:
        r = min(step / conf.linear_conf.change_freq, 1.0)
        return (1.0 - r) * base + r * pfloat(conf.linear_conf.final_lr)
    if t == pb.kStep:
        return base * pfloat(conf.step_conf.gamma) ** (step // conf.step_conf.change_freq)
    steps, lrs = _fixedstep_table(conf)  # kFixedStep (check_schedule refused the rest)
    idx = 0
    for i, s in enumerate(steps):
        if step >= s:
            idx = i
        else:
            break
    return lrs[idx]


def _describe_lr(conf: pb.LRGenProto) -> str:
    t = conf.type
    name = _change_name(t)
    if t == pb.kInverseT:
        return f"{name} final_lr={pfloat(conf.inverset_conf.final_lr):g}"
    if t == pb.kInverse:
        return (f"{name} gamma={pfloat(conf.inverse_conf.gamma):g} "
                f"pow={pfloat(conf.inverse_conf.pow):g}")
    if t == pb.kExponential:
        return f"{name} halve every {conf.exponential_conf.change_freq}"
    if t == pb.kLinear:
        return (f"{name} to {pfloat(conf.linear_conf.final_lr):g} over "
                f"{conf.linear_conf.change_freq}")
    if t == pb.kStep:
        return f"{name} gamma={pfloat(conf.step_conf.gamma):g} every {conf.step_conf.change_freq}"
    if t == pb.kFixedStep:
        pairs = " ".join(f"{s}:{pfloat(v):g}" for s, v in zip(conf.fixedstep_conf.step,
                                                               conf.fixedstep_conf.step_lr))
        return f"{name} {pairs}".rstrip()
    return name


# ------------------------------------------------------------------ updater

_UPDATER_NAMES = {pb.kSGD: "SGD", pb.kNesterov: "Nesterov", pb.kAdaGrad: "AdaGrad",
                  pb.kRMSProp: "RMSProp", pb.kAdaDelta: "AdaDelta", pb.kAdam: "Adam",
                  pb.kAdamMax: "AdamMax", pb.kRProp: "RProp"}


def describe(conf: pb.UpdaterProto) -> str:
    """One line for the training banner, e.g. 'RMSProp rho=0.95 lr=0.002 (kStep gamma=0.97 every 2000)'."""
    t = conf.type
    parts = [_UPDATER_NAMES.get(t) or _updater_type_name(t)]
    if t in (pb.kSGD, pb.kNesterov) and pfloat(conf.momentum) > 0:
        parts.append(f"momentum={pfloat(conf.momentum):g}")
    elif t == pb.kRMSProp:
        parts.append(f"rho={pfloat(conf.rmsprop_conf.rho):g}")
    elif t == pb.kAdaDelta:
        parts.append(f"rho={pfloat(conf.adadelta_conf.rho):g}")
    elif t == pb.kAdam:
        parts.append(f"beta1={pfloat(conf.adam_conf.beta1):g} beta2={pfloat(conf.adam_conf.beta2):g}")
    elif t == pb.kAdamMax:
        parts.append(f"beta1={pfloat(conf.adammax_conf.beta1):g} "
                     f"beta2={pfloat(conf.adammax_conf.beta2):g}")
    elif t == pb.kRProp:
        c = conf.rprop_conf
        parts.append(f"eta_plus={pfloat(c.eta_plus):g} eta_minus={pfloat(c.eta_minus):g} "
                     f"delta=[{pfloat(c.delta_min):g}, {pfloat(c.delta_max):g}]")
    parts.append(f"lr={pfloat(conf.learning_rate.base_lr):g} ({_describe_lr(conf.learning_rate)})")
    if t not in (pb.kSGD, pb.kNesterov) and conf.HasField("delta"):
        parts.append(f"delta={pfloat(conf.delta):g}")
    if pfloat(conf.weight_decay) > 0:
        parts.append(f"weight_decay={pfloat(conf.weight_decay):g}")
    if pfloat(conf.clip_norm) > 0:
        parts.append(f"clip_norm={pfloat(conf.clip_norm):g}")
    if pfloat(conf.clip_low) != pfloat(conf.clip_high):
        parts.append(f"clip=[{pfloat(conf.clip_low):g}, {pfloat(conf.clip_high):g}]")
    return " ".join(parts)


#: the sub-conf each updater type reads (kSGD, kNesterov, kAdaGrad read none)
_UPDATER_SUBCONF = {pb.kRMSProp: "rmsprop_conf", pb.kAdaDelta: "adadelta_conf",
                    pb.kAdam: "adam_conf", pb.kAdamMax: "adammax_conf", pb.kRProp: "rprop_conf"}


def check_conf(conf: pb.UpdaterProto) -> None:
    """UpdaterError (one line naming the field) for an updater that cannot run as written:
    a sub-conf of another updater type (it would be ignored); momentum, weight_decay and
    clip_norm not finite >= 0; delta not finite > 0; clip_low or clip_high not finite, or
    clip_low > clip_high; the chosen type's rho not in [0, 1] or beta1/beta2 not in [0, 1);
    and every rule of ``check_schedule`` for the learning rate. The type itself is
    checked when an Updater is built (a job that does not train needs none)."""
    t = conf.type
    own = _UPDATER_SUBCONF.get(t)
    if t in _UPDATER_NAMES:
        _refuse_other_subconfs(conf, own, _UPDATER_SUBCONF.values(), "updater",
                               f"updater.type {_updater_type_name(t)}")
    momentum, decay = pfloat(conf.momentum), pfloat(conf.weight_decay)
    delta, norm = pfloat(conf.delta), pfloat(conf.clip_norm)
    low, high = pfloat(conf.clip_low), pfloat(conf.clip_high)
    _number("updater.momentum", momentum, ">= 0", momentum >= 0)
    _number("updater.weight_decay", decay, ">= 0", decay >= 0)
    _number("updater.delta", delta, "> 0 (it keeps the divisions finite)", delta > 0)
    _number("updater.clip_low", low)
    _number("updater.clip_high", high)
    if low > high:
        raise UpdaterError(f"updater.clip_low ({low:g}) is above updater.clip_high "
                           f"({high:g}); set clip_low < clip_high, or both to 0 "
                           f"to turn element-wise clipping off")
    _number("updater.clip_norm", norm, ">= 0 (0 = off)", norm >= 0)
    if t == pb.kRMSProp and not conf.rmsprop_conf.HasField("rho"):  # SINGA: required, no default
        raise UpdaterError("kRMSProp needs updater.rmsprop_conf.rho (it has no default); "
                           "add rmsprop_conf { rho: 0.9 } or the decay you want")
    if t in (pb.kRMSProp, pb.kAdaDelta):
        rho = pfloat(getattr(conf, own).rho)
        _number(f"updater.{own}.rho", rho, "in [0, 1]", 0 <= rho <= 1)
    elif t in (pb.kAdam, pb.kAdamMax):
        c = getattr(conf, own)
        for name in ("beta1", "beta2"):
            beta = pfloat(getattr(c, name))
            _number(f"updater.{own}.{name}", beta, "in [0, 1)", 0 <= beta < 1)
    elif t == pb.kRProp:
        c = conf.rprop_conf
        up, down = pfloat(c.eta_plus), pfloat(c.eta_minus)
        lo, hi = pfloat(c.delta_min), pfloat(c.delta_max)
        _number("updater.rprop_conf.eta_plus", up, "> 1", up > 1)
        _number("updater.rprop_conf.eta_minus", down, "in (0, 1)", 0 < down < 1)
        _number("updater.rprop_conf.delta_min", lo, ">= 0", lo >= 0)
        _number("updater.rprop_conf.delta_max", hi, f">= delta_min ({lo:g})", hi >= lo)
        if conf.learning_rate.HasField("type") and conf.learning_rate.type != pb.kFixed:
            raise UpdaterError(f"updater.type kRProp takes its first step size from "
                               f"learning_rate.base_lr and adapts it itself, so learning_rate.type "
                               f"{_change_name(conf.learning_rate.type)} would be ignored; set "
                               f"learning_rate {{ type: kFixed base_lr: ... }}")
    check_schedule(conf.learning_rate)


def _updater_type_name(t: int) -> str:
    try:
        return pb.UpdaterType.Name(t)
    except ValueError:
        return str(t)


def _slots(conf: pb.UpdaterProto) -> tuple[str, ...]:
    t = conf.type
    if t == pb.kSGD:
        return ("history",) if pfloat(conf.momentum) > 0 else ()
    if t in (pb.kNesterov, pb.kAdaGrad, pb.kRMSProp):
        return ("history",)
    if t == pb.kAdaDelta:
        return ("history", "update")
    if t == pb.kAdam:
        return ("m", "v")
    if t == pb.kAdamMax:
        return ("m", "u")
    if t == pb.kRProp:
        return ("prev", "step")
    raise UpdaterError(f"updater.type is {_updater_type_name(t)}"
                       f"{' (unset)' if not conf.HasField('type') else ''}, which is not "
                       f"supported; set updater {{ type: ... }} to one of "
                       f"{', '.join('k' + n for n in _UPDATER_NAMES.values())}")


def grad_norm_squared(params, xp):
    """sum of squares of all params' gradients, where they are (a 0-d array of ``xp``, no
    device wait; 0.0 without params)."""
    total = 0.0
    for p in params:
        g = p.grad.ravel()
        total = total + xp.vdot(g, g)
    return total


def global_grad_norm(params, xp) -> float:
    """sqrt(sum of squares of all params' gradients), as a Python float (one device sync)."""
    return math.sqrt(float(grad_norm_squared(params, xp)))


class Updater:
    """Applies one optimiser step to a list of params (the distinct, untied owners).

    With g the (clipped, weight-decayed) gradient, w the param, lr the scheduled rate
    times p.lr_scale, delta = conf.delta, t the number of updates done so far + 1:

      kSGD       v = momentum*v + lr*g;  w -= v            (momentum 0: w -= lr*g, no state)
      kNesterov  v_prev = v;  v = momentum*v + lr*g;  w -= (1+momentum)*v - momentum*v_prev
      kAdaGrad   h += g^2;  w -= lr*g / (sqrt(h) + delta)
      kRMSProp   h = rho*h + (1-rho)*g^2;  w -= lr*g / (sqrt(h) + delta)   (rmsprop_conf.rho)
      kAdaDelta  h = rho*h + (1-rho)*g^2;  u = g*sqrt(d+delta)/sqrt(h+delta);
                 d = rho*d + (1-rho)*u^2;  w -= lr*u                      (adadelta_conf.rho)
      kAdam      m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
                 w -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + delta)        (adam_conf)
      kAdamMax   m = b1*m + (1-b1)*g;  u = max(b2*u, |g|);
                 w -= lr/(1-b1^t) * m / (u + delta)                       (adammax_conf)
      kRProp     s = sign(g * prev);  step = clip(step * (eta_plus if s > 0, eta_minus if
                 s < 0, else 1), delta_min, delta_max);  g' = 0 where s < 0, else g;
                 w -= sign(g') * step;  prev = g'       (rprop_conf; torch.optim.Rprop)
                 step starts at learning_rate.base_lr * lr_scale, prev at 0. Rprop reads
                 only signs, so it is meant for full batches (the same objective every
                 step: batchsize = the whole store), as the numpy BPTT tutorial uses it.

    State slots (v/h: "history", d: "update", Adam "m" "v", AdamMax "m" "u", RProp
    "prev" "step") are allocated lazily with xp.zeros_like(p.data) (RProp's "step" with
    the first step size); ``state_dict`` / ``load_state_dict``
    carry them and t so that a resumed run is bitwise identical to an uninterrupted one.
    ``p.data`` is updated in place (it stays the same array object).
    """

    def __init__(self, conf: pb.UpdaterProto, params, xp):
        self.conf = conf
        self.xp = xp
        self.params = list(params)
        self.type = conf.type
        self.slots = _slots(conf)
        names = [p.name for p in self.params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UpdaterError(f"the updater got several params named {dup}; give every "
                               f"param a unique name (tied params are passed once, as the owner)")
        check_conf(conf)
        self.momentum = pfloat(conf.momentum)
        self.weight_decay = pfloat(conf.weight_decay)
        self.delta = pfloat(conf.delta)
        self.clip_low = pfloat(conf.clip_low)
        self.clip_high = pfloat(conf.clip_high)
        self.clip_norm = pfloat(conf.clip_norm)
        self.rho = self.beta1 = self.beta2 = 0.0
        if self.type == pb.kRMSProp:
            self.rho = pfloat(conf.rmsprop_conf.rho)
        elif self.type == pb.kAdaDelta:
            self.rho = pfloat(conf.adadelta_conf.rho)
        elif self.type in (pb.kAdam, pb.kAdamMax):
            c = conf.adam_conf if self.type == pb.kAdam else conf.adammax_conf
            self.beta1, self.beta2 = pfloat(c.beta1), pfloat(c.beta2)
        #: number of updates done so far
        self.t = 0
        #: param name -> {slot: array}
        self.state: dict[str, dict] = {}
        self._scratch: dict[tuple, list] = {}

    # ------------------------------------------------------------- buffers
    def _slot_arrays(self, p) -> dict:
        st = self.state.get(p.name)
        if st is None:
            st = {s: self._fresh(p, s) for s in self.slots}
            self.state[p.name] = st
        return st

    def _fresh(self, p, slot: str):
        """A slot before the first update: zeros, or RProp's first step size."""
        if slot == "step":
            return self.xp.full_like(p.data, pfloat(self.conf.learning_rate.base_lr)
                                     * pfloat(p.lr_scale))
        return self.xp.zeros_like(p.data)

    def _tmp(self, like, n: int) -> list:
        """n scratch arrays shaped like ``like`` (shared by params of one shape and dtype)."""
        key = (tuple(like.shape), np.dtype(like.dtype).str)
        bufs = self._scratch.setdefault(key, [])
        while len(bufs) < n:
            bufs.append(self.xp.empty_like(like))
        return bufs[:n]

    # -------------------------------------------------------------- update
    def update(self, step: int, grad_norm: float | None = None) -> dict:
        """One optimiser step for all params; returns {"lr": base scheduled lr, "grad_norm": ...}.

        ``lr`` is the schedule's value at ``step`` (before any param's lr_scale);
        ``grad_norm`` is the global gradient norm before clipping (pass it when the
        caller has already computed ``global_grad_norm`` of these gradients).
        """
        xp = self.xp
        lr0 = learning_rate(self.conf.learning_rate, step)
        norm = global_grad_norm(self.params, xp) if grad_norm is None else grad_norm
        if self.clip_norm > 0 and norm > self.clip_norm:
            scale = self.clip_norm / norm
            for p in self.params:
                p.grad *= scale
        clip = self.clip_low != self.clip_high
        t = self.t + 1
        compiled = False
        for p in self.params:
            g, w = p.grad, p.data
            lr = lr0 * pfloat(p.lr_scale)
            if self._compiled(p):  # clipping and the rule in one compiled pass
                kernels.adarule(w, g, self._slot_arrays(p)["history"], lr, self.rho, self.delta,
                                self.type == pb.kAdaGrad,
                                (self.clip_low, self.clip_high) if clip else None)
                compiled = True
                continue
            if clip:
                xp.clip(g, self.clip_low, self.clip_high, out=g)
            if self.weight_decay > 0:
                wd = self.weight_decay * pfloat(p.wd_scale)
                if wd != 0.0:
                    (tmp,) = self._tmp(w, 1)
                    xp.multiply(w, wd, out=tmp)
                    g += tmp
            self._rule(p, g, w, lr, t)
        if compiled:     # the rule's threads sleep now: OpenBLAS's GEMMs come next
            kernels.park()
        self.t = t
        return {"lr": lr0, "grad_norm": norm}

    def _compiled(self, p) -> bool:
        """Whether ``p``'s update runs as one compiled pass (engine/layers/kernels): RMSProp
        or AdaGrad, no weight decay on it, float32 NumPy arrays (the kernel gives the
        NumPy formulas' numbers to the bit)."""
        if self.type not in (pb.kRMSProp, pb.kAdaGrad):
            return False
        if self.weight_decay > 0 and self.weight_decay * pfloat(p.wd_scale) != 0.0:
            return False
        return kernels.usable_flat(p.data, p.grad, self._slot_arrays(p)["history"])

    def _rule(self, p, g, w, lr: float, t: int) -> None:
        xp = self.xp
        kind = self.type
        st = self._slot_arrays(p)
        if kind == pb.kSGD:
            (tmp,) = self._tmp(w, 1)
            xp.multiply(g, lr, out=tmp)  # lr*g
            if self.momentum > 0:
                v = st["history"]
                v *= self.momentum
                v += tmp
                w -= v
            else:
                w -= tmp
        elif kind == pb.kNesterov:
            m = self.momentum
            v = st["history"]
            (tmp,) = self._tmp(w, 1)
            xp.multiply(v, m, out=tmp)      # m*v_prev
            xp.multiply(g, lr, out=v)       # lr*g
            v += tmp                        # v = m*v_prev + lr*g
            w += tmp                        # w + m*v_prev ...
            xp.multiply(v, 1.0 + m, out=tmp)
            w -= tmp                        # ... - (1+m)*v
        elif kind in (pb.kAdaGrad, pb.kRMSProp):
            h = st["history"]
            (tmp,) = self._tmp(w, 1)
            xp.multiply(g, g, out=tmp)
            if kind == pb.kAdaGrad:
                h += tmp
            else:
                h *= self.rho
                tmp *= 1.0 - self.rho
                h += tmp
            xp.sqrt(h, out=tmp)
            tmp += self.delta
            xp.divide(g, tmp, out=tmp)
            tmp *= lr
            w -= tmp
        elif kind == pb.kAdaDelta:
            rho, delta = self.rho, self.delta
            h, d = st["history"], st["update"]
            u, tmp = self._tmp(w, 2)
            xp.multiply(g, g, out=tmp)
            tmp *= 1.0 - rho
            h *= rho
            h += tmp                        # h = rho*h + (1-rho)*g^2
            xp.add(d, delta, out=u)
            xp.sqrt(u, out=u)
            u *= g
            xp.add(h, delta, out=tmp)
            xp.sqrt(tmp, out=tmp)
            u /= tmp                        # u = g*sqrt(d+delta)/sqrt(h+delta)
            xp.multiply(u, u, out=tmp)
            tmp *= 1.0 - rho
            d *= rho
            d += tmp                        # d = rho*d + (1-rho)*u^2
            u *= lr
            w -= u
        elif kind == pb.kAdam:
            b1, b2 = self.beta1, self.beta2
            m, v = st["m"], st["v"]
            (tmp,) = self._tmp(w, 1)
            m *= b1
            xp.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2
            xp.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            xp.divide(v, 1.0 - b2 ** t, out=tmp)             # vhat
            xp.sqrt(tmp, out=tmp)
            tmp += self.delta
            xp.divide(m, tmp, out=tmp)
            tmp *= lr / (1.0 - b1 ** t)
            w -= tmp
        elif kind == pb.kAdamMax:
            b1, b2 = self.beta1, self.beta2
            m, u = st["m"], st["u"]
            (tmp,) = self._tmp(w, 1)
            m *= b1
            xp.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            u *= b2
            xp.abs(g, out=tmp)
            xp.maximum(u, tmp, out=u)
            xp.add(u, self.delta, out=tmp)
            xp.divide(m, tmp, out=tmp)
            tmp *= lr / (1.0 - b1 ** t)
            w -= tmp
        elif kind == pb.kRProp:
            c = self.conf.rprop_conf
            prev, size = st["prev"], st["step"]
            (tmp,) = self._tmp(w, 1)
            xp.multiply(g, prev, out=tmp)
            flipped = tmp < 0
            size *= xp.where(tmp > 0, pfloat(c.eta_plus),
                             xp.where(flipped, pfloat(c.eta_minus), 1.0)).astype(size.dtype)
            xp.clip(size, pfloat(c.delta_min), pfloat(c.delta_max), out=size)
            xp.copyto(prev, g)
            prev[flipped] = 0                # no step, and no sign to compare, after a flip
            xp.sign(prev, out=tmp)
            tmp *= size
            w -= tmp
        else:  # pragma: no cover - _slots rejected it in __init__
            raise UpdaterError(f"updater.type {_updater_type_name(kind)} is not supported")

    # --------------------------------------------------------------- state
    def _expected_keys(self) -> list[str]:
        return [T_KEY] + [f"{p.name}/{s}" for p in self.params for s in self.slots]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the optimiser state: "<param>/<slot>" arrays and T_KEY (int64 t)."""
        out: dict[str, np.ndarray] = {T_KEY: np.array(self.t, dtype=np.int64)}
        for p in self.params:
            st = self.state.get(p.name)
            for s in self.slots:
                key = f"{p.name}/{s}"
                if st is None:  # no update yet: what _slot_arrays would allocate
                    out[key] = to_host(self._fresh(p, s)).copy()
                else:
                    out[key] = to_host(st[s]).copy()  # a snapshot, not a view
        return out

    def load_state_dict(self, d) -> None:
        """Restore a ``state_dict``: the keys must be exactly those this updater keeps."""
        expected = self._expected_keys()
        missing = [k for k in expected if k not in d]
        if missing:
            raise UpdaterError(f"updater state lacks key {missing[0]!r}"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                               f"the checkpoint was written by another updater type or net "
                               f"({describe(self.conf)} expects {len(expected)} keys)")
        extra = sorted(set(d) - set(expected))
        if extra:
            raise UpdaterError(f"updater state has unexpected key {extra[0]!r}"
                               f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                               f"the checkpoint was written by another updater type or net")
        t = np.asarray(d[T_KEY])
        if t.shape != () or not np.issubdtype(t.dtype, np.integer) or int(t) < 0:
            raise UpdaterError(f"updater state key {T_KEY!r} must be a non-negative integer "
                               f"scalar, got {t!r}")
        new_state: dict[str, dict] = {}
        for p in self.params:
            st = {}
            for s in self.slots:
                key = f"{p.name}/{s}"
                a = d[key]
                shape = tuple(np.shape(a))
                if shape != tuple(p.data.shape):
                    raise UpdaterError(f"updater state key {key!r} has shape {shape} but "
                                       f"param {p.name!r} has shape {tuple(p.data.shape)}")
                st[s] = self.xp.array(a, dtype=p.data.dtype, copy=True)
            if self.slots:
                new_state[p.name] = st
        self.state = new_state
        self.t = int(t)
