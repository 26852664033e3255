"""Never lose work (issue 16, round two): the workspace lock, stop signals in every phase,
skipped steps, resumes without a valid checkpoint, failed writes, a failed plot.

Tests that need to act at an exact step run ``engine.train.main`` in this process and hook
the worker's batches; the others run the CLI as a user does."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from charjobs import ROOT, TEXT, char_job, run_cli
from engine import checkpoint as ckpt
from engine import train
from engine.metrics import MetricsLog


def records(ws):
    return [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]


def steps_of(ws):
    return [(r["step"], r["phase"]) for r in records(ws)]


def run_main(capsys, *argv):
    """engine.train.main in this process: (exit status, stdout, stderr). Anything that
    escapes main would be a traceback for the user: the test fails saying so."""
    try:
        rc = train.main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: it must not escape
        pytest.fail(f"engine.train.main let {type(e).__name__} escape: {e}")
    out, err = capsys.readouterr()
    return rc, out, err


def hook_batches(monkeypatch, after):
    """Call ``after(worker, metrics)`` after every training batch that engine.train runs
    (``worker.batch_index`` is then the number of that batch, 1 for the first)."""
    real = train.make_worker

    def make(net, *a, **kw):
        w, note = real(net, *a, **kw)
        run = w.run_batch

        def run_batch(train=True, load=True):
            m = run(train=train, load=load)
            if train:
                after(w, m)
            return m

        w.run_batch = run_batch
        return w, note

    monkeypatch.setattr(train, "make_worker", make)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def temporaries(ws):
    return sorted(p.name for p in pathlib.Path(ws).rglob(".*.tmp*"))


def wait_for(cond, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def start(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "engine.train", *map(str, args)], cwd=ROOT,
                            text=True, **kw)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------- item 1: the workspace lock

def test_a_second_run_on_a_workspace_in_use_is_refused_naming_the_holder(tmp_path):
    job = char_job(tmp_path, steps=100000, val=False)
    ws = tmp_path / "ws"
    first = start(job, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ckpt.list_checkpoints(ws / "checkpoints"), first, "the first checkpoint")
        second = run_cli("engine.train", job, "--resume", "--steps", 3)
        assert second.returncode == 2, (second.stdout, second.stderr)
        line = one_error_line(second.stderr)
        assert f"in use by process {first.pid}" in line and str(ws) in line
        assert (ws / "lock").read_text().split()[0] == str(first.pid)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # nothing of the refused run went into the first run's log
    assert len(steps_of(ws)) == len(set(steps_of(ws)))
    # the OS released the killed run's lock: no stale lock keeps the next run out
    newest = ckpt.list_checkpoints(ws / "checkpoints")[-1][0]
    again = run_cli("engine.train", job, "--resume", "--steps", newest + 2)
    assert again.returncode == 0, again.stderr
    assert f"step{newest + 2}.npz" in again.stdout


# ------------------------------------- item 4: a refused run changes nothing in it

def test_a_refused_run_changes_nothing_in_the_workspace(tmp_path):
    job = char_job(tmp_path, steps=5)
    assert run_cli("engine.train", job).returncode == 0
    ws = tmp_path / "ws"

    def contents():  # the lock file only ever holds the PID of the last run that took it
        return {p: p.read_bytes() for p in ws.rglob("*") if p.is_file() and p.name != "lock"}

    before = contents()
    assert ws / "visualization" / "train_net.json" in before and ws / "vocab.txt" in before
    other = char_job(tmp_path, steps=5, unroll=6, hidden=12)  # another net: other graphs
    r = run_cli("engine.train", other)
    assert r.returncode == 2 and "already holds checkpoints" in one_error_line(r.stderr)
    assert contents() == before


# -------------------- item 5: --resume with no valid checkpoint keeps no newer records

def test_resume_without_a_valid_checkpoint_drops_the_newer_records(tmp_path):
    job = char_job(tmp_path, steps=20)
    straight = run_cli("engine.train", job, "--workspace", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    ws = tmp_path / "ws"
    assert run_cli("engine.train", job, "--steps", 15).returncode == 0
    for _, p in ckpt.list_checkpoints(ws / "checkpoints"):
        p.write_bytes(b"garbage")  # every checkpoint corrupted
    r = run_cli("engine.train", job, "--resume")
    assert r.returncode == 0, r.stderr
    assert "no valid checkpoint" in r.stdout and "starting from step 0" in r.stdout
    assert steps_of(ws) == steps_of(tmp_path / "straight")
    assert not (ws / "metrics.tmp").exists() and temporaries(ws) == []


# ------------------------------------------------------ item 2: skip_nonfinite

def test_skipped_steps_keep_the_schedule_and_the_end_of_the_run(tmp_path, monkeypatch, capsys):
    job = char_job(tmp_path, steps=20, extra="skip_nonfinite: true")
    bad = {10, 20}  # a display, a validation and a checkpoint fall on each, and 20 is the last

    def poison(w, metrics):
        if w.batch_index in bad:
            metrics["loss"][0] = float("nan")

    hook_batches(monkeypatch, poison)
    rc, out, err = run_main(capsys, job)
    assert rc == 0, (out, err)
    ws = tmp_path / "ws"
    assert out.count("batch skipped (skip_nonfinite)") == 2
    assert [s for s, _ in ckpt.list_checkpoints(ws / "checkpoints")] == [10, 15, 20]
    assert ckpt.load(ws / "checkpoints" / "step20.npz")[1]["step"] == 20
    recs = records(ws)
    train_recs = [r for r in recs if r["phase"] == "train"]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert [r["step"] for r in recs if r["phase"] == "val"] == [10, 20]
    assert [r.get("skipped", 0) for r in train_recs] == [0, 1, 0, 1]
    assert all(np.isfinite(r["loss"]) for r in train_recs)  # the skipped batch is not averaged
    assert "done: 20 steps (2 skipped: non-finite)" in out


def test_a_skipped_batch_does_not_hand_its_state_on(tmp_path, monkeypatch, capsys):
    """The state a skipped (non-finite) batch leaves is dropped: the next batch starts from
    zeros instead of inheriting NaN, which would skip every later batch too."""
    job = char_job(tmp_path, steps=8, val=False, extra="skip_nonfinite: true")

    def poison(w, metrics):
        if w.batch_index == 4:
            metrics["loss"][0] = float("nan")
            for name in list(w.carry):  # the bad batch's state, as an overflow leaves it
                st = w.carry[name]
                w.carry[name] = tuple(s * np.nan for s in st) if isinstance(st, tuple) else st * np.nan

    hook_batches(monkeypatch, poison)
    rc, out, err = run_main(capsys, job)
    assert rc == 0, (out, err)
    assert out.count("batch skipped (skip_nonfinite)") == 1, out
    train_recs = [r for r in records(tmp_path / "ws") if r["phase"] == "train"]
    assert train_recs and all(np.isfinite(r["loss"]) for r in train_recs)


# --------------------------------- items 3 and 11: signals during the stop checkpoint

def _signal_at(step, signum=signal.SIGINT):
    def after(w, metrics):
        if w.batch_index == step:
            os.kill(os.getpid(), signum)
    return after


def _on_stop_save(monkeypatch, before_save):
    """Run ``before_save(path)`` when the checkpoint written after the stop signal starts."""
    real = ckpt.save

    def save(path, arrays, meta):
        if not str(pathlib.Path(path).name).startswith("step5."):
            before_save(path)
        return real(path, arrays, meta)

    monkeypatch.setattr(ckpt, "save", save)


def test_a_second_signal_during_the_stop_checkpoint_does_not_lose_it(tmp_path, monkeypatch,
                                                                     capsys):
    job = char_job(tmp_path, steps=1000, val=False)
    hook_batches(monkeypatch, _signal_at(7))
    _on_stop_save(monkeypatch, lambda path: os.kill(os.getpid(), signal.SIGTERM))
    rc, out, err = run_main(capsys, job)
    assert rc == 130, (out, err)
    assert "SIGTERM again: still writing the checkpoint of step 7" in out
    assert "stopped by SIGINT at step 7" in out and "--resume" in out
    arrays, meta = ckpt.load(tmp_path / "ws" / "checkpoints" / "step7.npz")
    assert meta["step"] == 7
    assert temporaries(tmp_path / "ws") == [] and err == ""


def test_a_third_signal_exits_at_once_saying_what_is_lost(tmp_path, monkeypatch, capsys):
    job = char_job(tmp_path, steps=1000, val=False)
    hook_batches(monkeypatch, _signal_at(7))

    def twice(path):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    _on_stop_save(monkeypatch, twice)
    rc, out, err = run_main(capsys, job)
    assert rc == 130, (out, err)
    line = one_error_line(err)
    assert "without a checkpoint" in line and "steps 6 to 7 are lost" in line
    assert "newest checkpoint is step 5" in line
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ws" / "checkpoints")] == [5]
    assert temporaries(tmp_path / "ws") == []


def test_a_full_disk_at_the_stop_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    job = char_job(tmp_path, steps=1000, val=False)
    hook_batches(monkeypatch, _signal_at(7))

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _on_stop_save(monkeypatch, lambda path: monkeypatch.setattr(ckpt.os, "fsync", enospc))
    rc, out, err = run_main(capsys, job)
    assert rc == 1, (out, err)
    line = one_error_line(err)
    assert "stopped by SIGINT at step 7" in line and "step7.npz" in line
    assert "disk is full" in line and "--resume" in line
    assert temporaries(tmp_path / "ws") == []
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ws" / "checkpoints")] == [5]


def test_a_failed_mid_run_checkpoint_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    import errno
    job = char_job(tmp_path, steps=20, val=False)

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    hook_batches(monkeypatch, lambda w, m: w.batch_index == 9 and
                 monkeypatch.setattr(ckpt.os, "fsync", enospc))
    rc, out, err = run_main(capsys, job)
    assert rc == 1, (out, err)
    line = one_error_line(err)
    assert "step10.npz" in line and "disk is full" in line
    assert temporaries(tmp_path / "ws") == []


# ----------------------------------- item 6: every phase stops promptly on a signal

def test_sigint_during_a_long_validation_stops_and_saves(tmp_path):
    job = char_job(tmp_path, steps=1000)
    job.write_text(job.read_text().replace("validate_freq: 10 validate_steps: 2",
                                           "validate_freq: 5 validate_steps: 1000000"))
    ws = tmp_path / "ws"
    proc = start(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = ""
    while not line.startswith("step "):  # the display of step 5: the validation starts next
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the validation ignored SIGINT")
    assert proc.returncode == 130, err
    assert "val   interrupted after" in out and "stopped by SIGINT at step 5" in out
    assert ckpt.load(ws / "checkpoints" / "step5.npz")[1]["step"] == 5
    assert "Traceback" not in err
    assert [r["phase"] for r in records(ws)] == ["train"]  # no half validation recorded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    job = char_job(tmp, steps=5, hidden=16, val=False)
    assert run_cli("engine.train", job).returncode == 0
    return tmp / "ws" / "checkpoints" / "step5.npz"


def test_sigterm_during_a_test_only_sampling_job_keeps_the_text(trained, tmp_path):
    job = tmp_path / "sample.conf"
    job.write_text(f"""name: "s" train_steps: 0 test_steps: 1000000
checkpoint_path: "{trained}"
train_one_batch {{ alg: kBPTT }}
neuralnet {{
  layer {{ name: "data" type: kRNNDummy rnn_dummy_conf {{ dynamic_srclayer: "argsort" shape: 1 integer: true }} }}
  layer {{ name: "onehot" type: kOneHot srclayers: "data" }}
  layer {{ name: "rnn1" type: kGRU srclayers: "onehot" gru_conf {{ dim_hidden: 16 }} }}
  layer {{ name: "ip1" type: kInnerProduct srclayers: "rnn1" innerproduct_conf {{ num_output: 40 }} }}
  layer {{ name: "softmax" type: kSoftmax srclayers: "ip1" }}
  layer {{ name: "argsort" type: kArgSort srclayers: "softmax" argsort_conf {{ temperature: 1 }} }}
  layer {{ name: "out" type: kCharRNNOutput srclayers: "argsort" }}
}}
cluster {{ workspace: "{tmp_path / 'ws'}" }}
""")
    proc = start(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = ""
    while not line.startswith("executor"):  # the banner's end: sampling starts
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the test-only job ignored SIGTERM")
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after" in out and "Traceback" not in err
    text = out.split("--- text written by layer out ---\n")[1].split("stopped by")[0]
    assert len(text.strip()) > 0 and set(text) <= set(TEXT) | {"\n"}


# ------------------------------------------- item 7: a signal during start-up

def _our_handlers_installed(pid) -> bool:
    """SIGTERM is caught: engine.stopping's handlers are in place (Python alone catches
    only SIGINT)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc")
def test_sigint_while_the_engine_is_imported_is_one_line(tmp_path):
    job = char_job(tmp_path, steps=5)
    proc = start(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not _our_handlers_installed(proc.pid):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT"), (out, err)
    assert not (tmp_path / "ws" / "checkpoints").exists()


def test_sigterm_while_a_long_graph_is_built_is_one_line(tmp_path):
    job = char_job(tmp_path, steps=5, unroll=6000, batch=1, val=False)
    (tmp_path / "train.txt").write_text(TEXT * 4)
    proc = start(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    graph = tmp_path / "ws" / "visualization" / "train_net.json"
    wait_for(graph.exists, proc, "the unrolled graph")  # now the 6000-step net is built
    time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err and err == "", err
    assert "stopped by SIGTERM" in out and "nothing to save" in out.splitlines()[-1]
    assert time.time() - t0 < 10  # promptly, not after the build
    ws = tmp_path / "ws"
    assert not (ws / "checkpoints").exists() and temporaries(ws) == []


# -------------------------------------- item 11: temporaries and failed writes

def test_start_up_removes_the_temporaries_of_dead_processes(tmp_path):
    job = char_job(tmp_path, steps=5, val=False)
    ws = tmp_path / "ws"
    (ws / "checkpoints").mkdir(parents=True)
    dead = dead_pid()
    stale = [ws / "checkpoints" / f".step60.npz.tmp{dead}", ws / f".metrics.jsonl.tmp{dead}",
             ws / f".write-test.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    r = run_cli("engine.train", job)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale)
    for p in stale:
        assert f"removed {p}" in r.stdout


def test_the_workspace_probe_is_a_temporary_start_up_knows(tmp_path, monkeypatch):
    from engine import workspace
    made = []
    real = ckpt.temp_path

    def spy(path):
        made.append(real(path))
        return made[-1]

    monkeypatch.setattr(workspace, "temp_path", spy, raising=False)
    workspace.ensure_workspace(tmp_path / "ws")
    assert made and made[0].parent == tmp_path / "ws"
    assert list((tmp_path / "ws").iterdir()) == []


_TRUNCATE_UNDER_A_SIZE_LIMIT = """
import resource, sys
from engine.metrics import MetricsLog
log = MetricsLog(__import__("pathlib").Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
log.truncate_after(100)
"""


def test_a_failed_truncation_keeps_the_log_and_leaves_no_temporary(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 200):
        log.write({"step": s, "phase": "train", "loss": 1.0})
    before = log.path.read_bytes()
    # the kernel refuses writes past 200 bytes (EFBIG), as a full disk refuses them
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_UNDER_A_SIZE_LIMIT, str(log.path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    # the records the truncation takes out are kept first (metrics.superseded.jsonl): either
    # write may be the one refused; either way nothing changes
    assert re.search(r"metrics(\.superseded)?\.jsonl: cannot (write the metrics log|keep the records)",
                     r.stderr.strip().splitlines()[-1]), r.stderr
    assert log.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------- item 12: a failed plot

@pytest.mark.parametrize("how", ["bogus backend", "metrics.png is a folder"])
def test_a_failed_plot_is_a_warning(tmp_path, how):
    pytest.importorskip("matplotlib")
    job = char_job(tmp_path, steps=5, val=False)
    env = dict(os.environ)
    if how == "bogus backend":
        env["MPLBACKEND"] = "bogus"
    else:
        (tmp_path / "ws" / "metrics.png").mkdir(parents=True)
    r = run_cli("engine.train", job, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert (tmp_path / "ws" / "checkpoints" / "step5.npz").exists()
    if how == "bogus backend":   # the engine draws files on Agg whatever MPLBACKEND says
        assert "no plot" not in r.stdout and (tmp_path / "ws" / "metrics.png").is_file()
    else:
        assert "no plot:" in r.stdout


# -------------------------------------------- item 18: --steps must not be negative

def test_negative_steps_is_one_line(tmp_path):
    job = char_job(tmp_path, steps=5)
    r = run_cli("engine.train", job, "--steps", -7)
    assert r.returncode == 2
    assert "--steps is -7; it must be >= 0" in one_error_line(r.stderr)
    assert not (tmp_path / "ws").exists()


# --------------------- item 19: a workspace entry of the wrong kind, a changed batch

@pytest.mark.parametrize("name, folder", [("checkpoints", False), ("metrics.jsonl", True),
                                          ("visualization", False), ("vocab.txt", True)])
def test_a_workspace_entry_of_the_wrong_kind_is_found_at_start(tmp_path, name, folder):
    job = char_job(tmp_path, steps=5)
    p = tmp_path / "ws" / name
    p.parent.mkdir(parents=True)
    p.mkdir() if folder else p.write_text("")
    r = run_cli("engine.train", job)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(p) in one_error_line(r.stderr)
    assert not any(x.startswith("step ") for x in r.stdout.splitlines())  # before any step


def test_resume_with_another_batch_size_is_one_line(tmp_path):
    job = char_job(tmp_path, steps=10, val=False)
    assert run_cli("engine.train", job).returncode == 0
    job.write_text(job.read_text().replace("batchsize: 4", "batchsize: 3"))
    r = run_cli("engine.train", job, "--resume", "--steps", 20)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = one_error_line(r.stderr)
    assert "step10.npz" in line and "batch size 4" in line and "now has 3" in line


# ---------------------------------------------------- item 20: the metrics log

def test_metrics_records_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "phase": "val", "loss": float("nan"), "accuracy": float("inf"),
               "bpc": 1.5})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    rec = json.loads(log.path.read_text(), parse_constant=refuse)
    assert rec == {"step": 1, "phase": "val", "loss": None, "accuracy": None, "bpc": 1.5}


def test_the_first_record_after_a_resume_averages_the_whole_window(tmp_path, monkeypatch,
                                                                   capsys):
    job = char_job(tmp_path, steps=20, val=False)
    rc, out, err = run_main(capsys, job, "--workspace", tmp_path / "straight")
    assert rc == 0, err
    ws = tmp_path / "split"
    with monkeypatch.context() as m:  # stopped at step 7, between two displays
        hook_batches(m, _signal_at(7))
        rc, out, err = run_main(capsys, job, "--workspace", ws)
        assert rc == 130 and "checkpoint" in out and "step7.npz" in out, (out, err)
    rc, out, err = run_main(capsys, job, "--workspace", ws, "--resume")
    assert rc == 0 and "at step 7" in out, err

    def losses(w):
        return [(x["step"], x["loss"]) for x in records(w)]

    assert losses(ws) == losses(tmp_path / "straight")  # step 10 averages steps 6 to 10


# ------------------------------- docs/faults.md names tests that exist

def test_every_test_the_faults_table_names_exists():
    """Each row of docs/faults.md ("What happens when things go wrong") names the tests that
    prove it: ``tests/<file>.py::<test>`` or ``::<test>`` (same file as the one before)."""
    import re
    table = (ROOT / "docs" / "faults.md").read_text(encoding="utf-8")
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| fault")]
    assert len(rows) >= 30
    for row in rows:
        proof = row.rstrip(" |").rsplit(" | ", 1)[1]
        refs = re.findall(r"`((?:tests/[\w/]+\.py)?)::(\w+)`|`(tests/[\w/]+\.py)`", proof)
        assert refs, f"a row without its test: {row[:80]}"
        current = None
        for file, name, whole in refs:
            current = file or whole or current
            assert current, row[:80]
            text = (ROOT / current).read_text(encoding="utf-8")
            if name:
                assert re.search(rf"^def {name}\(", text, re.M), f"{current}::{name} is not a test"
