"""Tests of engine/updaters.py: schedules, the seven update rules, clipping, resume."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest

from engine.layers.base import Param
from engine.proto import job_pb2 as pb
from engine.updaters import (T_KEY, Updater, UpdaterError, describe, learning_rate,
                             pfloat)

ALL_TYPES = [pb.kSGD, pb.kNesterov, pb.kAdaGrad, pb.kRMSProp, pb.kAdaDelta, pb.kAdam,
             pb.kAdamMax]
TYPE_IDS = [pb.UpdaterType.Name(t) for t in ALL_TYPES]


# ------------------------------------------------------------------ helpers

def lrconf(kind=pb.kFixed, base=0.01, **sub):
    c = pb.LRGenProto()
    c.type = kind
    c.base_lr = base
    for path, value in sub.items():
        msg, field = path.split("__")
        target = getattr(c, msg)
        if isinstance(value, list):
            getattr(target, field).extend(value)
        else:
            setattr(target, field, value)
    return c


def upconf(kind, lr=0.1, lr_kind=pb.kFixed, **fields):
    c = pb.UpdaterProto()
    c.type = kind
    c.learning_rate.type = lr_kind
    c.learning_rate.base_lr = lr
    for name, value in fields.items():
        if "__" in name:
            msg, field = name.split("__")
            owner = c if msg in pb.UpdaterProto.DESCRIPTOR.fields_by_name else c.learning_rate
            setattr(getattr(owner, msg), field, value)
        else:
            setattr(c, name, value)
    return c


def make_param(name, data, lr_scale=1.0, wd_scale=1.0, dtype=np.float64):
    data = np.array(data, dtype=dtype)
    return Param(name=name, shape=data.shape, lr_scale=lr_scale, wd_scale=wd_scale, data=data,
                 grad=np.zeros_like(data))


# ------------------------------------------------------------------ pfloat

def test_pfloat_rounds_float32_readback():
    c = lrconf(base=0.002)
    assert c.base_lr != 0.002  # stored as float32
    assert pfloat(c.base_lr) == 0.002
    assert pfloat(0.0) == 0.0
    assert pfloat(1e-8) == 1e-8
    assert pfloat(123456789.0) == 123456800.0


# --------------------------------------------------------- learning rates

LR_CASES = [
    (lrconf(pb.kFixed, 0.002), [(0, 0.002), (1, 0.002), (100000, 0.002)]),
    (lrconf(pb.kInverseT, 0.1, inverset_conf__final_lr=100.0),
     [(0, 0.1), (100, 0.05), (300, 0.025), (50, 0.1 / 1.5)]),
    (lrconf(pb.kInverse, 0.01, inverse_conf__gamma=0.0001, inverse_conf__pow=0.75),
     [(0, 0.01), (10000, 0.01 * 0.5946035575013605), (30000, 0.01 * 0.3535533905932738)]),
    (lrconf(pb.kExponential, 0.1, exponential_conf__change_freq=1000),
     [(0, 0.1), (500, 0.1 / 1.4142135623730951), (1000, 0.05), (3000, 0.0125)]),
    (lrconf(pb.kLinear, 0.1, linear_conf__final_lr=0.01, linear_conf__change_freq=100),
     [(0, 0.1), (50, 0.055), (90, 0.019), (100, 0.01), (250, 0.01)]),
    (lrconf(pb.kStep, 0.002, step_conf__gamma=0.97, step_conf__change_freq=2000),
     [(0, 0.002), (1999, 0.002), (2000, 0.00194), (4500, 0.0018818), (6000, 0.002 * 0.912673)]),
    (lrconf(pb.kFixedStep, 0.5, fixedstep_conf__step=[0, 60000, 65000],
            fixedstep_conf__step_lr=[0.001, 0.0001, 0.00001]),
     [(0, 0.001), (59999, 0.001), (60000, 0.0001), (64999, 0.0001), (65000, 0.00001),
      (10 ** 6, 0.00001)]),
    # before the first threshold: step_lr[0], as SINGA's FixedStepLRGen
    (lrconf(pb.kFixedStep, 0.5, fixedstep_conf__step=[100, 200],
            fixedstep_conf__step_lr=[0.3, 0.2]),
     [(0, 0.3), (99, 0.3), (100, 0.3), (200, 0.2)]),
]


@pytest.mark.parametrize("conf,expected", LR_CASES,
                         ids=[pb.ChangeMethod.Name(c.type) + str(i)
                              for i, (c, _) in enumerate(LR_CASES)])
def test_learning_rate_schedules(conf, expected):
    for step, want in expected:
        got = learning_rate(conf, step)
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-12, abs=0), (step, got, want)


def test_fixed_and_fixedstep_exact_decimal():
    assert learning_rate(lrconf(pb.kFixed, 0.002), 7) == 0.002
    c = lrconf(pb.kFixedStep, 1.0, fixedstep_conf__step=[0, 10],
               fixedstep_conf__step_lr=[0.003, 0.0007])
    assert learning_rate(c, 10) == 0.0007


@pytest.mark.parametrize("sub,kind", [("step_conf", pb.kStep), ("linear_conf", pb.kLinear),
                                      ("exponential_conf", pb.kExponential)])
def test_bad_change_freq(sub, kind):
    for bad in (0, -5):
        c = lrconf(kind, 0.1, **{f"{sub}__change_freq": bad})
        with pytest.raises(UpdaterError, match=rf"learning_rate\.{sub}\.change_freq is {bad}"):
            learning_rate(c, 3)


def test_lr_errors():
    with pytest.raises(UpdaterError, match=r"learning_rate\.type kUserChange is not supported"):
        learning_rate(lrconf(pb.kUserChange), 0)
    c = lrconf(pb.kFixedStep, fixedstep_conf__step=[0, 10], fixedstep_conf__step_lr=[0.1])
    with pytest.raises(UpdaterError, match=r"fixedstep_conf has 2 step and 1 step_lr"):
        learning_rate(c, 0)
    with pytest.raises(UpdaterError, match=r"fixedstep_conf is empty"):
        learning_rate(lrconf(pb.kFixedStep), 0)
    c = lrconf(pb.kFixedStep, fixedstep_conf__step=[10, 5], fixedstep_conf__step_lr=[0.1, 0.2])
    with pytest.raises(UpdaterError, match=r"not strictly ascending"):
        learning_rate(c, 0)
    with pytest.raises(UpdaterError, match=r"inverset_conf\.final_lr"):
        learning_rate(lrconf(pb.kInverseT, inverset_conf__final_lr=0.0), 1)
    assert issubclass(UpdaterError, ValueError)
    # the Updater reports schedule errors at construction
    conf = upconf(pb.kSGD, lr_kind=pb.kStep, step_conf__change_freq=0)
    with pytest.raises(UpdaterError, match=r"step_conf\.change_freq"):
        Updater(conf, [make_param("w", [1.0])], np)


# ------------------------------------------------- hand-computed references

def ref_update(kind, w, g, st, lr, wd, t, hp):
    """One step, one element at a time, in plain Python floats."""
    w, st = list(w), {k: list(v) for k, v in st.items()}
    mom, rho, b1, b2, delta = hp["momentum"], hp["rho"], hp["b1"], hp["b2"], hp["delta"]
    for i in range(len(w)):
        gi = g[i] + wd * w[i]
        if kind == pb.kSGD:
            st["history"][i] = mom * st["history"][i] + lr * gi
            w[i] = w[i] - st["history"][i]
        elif kind == pb.kNesterov:
            prev = st["history"][i]
            st["history"][i] = mom * prev + lr * gi
            w[i] = w[i] - ((1 + mom) * st["history"][i] - mom * prev)
        elif kind == pb.kAdaGrad:
            st["history"][i] += gi * gi
            w[i] = w[i] - lr * gi / (math.sqrt(st["history"][i]) + delta)
        elif kind == pb.kRMSProp:
            st["history"][i] = rho * st["history"][i] + (1 - rho) * gi * gi
            w[i] = w[i] - lr * gi / (math.sqrt(st["history"][i]) + delta)
        elif kind == pb.kAdaDelta:
            h = rho * st["history"][i] + (1 - rho) * gi * gi
            u = gi * math.sqrt(st["update"][i] + delta) / math.sqrt(h + delta)
            st["history"][i] = h
            st["update"][i] = rho * st["update"][i] + (1 - rho) * u * u
            w[i] = w[i] - lr * u
        elif kind == pb.kAdam:
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * gi
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * gi * gi
            mhat = st["m"][i] / (1 - b1 ** t)
            vhat = st["v"][i] / (1 - b2 ** t)
            w[i] = w[i] - lr * mhat / (math.sqrt(vhat) + delta)
        elif kind == pb.kAdamMax:
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * gi
            st["u"][i] = max(b2 * st["u"][i], abs(gi))
            w[i] = w[i] - lr / (1 - b1 ** t) * st["m"][i] / (st["u"][i] + delta)
    return w, st


REF_SLOTS = {pb.kSGD: ["history"], pb.kNesterov: ["history"], pb.kAdaGrad: ["history"],
             pb.kRMSProp: ["history"], pb.kAdaDelta: ["history", "update"],
             pb.kAdam: ["m", "v"], pb.kAdamMax: ["m", "u"]}

HAND_HP = {"momentum": 0.9, "rho": 0.8, "b1": 0.7, "b2": 0.95, "delta": 0.001}


def hand_conf(kind):
    fields = dict(weight_decay=0.01, delta=HAND_HP["delta"],
                  step_conf__gamma=0.5, step_conf__change_freq=1)
    if kind in (pb.kSGD, pb.kNesterov):
        fields["momentum"] = HAND_HP["momentum"]
    if kind == pb.kRMSProp:
        fields["rmsprop_conf__rho"] = HAND_HP["rho"]
    if kind == pb.kAdaDelta:
        fields["adadelta_conf__rho"] = HAND_HP["rho"]
    if kind == pb.kAdam:
        fields.update(adam_conf__beta1=HAND_HP["b1"], adam_conf__beta2=HAND_HP["b2"])
    if kind == pb.kAdamMax:
        fields.update(adammax_conf__beta1=HAND_HP["b1"], adammax_conf__beta2=HAND_HP["b2"])
    # kStep gamma 0.5 every step: lr 0.1 at step 0, 0.05 at step 1
    return upconf(kind, lr=0.1, lr_kind=pb.kStep, **fields)


@pytest.mark.parametrize("kind", ALL_TYPES, ids=TYPE_IDS)
def test_two_steps_match_hand_computation(kind):
    w0 = {"a": [0.5, -1.2, 2.0, 0.0], "b": [0.3, -0.7]}
    scales = {"a": (0.5, 2.0), "b": (1.0, 1.0)}  # (lr_scale, wd_scale)
    grads = [{"a": [0.4, -0.3, 1.5, -0.01], "b": [-2.0, 0.25]},
             {"a": [-0.6, -0.2, 0.9, 0.02], "b": [1.0, -0.5]}]
    params = [make_param(n, w0[n], *scales[n]) for n in ("a", "b")]
    up = Updater(hand_conf(kind), params, np)
    ref_w = {n: list(w0[n]) for n in w0}
    ref_st = {n: {s: [0.0] * len(w0[n]) for s in REF_SLOTS[kind]} for n in w0}
    for step, lr0 in ((0, 0.1), (1, 0.05)):
        for p in params:
            p.grad[...] = grads[step][p.name]
        ids = [id(p.data) for p in params]
        out = up.update(step)
        assert out["lr"] == lr0
        norm = math.sqrt(sum(x * x for n in grads[step] for x in grads[step][n]))
        assert out["grad_norm"] == pytest.approx(norm, rel=1e-12)
        assert [id(p.data) for p in params] == ids
        for n in ("a", "b"):
            lr_scale, wd_scale = scales[n]
            ref_w[n], ref_st[n] = ref_update(kind, ref_w[n], grads[step][n], ref_st[n],
                                             lr0 * lr_scale, 0.01 * wd_scale, step + 1, HAND_HP)
        for p in params:
            np.testing.assert_allclose(p.data, ref_w[p.name], rtol=1e-12, atol=1e-15)
            for s in REF_SLOTS[kind]:
                np.testing.assert_allclose(up.state[p.name][s], ref_st[p.name][s],
                                           rtol=1e-12, atol=1e-15)


def test_sgd_momentum_explicit_numbers():
    conf = upconf(pb.kSGD, lr=0.1, momentum=0.9, weight_decay=0.01)
    p = make_param("w", [1.0, -2.0], lr_scale=2.0, wd_scale=0.5)
    up = Updater(conf, [p], np)
    p.grad[...] = [0.5, 0.25]
    up.update(0)
    # g = [0.505, 0.24], lr 0.2: v = [0.101, 0.048]
    np.testing.assert_allclose(p.data, [0.899, -2.048], rtol=1e-14)
    p.grad[...] = [0.5, 0.25]
    up.update(1)
    # g = [0.504495, 0.23976]; v = [0.191799, 0.091152]
    np.testing.assert_allclose(up.state["w"]["history"], [0.191799, 0.091152], rtol=1e-14)
    np.testing.assert_allclose(p.data, [0.707201, -2.139152], rtol=1e-14)


def test_sgd_without_momentum_keeps_no_state():
    p = make_param("w", [1.0, 2.0])
    up = Updater(upconf(pb.kSGD, lr=0.5), [p], np)
    p.grad[...] = [0.2, -0.4]
    up.update(0)
    np.testing.assert_allclose(p.data, [0.9, 2.2], rtol=1e-15)
    assert set(up.state_dict()) == {T_KEY}


def test_nesterov_explicit_numbers():
    p = make_param("w", [1.0])
    up = Updater(upconf(pb.kNesterov, lr=0.1, momentum=0.5), [p], np)
    p.grad[...] = [1.0]
    up.update(0)   # v = 0.1; w -= 1.5*0.1 - 0 -> 0.85
    np.testing.assert_allclose(p.data, [0.85], rtol=1e-15)
    p.grad[...] = [2.0]
    up.update(1)   # v = 0.05 + 0.2 = 0.25; w -= 1.5*0.25 - 0.5*0.1 = 0.325 -> 0.525
    np.testing.assert_allclose(p.data, [0.525], rtol=1e-14)


def test_adam_first_step_explicit_numbers():
    p = make_param("w", [1.0, -1.0])
    up = Updater(upconf(pb.kAdam, lr=0.1), [p], np)
    p.grad[...] = [0.5, -4.0]
    up.update(0)
    # bias-corrected first step: mhat = g, vhat = g^2 -> w -= 0.1 * g / (|g| + 1e-8)
    np.testing.assert_allclose(p.data, [1.0 - 0.1 * 0.5 / (0.5 + 1e-8),
                                        -1.0 + 0.1 * 4.0 / (4.0 + 1e-8)], rtol=1e-15)
    assert int(up.state_dict()[T_KEY]) == 1


def test_adagrad_explicit_numbers():
    p = make_param("w", [1.0])
    # delta 0 is refused (0/0 where a history is 0); 1e-30 vanishes next to sqrt(h) here
    up = Updater(upconf(pb.kAdaGrad, lr=0.1, delta=1e-30), [p], np)
    p.grad[...] = [2.0]
    up.update(0)   # h = 4, w -= 0.1*2/2
    np.testing.assert_allclose(p.data, [0.9], rtol=1e-15)
    p.grad[...] = [3.0]
    up.update(1)   # h = 13, w -= 0.1*3/sqrt(13)
    np.testing.assert_allclose(p.data, [0.9 - 0.3 / math.sqrt(13.0)], rtol=1e-15)


# ----------------------------------------------------------------- clipping

def test_elementwise_clipping():
    p = make_param("w", [0.0, 0.0, 0.0, 0.0])
    up = Updater(upconf(pb.kSGD, lr=1.0, clip_low=-0.1, clip_high=0.2), [p], np)
    p.grad[...] = [0.5, -0.5, 0.05, -0.3]
    out = up.update(0)
    np.testing.assert_allclose(p.data, [-0.2, 0.1, -0.05, 0.1], rtol=1e-15)
    assert out["grad_norm"] == pytest.approx(math.sqrt(0.25 + 0.25 + 0.0025 + 0.09))


def test_no_elementwise_clipping_when_bounds_equal():
    p = make_param("w", [0.0, 0.0])
    up = Updater(upconf(pb.kSGD, lr=1.0, clip_low=0.5, clip_high=0.5), [p], np)
    p.grad[...] = [3.0, -7.0]
    up.update(0)
    np.testing.assert_allclose(p.data, [-3.0, 7.0])


def test_clip_low_above_high_is_an_error():
    with pytest.raises(UpdaterError, match=r"clip_low \(1\) is above updater\.clip_high \(-1\)"):
        Updater(upconf(pb.kSGD, clip_low=1.0, clip_high=-1.0), [make_param("w", [1.0])], np)


def test_global_norm_clipping():
    a, b = make_param("a", [0.0]), make_param("b", [0.0, 0.0])
    up = Updater(upconf(pb.kSGD, lr=1.0, clip_norm=1.0), [a, b], np)
    a.grad[...] = [3.0]
    b.grad[...] = [0.0, -4.0]
    out = up.update(0)
    assert out["grad_norm"] == pytest.approx(5.0, rel=1e-15)
    np.testing.assert_allclose(a.data, [-0.6], rtol=1e-15)
    np.testing.assert_allclose(b.data, [0.0, 0.8], rtol=1e-15)
    # below the threshold: untouched
    a.grad[...] = [0.3]
    b.grad[...] = [0.0, 0.4]
    out = up.update(1)
    assert out["grad_norm"] == pytest.approx(0.5, rel=1e-15)
    np.testing.assert_allclose(a.data, [-0.9], rtol=1e-15)
    np.testing.assert_allclose(b.data, [0.0, 0.4], rtol=1e-15)


def test_global_then_elementwise_then_weight_decay():
    p = make_param("w", [1.0, 1.0])
    conf = upconf(pb.kSGD, lr=1.0, clip_norm=5.0, clip_low=-1.0, clip_high=1.0, weight_decay=0.5)
    up = Updater(conf, [p], np)
    p.grad[...] = [30.0, 40.0]      # norm 50 -> [3, 4] -> clip [1, 1] -> + 0.5*w = [1.5, 1.5]
    up.update(0)
    np.testing.assert_allclose(p.data, [-0.5, -0.5], rtol=1e-15)


# ----------------------------------------------------------------- dtypes

@pytest.mark.parametrize("kind", ALL_TYPES, ids=TYPE_IDS)
def test_float32_stays_float32(kind):
    rng = np.random.default_rng(0)
    params = [make_param("a", rng.normal(size=(3, 4)), lr_scale=0.5, wd_scale=2.0,
                         dtype=np.float32),
              make_param("b", rng.normal(size=5), dtype=np.float32)]
    up = Updater(hand_conf(kind), params, np)
    datas = [p.data for p in params]
    for step in range(3):
        for p in params:
            p.grad[...] = rng.normal(size=p.grad.shape)
        up.update(step)
    for p, d in zip(params, datas):
        assert p.data is d
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32
        assert np.all(np.isfinite(p.data))
        for arr in up.state[p.name].values():
            assert arr.dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in up.state_dict().items() if k != T_KEY)


# ------------------------------------------------------------------ resume

def resume_conf(kind):
    conf = hand_conf(kind)
    conf.clip_norm = 1.5
    conf.clip_low = -0.4
    conf.clip_high = 0.4
    conf.learning_rate.step_conf.change_freq = 2
    conf.learning_rate.step_conf.gamma = 0.7
    return conf


def resume_params(dtype, datas=None):
    rng = np.random.default_rng(42)
    shapes = [("layer/w", (4, 3), 1.0, 1.0), ("layer/b", (3,), 2.0, 0.0),
              ("other/w", (2, 2), 0.5, 3.0)]
    out = []
    for i, (name, shape, lrs, wds) in enumerate(shapes):
        data = rng.normal(size=shape) if datas is None else datas[i]
        out.append(make_param(name, data, lr_scale=lrs, wd_scale=wds, dtype=dtype))
    return out


def feed(params, step):
    rng = np.random.default_rng(1000 + step)
    for p in params:
        p.grad[...] = rng.normal(size=p.grad.shape) * 0.7


def run_steps(up, params, steps):
    for s in steps:
        feed(params, s)
        up.update(s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ALL_TYPES, ids=TYPE_IDS)
def test_resume_is_bitwise_exact(kind, dtype):
    total, k = 7, 3
    ref = resume_params(dtype)
    run_steps(Updater(resume_conf(kind), ref, np), ref, range(total))

    first = resume_params(dtype)
    up1 = Updater(resume_conf(kind), first, np)
    run_steps(up1, first, range(k))
    saved = up1.state_dict()
    # through a checkpoint file, as the engine would
    buf = io.BytesIO()
    np.savez(buf, **saved)
    buf.seek(0)
    with np.load(buf) as z:
        loaded = {key: z[key] for key in z.files}
    assert int(loaded[T_KEY]) == k

    second = resume_params(dtype, datas=[p.data.copy() for p in first])
    up2 = Updater(resume_conf(kind), second, np)
    up2.load_state_dict(loaded)
    run_steps(up2, second, range(k, total))
    for p, q in zip(ref, second):
        assert q.data.dtype == dtype
        assert np.array_equal(p.data, q.data), p.name

    # the test is sensitive: without the saved state the run diverges
    third = resume_params(dtype, datas=[p.data.copy() for p in first])
    run_steps(Updater(resume_conf(kind), third, np), third, range(k, total))
    assert not all(np.array_equal(p.data, q.data) for p, q in zip(ref, third))


def test_state_dict_keys_and_host_copies():
    params = resume_params(np.float64)
    up = Updater(resume_conf(pb.kAdam), params, np)
    before = up.state_dict()  # no update yet: zeros for every slot
    assert set(before) == {T_KEY, "layer/w/m", "layer/w/v", "layer/b/m", "layer/b/v",
                           "other/w/m", "other/w/v"}
    assert all(not np.any(v) for v in before.values())
    run_steps(up, params, range(2))
    sd = up.state_dict()
    assert int(sd[T_KEY]) == 2 and sd[T_KEY].dtype == np.int64
    assert sd["layer/w/m"] is not up.state["layer/w"]["m"]
    copy = sd["layer/w/m"].copy()
    run_steps(up, params, range(2, 3))
    assert np.array_equal(sd["layer/w/m"], copy)  # a snapshot, not a view
    # loading an all-zero, t=0 state is the same as a fresh updater
    fresh = Updater(resume_conf(pb.kAdam), resume_params(np.float64), np)
    fresh.load_state_dict(before)
    assert fresh.t == 0


def test_load_state_dict_errors():
    params = resume_params(np.float64)
    up = Updater(resume_conf(pb.kRMSProp), params, np)
    run_steps(up, params, range(1))
    sd = up.state_dict()
    bad = dict(sd)
    del bad["other/w/history"]
    with pytest.raises(UpdaterError, match=r"lacks key 'other/w/history'"):
        up.load_state_dict(bad)
    bad = dict(sd)
    del bad[T_KEY]
    with pytest.raises(UpdaterError, match=r"lacks key '@t'"):
        up.load_state_dict(bad)
    bad = dict(sd, **{"layer/b/history": np.zeros(4)})
    with pytest.raises(UpdaterError, match=r"'layer/b/history' has shape \(4,\) but param "
                                           r"'layer/b' has shape \(3,\)"):
        up.load_state_dict(bad)
    bad = dict(sd, **{"layer/b/m": np.zeros(3)})
    with pytest.raises(UpdaterError, match=r"unexpected key 'layer/b/m'"):
        up.load_state_dict(bad)
    # an Adam checkpoint into an RMSProp updater
    adam = Updater(resume_conf(pb.kAdam), resume_params(np.float64), np)
    with pytest.raises(UpdaterError, match=r"lacks key 'layer/w/history'"):
        up.load_state_dict(adam.state_dict())
    # a failed load leaves the updater as it was
    assert up.t == 1


# ------------------------------------------------------------------ errors

def test_unsupported_updater_type():
    p = make_param("w", [1.0])
    unset = pb.UpdaterProto()
    with pytest.raises(UpdaterError, match=r"updater\.type is kUserUpdater \(unset\).*kSGD"):
        Updater(unset, [p], np)
    with pytest.raises(UpdaterError, match=r"updater\.type is kUserUpdater, which is not"):
        Updater(upconf(pb.kUserUpdater), [p], np)


def test_singa_defaults_without_a_usable_value_are_errors():
    """SINGA's LRGenProto.type defaults to kUserChange and RMSPropProto.rho is required
    without a default: leaving either out is one line saying what to write."""
    p = make_param("w", [1.0])
    unset = pb.LRGenProto(base_lr=0.1)
    assert unset.type == pb.kUserChange
    with pytest.raises(UpdaterError, match=r"learning_rate\.type kUserChange \(unset: SINGA's "
                                           r"default\) is not supported; set learning_rate "
                                           r"\{ type: \.\.\. \} to one of kFixed"):
        learning_rate(unset, 0)
    conf = upconf(pb.kRMSProp)
    assert not conf.rmsprop_conf.HasField("rho") and conf.rmsprop_conf.rho == 0
    with pytest.raises(UpdaterError, match=r"kRMSProp needs updater\.rmsprop_conf\.rho \(it has "
                                           r"no default\); add rmsprop_conf \{ rho: 0\.9 \}"):
        Updater(conf, [p], np)
    # AdaDelta's rho and Adam's betas have SINGA's defaults
    assert Updater(upconf(pb.kAdaDelta), [p], np).rho == 0.9
    adam = Updater(upconf(pb.kAdam), [p], np)
    assert (adam.beta1, adam.beta2) == (0.9, 0.999)


def test_bad_hyperparameters():
    p = make_param("w", [1.0])
    with pytest.raises(UpdaterError, match=r"updater\.momentum is -0\.5; it must be >= 0"):
        Updater(upconf(pb.kSGD, momentum=-0.5), [p], np)
    with pytest.raises(UpdaterError, match=r"updater\.adam_conf\.beta1 is 1; it must be in \[0, 1\)"):
        Updater(upconf(pb.kAdam, adam_conf__beta1=1.0), [p], np)
    with pytest.raises(UpdaterError, match=r"updater\.rmsprop_conf\.rho is 1\.5"):
        Updater(upconf(pb.kRMSProp, rmsprop_conf__rho=1.5), [p], np)
    with pytest.raises(UpdaterError, match=r"several params named \['w'\]"):
        Updater(upconf(pb.kSGD), [p, make_param("w", [2.0])], np)


# ---------------------------------------------------------------- describe

def test_describe():
    conf = upconf(pb.kRMSProp, lr=0.002, lr_kind=pb.kStep, rmsprop_conf__rho=0.95,
                  step_conf__gamma=0.97, step_conf__change_freq=2000)
    assert describe(conf) == "RMSProp rho=0.95 lr=0.002 (kStep gamma=0.97 every 2000)"
    conf = upconf(pb.kSGD, lr=0.01, momentum=0.9, weight_decay=0.0005, clip_low=-5.0,
                  clip_high=5.0)
    assert describe(conf) == ("SGD momentum=0.9 lr=0.01 (kFixed) weight_decay=0.0005 "
                              "clip=[-5, 5]")
    conf = upconf(pb.kAdam, lr=0.001, lr_kind=pb.kFixedStep, clip_norm=5.0)
    conf.learning_rate.fixedstep_conf.step.extend([0, 1000])
    conf.learning_rate.fixedstep_conf.step_lr.extend([0.001, 0.0001])
    assert describe(conf) == ("Adam beta1=0.9 beta2=0.999 lr=0.001 "
                              "(kFixedStep 0:0.001 1000:0.0001) clip_norm=5")
    assert describe(upconf(pb.kAdaDelta, lr=1.0, delta=1e-6, adadelta_conf__rho=0.95)) == \
        "AdaDelta rho=0.95 lr=1 (kFixed) delta=1e-06"


# ------------------------------------------------------- the compiled rule

@pytest.mark.parametrize("decay", [0.01, 0.0], ids=["some-params-decay", "no-decay"])
@pytest.mark.parametrize("kind", [pb.kRMSProp, pb.kAdaGrad], ids=["rmsprop", "adagrad"])
def test_compiled_rule_equals_the_numpy_formulas_to_the_bit(kind, decay):
    """RMSProp and AdaGrad on float32 run element-wise clipping and the rule as one compiled
    pass (engine/layers/kernels) for every param without weight decay; params, gradients
    and state come out exactly as from the NumPy formulas (global-norm clipping before it,
    weight decay on the other params). float64 never takes it."""
    from engine.layers import kernels
    if not kernels.available():
        pytest.fail("the native kernels are not built: " + kernels.describe())

    def run(mode):
        kernels.use(mode)
        try:
            conf = resume_conf(kind)
            conf.weight_decay = decay
            params = resume_params(np.float32)
            up = Updater(conf, params, np)
            run_steps(up, params, range(6))
            compiled = [up._compiled(p) for p in params]
            return params, up, compiled
        finally:
            kernels.use(None)

    (native, up_n, compiled), (formulas, up_f, _) = run("native"), run("numpy")
    # with decay only "layer/b" (wd_scale 0) takes the compiled pass; without, all do
    assert compiled == ([False, True, False] if decay else [True, True, True])
    for p, q in zip(native, formulas):
        assert np.array_equal(p.data, q.data), p.name
        assert np.array_equal(p.grad, q.grad), p.name
        assert np.array_equal(up_n.state[p.name]["history"], up_f.state[p.name]["history"])
    # and the run moved the params (the comparison is not between two untouched copies)
    assert not np.array_equal(native[1].data, resume_params(np.float32)[1].data)
    f64 = resume_params(np.float64)
    assert not Updater(resume_conf(kind), f64, np)._compiled(f64[1])
