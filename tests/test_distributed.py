"""Data-parallel training (engine/distributed.py): the gradient buffer, each worker's share
of the batches, and, under mpiexec with two ranks, the specification: N = 2 workers with
B/2 rows each give one worker's params with B, in float64 to 1e-10 and float32 to 1e-5;
one voice; exact resume with the same or another number of workers; faults."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mpijobs
from charjobs import ROOT, char_job
from engine import distributed as dist
from engine import checkpoint as ckpt
from engine.backend import make_backend
from engine.config import Phase, load_job
from engine.layers.base import InputLayer, LayerError
from engine.net import Net
from engine.proto import job_pb2 as pb
from engine.train import Trainer, build_parser
from engine.unroll import unroll
from engine.updaters import global_grad_norm
from engine.workspace import net_info

needs_mpi = pytest.mark.skipif(bool(mpijobs.mpi_ready()), reason=mpijobs.mpi_ready() or "ready")


def build_net(path, tmp, phase=Phase.TRAIN, dtype=np.float64) -> Net:
    job = load_job(path)
    return Net(unroll(job.neuralnet, phase), make_backend(None, dtype),
               net_info(path, tmp / "ws-net", 0), seed=0)


# ------------------------------------------------------------ gradient buffer
@pytest.mark.parametrize("rnn", ["kGRU", "kLSTM", "kRNN"])
def test_every_gradient_is_a_view_of_one_buffer(tmp_path, rnn):
    """Every param's grad lies in net.grads.flat, without overlap and covering it; a
    recurrent gate group's stacked grad is one stretch of it (no copy per step)."""
    net = build_net(char_job(tmp_path, rnn=rnn, stacked=True), tmp_path)
    flat = net.grads.flat
    assert flat.ndim == 1 and flat.flags.c_contiguous
    assert sum(p.grad.size for p in net.params) == flat.size
    for p in net.params:
        assert np.shares_memory(p.grad, flat), p.name
    marks = np.zeros(flat.size, int)
    for p in net.params:
        p.grad[...] = 0
        flat[...] = 0
        p.grad[...] = 1
        marks += flat.astype(int)
    assert (marks == 1).all()  # disjoint and covering
    for name in ("rnn1", "rnn2"):
        stacked = net.layers[name].weights.stacked
        assert set(stacked) == (set() if rnn == "kRNN" else {"x", "h", "b"})  # kRNN: 1 per group
        for _, grad in stacked.values():
            assert np.shares_memory(grad, flat)


def test_zero_leaves_claimed_grads_to_their_first_contribution(tmp_path):
    """``zero`` fills no param of a layer that claims its gradients: the first contribution
    of the batch is written (``overwrites`` True once, then False: later ones add), a
    partly written group is zero-filled before it is added to, and ``settle`` zeroes the
    params that nothing reached."""
    from engine.layers.base import add_grad, overwrites
    net = build_net(char_job(tmp_path, rnn="kGRU", stacked=True), tmp_path)
    grads = net.grads
    assert {p.name for p in grads.lazy} == {p.name for p in net.params}
    assert grads.filled == []
    grads.flat[...] = 7
    grads.zero()
    assert (grads.flat == 7).all()                       # nothing filled
    first, second, *rest = net.params
    assert overwrites((first,)) and not overwrites((first,))
    add_grad(second, np.ones(second.shape))              # written: 1, not 7 + 1
    add_grad(second, np.ones(second.shape))              # then added
    assert (second.grad == 2).all()
    group = rest[:2]
    add_grad(group[0], np.ones(group[0].shape))
    assert not overwrites(group)                         # one of them written already ...
    assert (group[1].grad == 0).all()                    # ... the other filled first
    grads.settle()
    assert all((p.grad == 0).all() for p in rest[2:])
    assert (first.grad == 7).all()                       # claimed: the caller's to write
    assert not overwrites((first,))                      # after settle: plain adds


def test_buffer_holds_grads_of_tied_params_and_training_fills_it(tmp_path):
    """A param tied forward (an earlier layer shares a later layer's) is laid out with its
    owner; the tied layer's group stays unfused, and backward fills the buffer."""
    job = char_job(tmp_path, stacked=True)
    text = job.read_text().replace(
        'type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 16 }',
        'type: kGRU srclayers: "onehot" gru_conf { dim_hidden: 16 } param { name: "a" } '
        'param { name: "b" } param { name: "c" } param { name: "d" share_from: "zh2" }').replace(
        'type: kGRU srclayers: "rnn1" gru_conf { dim_hidden: 16 }',
        'type: kGRU srclayers: "rnn1" gru_conf { dim_hidden: 16 } param { name: "zx2" } '
        'param { name: "rx2" } param { name: "cx2" } param { name: "zh2" }')
    job.write_text(text)
    net = build_net(job, tmp_path)
    names = [p.name for p in net.params]
    assert "zh2" in names and "d" not in names
    assert names.index("zh2") < names.index("zx2")  # the owner list meets the tie first
    assert "h" not in net.layers["rnn1"].weights.stacked
    assert set(net.layers["rnn2"].weights.stacked) == {"x", "h", "b"}
    for p in net.params:
        assert np.shares_memory(p.grad, net.grads.flat), p.name
    from engine.planner import make_worker
    w, _ = make_worker(net, 0)
    w.run_batch(train=True)
    pieces = np.concatenate([p.grad.ravel() for p in net.grads.params])
    np.testing.assert_array_equal(pieces, net.grads.flat)
    assert np.abs(net.grads.flat).max() > 0


# ------------------------------------------------------------------- shares
def test_char_streams_split_into_contiguous_groups(tmp_path):
    """Worker r reads streams r·b .. r·b+b-1 of the batch one worker reads, across a wrap
    of the streams; its stream starts are those rows'; the cursor is the same."""
    job = char_job(tmp_path, batch=6, unroll=40)
    one = build_net(job, tmp_path)
    parts = [build_net(job, tmp_path) for _ in range(3)]
    for r, net in enumerate(parts):
        net.inputs[0].take_share(r, 3)
        assert net.inputs[0].batchsize == 2
    wrapped = False
    for _ in range(12):
        whole = one.inputs[0]
        whole.load_batch()
        got = []
        for net in parts:
            lay = net.inputs[0]
            lay.load_batch()
            got.append((np.asarray(lay.batch), lay.stream_starts, lay.new_sequence))
            assert lay.cursor_state() == whole.cursor_state()
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), whole.batch)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), whole.stream_starts)
        assert all(g[2] == whole.new_sequence for g in got)
        wrapped |= whole.epoch > 0
        for lay in [whole] + [n.inputs[0] for n in parts]:
            lay.end_batch()
    assert wrapped


def test_record_rows_split_the_same_seeded_permutation(tmp_path):
    """Worker r takes rows r·b .. r·b+b-1 of each batch of the shuffled epoch order,
    across epochs (a new permutation each): x, labels and masks together are the batch."""
    job = mpijobs.record_job(tmp_path, n=20, batch=8)
    one = build_net(job, tmp_path)
    parts = [build_net(job, tmp_path) for _ in range(2)]
    for r, net in enumerate(parts):
        net.inputs[0].take_share(r, 2)
    for _ in range(7):  # 20 rows, batches of 8: two a epoch, four epochs
        whole = one.inputs[0]
        whole.load_batch()
        for net in parts:
            net.inputs[0].load_batch()
            assert net.inputs[0].cursor_state() == whole.cursor_state()
        for attr in ("xb", "yb", "maskb"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(n.inputs[0], attr) for n in parts]), getattr(whole, attr))
    assert whole.epoch == 3


def test_a_batch_that_does_not_split_is_one_error_naming_the_layer(tmp_path):
    net = build_net(char_job(tmp_path, batch=4), tmp_path)
    with pytest.raises(LayerError) as e:
        net.inputs[0].take_share(0, 3)
    assert str(e.value) == ('layer "data": batch size 4 cannot be split evenly over 3 workers; '
                            'use a batch size divisible by 3')


def test_an_input_layer_without_a_split_refuses_several_workers():
    class Feed(InputLayer):
        def load_batch(self):
            pass

    lay = Feed(pb.LayerProto(name="feed", type=pb.kCSVInput))
    lay.take_share(0, 1)  # one worker: nothing to do
    with pytest.raises(LayerError, match='layer "feed": kCSVInput cannot split its batches over 2'):
        lay.take_share(1, 2)


# -------------------------------------------------------------- the world
def test_workers_from_flag_and_job():
    job = pb.JobProto()
    assert dist.workers_of_job(job) is None and dist.workers_wanted(None, job) == 1
    job.cluster.nworker_groups = 2
    job.cluster.nworkers_per_group = 3
    assert dist.workers_wanted(None, job) == 6
    assert dist.workers_wanted(4, job) == 4  # the flag wins
    with pytest.raises(dist.DistributedError, match="--workers 0: give at least 1"):
        dist.workers_wanted(0, job)
    job.cluster.nworkers_per_group = 0
    with pytest.raises(dist.DistributedError, match="cluster.nworkers_per_group is 0"):
        dist.workers_wanted(None, job)


def test_world_size_that_contradicts_the_job_is_named():
    class Two(dist.World):
        size = 2

    job = pb.JobProto()
    dist.check_world(Two(), None, job)  # the job says nothing
    job.cluster.nworker_groups = 4
    with pytest.raises(dist.DistributedError, match=r"asks for 4 worker\(s\).*but 2 were started"):
        dist.check_world(Two(), None, job)
    dist.check_world(Two(), 2, job)  # the flag wins over the job
    with pytest.raises(dist.DistributedError, match="--workers 3, but mpiexec started 2"):
        dist.check_world(Two(), 3, job)


def test_rank_seeds():
    assert dist.rank_seed(5, 0, 1) == 5
    seeds = {dist.rank_seed(5, r, 4) for r in range(4)}
    assert len(seeds) == 4 and seeds == {dist.rank_seed(5, r, 4) for r in range(4)}
    assert dist.rank_seed(6, 0, 4) not in seeds


def test_one_world_is_the_identity():
    w = dist.World()
    m = {"loss": [3.0, 2.0], "objective": [1.5, 0.0]}
    assert w.reduce_metrics(m, signal.SIGTERM) == (m, signal.SIGTERM)
    assert w.agree(None) is None and w.agree((2, "bad")) == (2, "bad")
    assert w.same_params([]) is None


def test_without_mpi4py_several_workers_say_how_to_install(tmp_path):
    job = char_job(tmp_path)
    code = ("import sys; sys.modules['mpi4py'] = None; from engine.train import main; "
            f"sys.exit(main([{str(job)!r}, '--workers', '2']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: 2 workers need MPI: pip install 'rnn-engine[mpi]' (mpi4py and the mpich "
        "runtime); or run with --workers 1"]


def test_clipping_is_active_in_the_equivalence_jobs(tmp_path):
    """The equivalence jobs clip: the first batch's gradients exceed the value bound
    (char-rnn) and the norm bound (record LSTM), so clipping is part of what is compared."""
    for job, check in ((mpijobs.char_job_mpi(tmp_path / "c"), lambda ps: max(
            float(np.abs(p.grad).max()) for p in ps) > 0.01),
            (mpijobs.record_job(tmp_path / "r"), lambda ps: global_grad_norm(ps, np) > 0.05)):
        args = build_parser().parse_args([str(job), "--workspace", str(job.parent / "ws-clip")])
        t = Trainer(load_job(job), str(job), args)
        t.build()
        t.workers[Phase.TRAIN].run_batch(train=True)
        assert check(t.main.params), job


# ------------------------------------------------------------- two ranks
def _equivalent(tmp_path, job, dtype, tol, mpiexec):
    one = mpijobs.train(job, "--workspace", tmp_path / f"one-{dtype}", "--dtype", dtype)
    two = mpijobs.train(job, "--workspace", tmp_path / f"two-{dtype}", "--dtype", dtype,
                        workers=2, mpiexec=mpiexec)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, ma = mpijobs.state(tmp_path / f"one-{dtype}", 10)
    b, mb = mpijobs.state(tmp_path / f"two-{dtype}", 10)
    assert a["param/" + next(k[6:] for k in a if k.startswith("param/"))].dtype == np.dtype(dtype)
    # float64: every element to 1e-10 of its array's largest. float32: each array to 1e-5
    # in norm; element-wise, RMSProp's g / sqrt(h) lifts the rounding of nearly cancelled
    # gradients to the learning rate's scale (one worker's own planned and reference
    # executors differ by 5e-5 element-wise on the char-rnn job), so float32 is compared
    # by norm.
    worst = mpijobs.worst_relative(a, b, norm=dtype == "float32")
    assert worst <= tol, f"{dtype}: params, updater or carried state differ by {worst:.3g}"
    assert ma["worker"]["cursors"] == mb["worker"]["cursors"]
    assert ma["worker"]["prev_starts"] == mb["worker"]["prev_starts"]
    assert mb["workers"] == 2 and ma["workers"] == 1
    # one voice: rank 0 prints each line once and logs what one worker logs
    assert two.stdout.count("step     10  train") == 1 and two.stdout.count("done: 10 steps") == 1
    assert "data parallel: 2 workers" in two.stdout and "allreduce:" in two.stdout
    ra, rb = mpijobs.records(tmp_path / f"one-{dtype}"), mpijobs.records(tmp_path / f"two-{dtype}")
    assert [(x["step"], x["phase"]) for x in ra] == [(x["step"], x["phase"]) for x in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "accuracy"):
            assert y[k] == pytest.approx(x[k], rel=tol, abs=tol), (x["step"], x["phase"], k)
    return worst


@needs_mpi
def test_two_workers_equal_one_char_rnn_gru_carry_rmsprop_value_clipping(tmp_path):
    job = mpijobs.char_job_mpi(tmp_path)
    print("float64", _equivalent(tmp_path, job, "float64", 1e-10, mpiexec=True))
    print("float32", _equivalent(tmp_path, job, "float32", 1e-5, mpiexec=False))


@needs_mpi
def test_two_workers_equal_one_record_lstm_masks_shuffle_adam_norm_clipping(tmp_path):
    job = mpijobs.record_job(tmp_path)
    print("float64", _equivalent(tmp_path, job, "float64", 1e-10, mpiexec=False))
    print("float32", _equivalent(tmp_path, job, "float32", 1e-5, mpiexec=True))


@needs_mpi
def test_resume_with_the_same_and_with_another_number_of_workers(tmp_path):
    """Same N: bitwise the uninterrupted run. 1 -> 2 and 2 -> 1: the streams and their
    carried state are re-partitioned exactly (float64 to 1e-10 of the straight run)."""
    job = mpijobs.char_job_mpi(tmp_path)
    runs = {"straight2": [(10, 2)], "split2": [(5, 2), (10, 2)],
            "straight1": [(10, 1)], "one-then-two": [(5, 1), (10, 2)],
            "two-then-one": [(5, 2), (10, 1)]}
    for name, legs in runs.items():
        for k, (steps, n) in enumerate(legs):
            extra = ["--resume"] if k else []
            r = mpijobs.train(job, "--workspace", tmp_path / name, "--dtype", "float64",
                              "--steps", steps, *extra, workers=n)
            assert r.returncode == 0, (name, r.stderr)
            if k:
                assert "resumed from" in r.stdout and "at step 5" in r.stdout
    a, _ = mpijobs.state(tmp_path / "straight2", 10)
    b, _ = mpijobs.state(tmp_path / "split2", 10)
    assert mpijobs.worst_relative(a, b) == 0.0
    one, _ = mpijobs.state(tmp_path / "straight1", 10)
    for name in ("one-then-two", "two-then-one"):
        c, meta = mpijobs.state(tmp_path / name, 10)
        assert mpijobs.worst_relative(one, c) <= 1e-10, name


@needs_mpi
def test_start_up_errors_are_one_line_exit_2(tmp_path):
    job = mpijobs.char_job_mpi(tmp_path)
    r = mpijobs.train(job, "--workspace", tmp_path / "a", workers=3)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f'error: {job}: layer "data": batch size 4 cannot be split evenly over 3 workers; '
        f"use a batch size divisible by 3, or --workers 2 or 4 (nothing was started)"]
    r = mpijobs.train(job, "--workspace", tmp_path / "a", "--workers", 3, workers=2, mpiexec=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --workers 3, but mpiexec started 2 worker(s); give mpiexec -n 3 or --workers 2"]
    job.write_text(job.read_text().replace("cluster {", "cluster { nworker_groups: 4"))
    r = mpijobs.train(job, "--workspace", tmp_path / "a", workers=2, mpiexec=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "the job asks for 4 worker(s)" in r.stderr and "--workers 2" in r.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()


@needs_mpi
def test_the_job_cluster_starts_the_workers(tmp_path):
    job = mpijobs.char_job_mpi(tmp_path, steps=2)
    job.write_text(job.read_text().replace("cluster {", "cluster { nworker_groups: 2"))
    r = mpijobs.train(job)
    assert r.returncode == 0, r.stderr
    assert "data parallel: 2 workers" in r.stdout
    r = mpijobs.train(job, "--workspace", tmp_path / "one", "--workers", 1)
    assert r.returncode == 0 and "data parallel" not in r.stdout


@needs_mpi
def test_params_that_differ_at_start_up_are_caught(tmp_path):
    job = mpijobs.char_job_mpi(tmp_path)
    mpiexec = dist.find_mpiexec()
    leg = [sys.executable, "-m", "engine.train", str(job), "--workspace", str(tmp_path / "ws")]
    r = subprocess.run([mpiexec, "-n", "1", *leg, "--seed", "1", ":", "-n", "1", *leg,
                        "--seed", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: at start-up, the params of worker 1 differ from worker 0's; the workers must "
        "run the same code, job and data"]


@needs_mpi
def test_a_failure_on_one_worker_stops_all_with_its_message(tmp_path):
    """A label out of range in a row that only worker 1 reads (batch 4): worker 1 reports
    it and every worker ends at once with status 1."""
    job = mpijobs.record_job(tmp_path, bad_label_row=3 * 8 + 7)
    line = (f'error: worker 1: {job}: layer "loss": label 9 is outside [0, 3) (the width of '
            f"source 0); widen the layer before the loss or fix the labels")
    t0 = time.time()
    r = mpijobs.train(job, "--workspace", tmp_path / "a", workers=2, timeout=60)
    assert r.returncode == 1
    assert time.time() - t0 < 30
    lines = r.stderr.strip().splitlines()
    assert lines.count(line) == 1  # the launcher prints it, whatever mpiexec forwarded
    assert all(x == line or "MPI_Abort" in x for x in lines)  # MPICH notes the abort
    # started by hand, the worker prints it itself (mpiexec forwards it; best effort)
    t0 = time.time()
    r = mpijobs.train(job, "--workspace", tmp_path / "b", workers=2, mpiexec=True, timeout=60)
    assert r.returncode == 1
    assert time.time() - t0 < 30


def _ranks(job) -> dict[int, int]:
    """{rank: pid} of the workers training ``job`` (read from /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.train" in cmd and str(job).encode() in cmd:
            for e in env:
                if e.startswith(b"PMI_RANK="):
                    out[int(e[9:])] = int(pid)
    return out


def _start(job, ws):
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", str(job), "--workers", "2",
                             "--workspace", str(ws)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (ws / "checkpoints").exists() or not ckpt.list_checkpoints(ws / "checkpoints"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


@needs_mpi
@pytest.mark.skipif(not pathlib.Path("/proc/self/environ").exists(), reason="needs /proc")
def test_kill_9_of_one_worker_ends_the_others_and_resume_loses_nothing(tmp_path):
    job = mpijobs.char_job_mpi(tmp_path, steps=60)
    straight = mpijobs.train(job, "--workspace", tmp_path / "straight", workers=2)
    assert straight.returncode == 0, straight.stderr
    ws = tmp_path / "killed"
    proc = _start(job, ws)
    ranks = _ranks(job)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 10
    assert proc.returncode == 1
    assert "error: a worker ended abnormally" in err and "--resume" in err
    assert not _ranks(job)
    resumed = mpijobs.train(job, "--workspace", ws, "--resume", workers=2)
    assert resumed.returncode == 0, resumed.stderr
    a, _ = mpijobs.state(tmp_path / "straight", 60)
    b, _ = mpijobs.state(ws, 60)
    assert mpijobs.worst_relative(a, b) == 0.0
    steps = [(x["step"], x["phase"]) for x in mpijobs.records(ws)]
    assert steps == [(x["step"], x["phase"]) for x in mpijobs.records(tmp_path / "straight")]


@needs_mpi
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_checkpoints_and_exits(tmp_path, sig, status):
    job = mpijobs.char_job_mpi(tmp_path, steps=100000)
    ws = tmp_path / "ws"
    proc = _start(job, ws)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    name = signal.Signals(sig).name
    assert out.count(f"stopped by {name}") == 1
    step = int(out.split(f"stopped by {name} at step ")[1].split(";")[0])
    assert (ws / "checkpoints" / f"step{step}.npz").exists()
    assert "Traceback" not in err
    r = mpijobs.train(job, "--workspace", ws, "--resume", "--steps", step + 1, workers=2)
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr
