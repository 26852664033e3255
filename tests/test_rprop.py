"""kRProp (an extension updater): the formula by hand, torch.optim.Rprop step for step in
float64, its settings' checks, and resume."""
from __future__ import annotations

import numpy as np
import pytest

from engine.proto import job_pb2 as pb
from engine.updaters import Updater, UpdaterError, describe
from test_updaters import make_param, upconf


def rprop_conf(lr=0.01, **rp):
    return upconf(pb.kRProp, lr=lr, **{f"rprop_conf__{k}": v for k, v in rp.items()})


def ref_rprop(w, g, prev, size, up, down, lo, hi):
    """One Rprop step on plain Python lists (the -variant torch implements)."""
    w, prev, size = list(w), list(prev), list(size)
    for i in range(len(w)):
        s = g[i] * prev[i]
        eta = up if s > 0 else down if s < 0 else 1.0
        size[i] = min(max(size[i] * eta, lo), hi)
        gi = 0.0 if s < 0 else g[i]
        w[i] -= (gi > 0) * size[i] - (gi < 0) * size[i]
        prev[i] = gi
    return w, prev, size


def test_steps_match_the_formula_flip_zero_and_clamps():
    # element 0 keeps its sign (grows to delta_max), 1 flips (no step, then restarts),
    # 2 has a zero gradient (step unchanged, no move), 3 shrinks to delta_min
    grads = [[1.0, 2.0, 0.0, 1.0], [3.0, -1.0, 0.0, -1.0], [0.5, -4.0, 0.0, 1.0],
             [2.0, 1.0, 5.0, -1.0], [1.0, 1.0, 5.0, 1.0], [1.0, -1.0, 5.0, -1.0]]
    hp = dict(eta_plus=1.5, eta_minus=0.25, delta_min=0.004, delta_max=0.15)
    p = make_param("w", [0.5, -1.0, 2.0, 0.0], lr_scale=2.0)
    up = Updater(rprop_conf(lr=0.05, **hp), [p], np)
    w, prev, size = [0.5, -1.0, 2.0, 0.0], [0.0] * 4, [0.1] * 4  # first step: lr * lr_scale
    for step, g in enumerate(grads):
        p.grad[...] = g
        up.update(step)
        w, prev, size = ref_rprop(w, g, prev, size, hp["eta_plus"], hp["eta_minus"],
                                  hp["delta_min"], hp["delta_max"])
        np.testing.assert_allclose(p.data, w, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(up.state["w"]["step"], size, rtol=1e-15)
        np.testing.assert_allclose(up.state["w"]["prev"], prev, rtol=1e-15)
        if step == 2:  # three zero gradients: element 2 kept its first step and did not move
            assert up.state["w"]["step"][2] == pytest.approx(0.1) and p.data[2] == 2.0
    assert up.state["w"]["step"][0] == pytest.approx(0.15)   # clamped at delta_max
    assert up.state["w"]["step"][3] == pytest.approx(0.004)  # clamped at delta_min


def _loss_and_grad(w, c):
    """f(w) = sum(c * sin(3w) + (w - 0.3)^2): gradients change sign along the way."""
    return float((c * np.sin(3 * w) + (w - 0.3) ** 2).sum()), 3 * c * np.cos(3 * w) + 2 * (w - 0.3)


def test_matches_torch_rprop_step_for_step_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w0, c = rng.standard_normal(7), rng.standard_normal(7)
    p = make_param("w", w0)
    hp = dict(eta_plus=1.3, eta_minus=0.4, delta_min=1e-4, delta_max=0.2)
    up = Updater(rprop_conf(lr=0.03, **hp), [p], np)
    tw = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Rprop([tw], lr=0.03, etas=(0.4, 1.3), step_sizes=(1e-4, 0.2))
    tc = torch.tensor(c, dtype=torch.float64)
    flips = 0
    for step in range(60):
        _, g = _loss_and_grad(p.data, c)
        p.grad[...] = g
        up.update(step)
        opt.zero_grad()
        (tc * torch.sin(3 * tw) + (tw - 0.3) ** 2).sum().backward()
        opt.step()
        np.testing.assert_allclose(p.data, tw.detach().numpy(), rtol=1e-13, atol=1e-15)
        flips += int((up.state["w"]["prev"] == 0).sum())
    assert flips > 0  # the walk did cross sign changes


@pytest.mark.parametrize("field,value,rule", [
    ("eta_plus", 1.0, "> 1"), ("eta_minus", 1.0, r"in \(0, 1\)"), ("eta_minus", 0.0, r"in \(0, 1\)"),
    ("delta_min", -1.0, ">= 0"), ("delta_max", 1e-7, ">= delta_min")])
def test_bad_settings_are_one_line(field, value, rule):
    with pytest.raises(UpdaterError, match=rf"updater\.rprop_conf\.{field} .*{rule}") as e:
        Updater(rprop_conf(**{field: value}), [make_param("w", [1.0])], np)
    assert "\n" not in str(e.value)


def test_a_schedule_is_refused_and_other_subconfs_too():
    conf = upconf(pb.kRProp, lr_kind=pb.kStep, step_conf__gamma=0.5, step_conf__change_freq=10)
    with pytest.raises(UpdaterError, match=r"kRProp .*base_lr.*learning_rate \{ type: kFixed"):
        Updater(conf, [make_param("w", [1.0])], np)
    conf = rprop_conf()
    conf.adam_conf.beta1 = 0.9
    with pytest.raises(UpdaterError, match="adam_conf"):
        Updater(conf, [make_param("w", [1.0])], np)


def test_state_before_any_update_holds_the_first_step_and_resume_is_exact():
    conf = rprop_conf(lr=0.02)
    p = make_param("w", [1.0, -1.0], lr_scale=0.5, dtype=np.float32)
    up = Updater(conf, [p], np)
    sd = up.state_dict()
    np.testing.assert_array_equal(sd["w/step"], np.float32([0.01, 0.01]))
    np.testing.assert_array_equal(sd["w/prev"], [0.0, 0.0])
    grads = [[1.0, 2.0], [1.0, -2.0], [0.5, -1.0], [2.0, 1.0]]
    for step, g in enumerate(grads[:2]):
        p.grad[...] = g
        up.update(step)
    q = make_param("w", p.data.copy(), lr_scale=0.5, dtype=np.float32)
    other = Updater(conf, [q], np)
    other.load_state_dict(up.state_dict())
    for step, g in enumerate(grads[2:], start=2):
        for prm, u in ((p, up), (q, other)):
            prm.grad[...] = g
            u.update(step)
    assert p.data.dtype == np.float32
    np.testing.assert_array_equal(p.data, q.data)


def test_describe():
    assert describe(rprop_conf(lr=0.001)) == \
        "RProp eta_plus=1.2 eta_minus=0.5 delta=[1e-06, 50] lr=0.001 (kFixed)"
