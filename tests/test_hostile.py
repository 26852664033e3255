"""The hostile-but-fair cases of round three (issue 23), one parametrised case per row: each
sets up a workspace or input, runs a command as a user would (``sys.executable -m ...``),
and checks the exit status, the one error line and what is left on disk. A new round adds
its rows here.

Small jobs throughout: GRU 16, batch 4, unroll 10, a few-KB corpus (tests/charjobs.py)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from charjobs import ROOT, char_job

NO_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def run(*args, cwd=ROOT, env=None, timeout=300):
    """``sys.executable ARGS`` in ``cwd``; this checkout's engine whatever the folder."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def train(job, *extra, **kw):
    return run("-m", "engine.train", job, *extra, **kw)


def small_job(tmp, **kw):
    return char_job(tmp, hidden=16, batch=4, unroll=10, steps=kw.pop("steps", 10), val=False, **kw)


def one_error_line(r, *patterns):
    """The run ended with exactly one ``error:`` line on stderr matching every pattern."""
    assert not NO_TRACEBACK.search(r.stderr), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    return lines[0]


# ---------------------------------------------------------------- the cases
def case_symlinked_lock(tmp):
    """1: <workspace>/lock is a symbolic link: refused, and the file it points to is
    untouched (the run wrote its PID into it before)."""
    job = small_job(tmp)
    ws = tmp / "ws"
    ws.mkdir()
    target = tmp / "precious.txt"
    target.write_text("my notes\n")
    (ws / "lock").symlink_to(target)
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r"lock is a symbolic link", r"remove the link")
    assert target.read_text() == "my notes\n"
    assert not (ws / "checkpoints").exists()


def case_refused_run_leaves_the_lock_alone(tmp):
    """1, 25: a run refused because the workspace holds checkpoints does not write its PID
    into the lock (the file still names the run that wrote the checkpoints)."""
    job = small_job(tmp)
    assert train(job).returncode == 0
    lock = tmp / "ws" / "lock"
    lock.write_text("4242\n")            # the last holder, as the file names it
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r"already holds checkpoints")
    assert lock.read_text() == "4242\n"


def case_metrics_without_checkpoint(tmp):
    """2: a run killed before its first checkpoint left metrics: a plain re-run is refused
    (it replaced 688 records with 3); --resume keeps every old record."""
    job = small_job(tmp, steps=10)
    ws = tmp / "ws"
    ws.mkdir()
    old = [json.dumps({"step": s, "phase": "train", "loss": 4.0}) for s in range(1, 689)]
    (ws / "metrics.jsonl").write_text("\n".join(old) + "\n")
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r"688 metrics record", r"--resume", r"nothing was overwritten")
    assert (ws / "metrics.jsonl").read_text().count("\n") == 688
    r = train(job, "--resume")
    assert r.returncode == 0, r.stderr
    kept = (ws / "metrics.superseded.jsonl").read_text().splitlines()
    assert kept == old            # the records the restarted run supersedes, all of them


def case_unrelated_metrics_in_dot(tmp):
    """2: a workspace of "." holding somebody's metrics.jsonl is refused, not replaced."""
    job = small_job(tmp)
    here = tmp / "here"
    here.mkdir()
    (here / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    r = train(job, "--workspace", ".", cwd=here)
    assert r.returncode == 2
    one_error_line(r, r"metrics record")
    assert (here / "metrics.jsonl").read_text() == '{"step": 1, "mine": true}\n'


def case_graph_only_on_a_trained_workspace(tmp):
    """3: --graph-only with a changed net on a trained workspace does not replace the
    graph its checkpoints were trained with."""
    job = small_job(tmp)
    assert train(job).returncode == 0
    graph = tmp / "ws" / "visualization" / "train_net.json"
    before = graph.read_bytes()
    changed = tmp / "changed.conf"
    changed.write_text(job.read_text().replace("dim_hidden: 16", "dim_hidden: 17")
                       .replace("unroll_len: 10", "unroll_len: 5"))
    r = train(changed, "--graph-only")
    assert r.returncode == 2
    one_error_line(r, r"train_net.json is the graph the checkpoints", r"another --workspace")
    assert graph.read_bytes() == before
    assert train(job, "--graph-only").returncode == 0       # the same net: rewritten alike
    assert graph.read_bytes() == before


def case_too_many_workers(tmp):
    """5: --workers 1000 with batch 4 starts nothing: one line before any rank runs."""
    job = small_job(tmp)
    r = train(job, "--workers", "1000", timeout=60)
    assert r.returncode == 2
    one_error_line(r, r'layer "data": batch size 4 cannot be split evenly over 1000 workers',
                   r"--workers 2 or 4", r"nothing was started")
    assert not (tmp / "ws").exists()


def _edited(tmp, old, new):
    job = small_job(tmp)
    text = job.read_text()
    assert old in text
    job.write_text(text.replace(old, new))
    return job


def case_forget_bias_inf(tmp):
    """4, 7: lstm_conf { forget_bias: inf } trained, checkpointed and exported inf; now the
    job is refused in one line naming the layer and the field (a generic check over every
    float field of every conf)."""
    job = _edited(tmp, "type: kGRU srclayers: \"onehot\" gru_conf { dim_hidden: 16 }",
                  "type: kLSTM srclayers: \"onehot\" lstm_conf { dim_hidden: 16 forget_bias: inf }")
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r'layer "rnn1": lstm_conf.forget_bias is inf; it must be a finite number')
    assert not (tmp / "ws" / "checkpoints").exists()


def case_relu_slope_nan(tmp):
    """7: relu_conf { negative_slope: nan } is refused like every other non-finite float."""
    job = _edited(tmp, '  layer { name: "ip1"',
                  '  layer { name: "act" type: kReLU srclayers: "rnn1" relu_conf { negative_slope: nan } }\n'
                  '  layer { name: "ip1"')
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r'layer "act": relu_conf.negative_slope is nan')


def case_steps_out_of_range(tmp):
    """9: --steps 99999999999999999999999 is one line (was "ValueError: Value out of range")."""
    r = train(small_job(tmp), "--steps", "99999999999999999999999")
    assert r.returncode == 2
    one_error_line(r, r"--steps is 99999999999999999999999; it must be at most 2147483647")


def _trained(tmp):
    """A small trained workspace: (job, its last checkpoint)."""
    job = small_job(tmp)
    assert train(job).returncode == 0
    return job, tmp / "ws" / "checkpoints" / "step10.npz"


def _poisoned(ck, out, how):
    """A copy of checkpoint ``ck`` at ``out`` (checksum rewritten) with its first param
    changed by ``how``; returns that param's name."""
    from engine import checkpoint as ckpt
    arrays, meta = ckpt.load(ck)
    name = sorted(k for k in arrays if k.startswith("param/"))[0]
    arrays[name] = how(arrays[name])
    ckpt.save(out, arrays, {k: v for k, v in meta.items() if k not in ("sha256", "format")})
    return name[len("param/"):]


def _nan(a):
    a = a.copy()
    a.reshape(-1)[3] = np.nan
    return a


def case_sample_and_export_of_nan_params(tmp):
    """15: sampling a checkpoint whose params hold NaN printed 30 newlines (exit 0) and its
    export exited 0: both refuse, naming the param."""
    _, ck = _trained(tmp)
    bad = tmp / "bad" / "step10.npz"
    name = _poisoned(ck, bad, _nan)
    r = run("-m", "engine.sample", "--checkpoint", bad, "--length", "30")
    assert r.returncode == 2 and r.stdout == ""
    one_error_line(r, re.escape(f'param "{name}" holds 1 non-finite value'), r"index \[")
    r = run("-m", "engine.export", bad, tmp / "m.safetensors")
    assert r.returncode == 2
    one_error_line(r, re.escape(f'param "{name}"'), r"non-finite")
    assert not (tmp / "m.safetensors").exists()


def case_checkpoint_path_with_nan(tmp):
    """8: checkpoint_path to a file holding NaN weights names the file and the tensor."""
    job, ck = _trained(tmp)
    bad = tmp / "bad" / "step10.npz"
    name = _poisoned(ck, bad, _nan)
    other = tmp / "other"
    job2 = small_job(other)
    job2.write_text(job2.read_text() + f'checkpoint_path: "{bad}"\n')
    r = train(job2)
    assert r.returncode == 2
    one_error_line(r, re.escape(str(bad)), re.escape(f'param "{name}"'), r"non-finite")


def case_complex_param(tmp):
    """16: a complex64 param in a checkpoint lost its imaginary part silently; refused."""
    _, ck = _trained(tmp)
    bad = tmp / "bad" / "step10.npz"
    name = _poisoned(ck, bad, lambda a: a.astype(np.complex64) + 1j)
    r = run("-m", "engine.sample", "--checkpoint", bad, "--length", "5")
    assert r.returncode == 2
    one_error_line(r, re.escape(f'param "{name}" holds complex numbers'))


def case_garbage_npz_advice(tmp):
    """14: a garbage .npz was reported with NumPy's advice to load it with allow_pickle;
    the engine never advises unpickling an untrusted file."""
    bad = tmp / "step3.npz"
    bad.write_bytes(b"\x80\x04K\x01." + b"junk" * 10)       # pickled data, not a zip
    r = run("-m", "engine.export", bad, tmp / "m.onnx")
    assert r.returncode == 2
    line = one_error_line(r, r"never loads")
    assert "allow_pickle" not in r.stderr and "allow_pickle" not in line


def case_meta_vocab_not_a_list(tmp):
    """12: a checkpoint whose meta says "vocab": 7 made --resume end in a TypeError."""
    job, ck = _trained(tmp)
    from engine import checkpoint as ckpt
    arrays, meta = ckpt.load(ck)
    meta["vocab"] = 7
    ckpt.save(ck, arrays, {k: v for k, v in meta.items() if k not in ("sha256", "format")})
    r = train(job, "--resume", "--steps", "20")
    assert r.returncode == 2
    one_error_line(r, r'"vocab" is 7, not a list of characters')


def case_plot_with_a_bogus_backend(tmp):
    """20: MPLBACKEND=bogus python tools/plot.py WS OUT was a ValueError traceback; the
    engine draws files on Agg, whatever the variable says."""
    pytest.importorskip("matplotlib")
    _trained(tmp)
    env = dict(os.environ, MPLBACKEND="bogus")
    r = run("tools/plot.py", tmp / "ws", tmp / "curve.png", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp / "curve.png").stat().st_size > 0


def case_bench_outputs_checked_first(tmp):
    """21: --json into a missing folder lost the results after the whole benchmark; bad
    --network values (0:50 divided by zero, 10:-5 and nan:nan were taken) and --plot x.xyz
    are refused before anything is measured."""
    missing = tmp / "no" / "such" / "r.json"
    r = run("-m", "bench.charrnn", "--framework", "engine", "--json", missing, timeout=60)
    assert r.returncode == 2
    one_error_line(r, r"--json .*the folder .* does not exist")
    job = small_job(tmp)
    for net in ("0:50", "10:-5", "nan:nan"):
        r = run("-m", "bench.scaling", job, "--network", net, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr and net in r.stderr, r.stderr
    for extra in (["--json", missing], ["--plot", tmp / "x.xyz"]):
        r = run("-m", "bench.scaling", job, *extra, timeout=60)
        assert r.returncode == 2
        one_error_line(r, r"--json|--plot")
        assert "measured" not in r.stdout and "job " not in r.stdout


def case_job_name_is_not_a_path(tmp):
    """23: a job named ../../escaped (or /abs) without cluster.workspace wrote outside
    ./workspace; the name becomes one folder under it."""
    job = small_job(tmp)
    here = tmp / "run" / "in" / "here"
    here.mkdir(parents=True)
    for name in ("../../escaped", "/tmp/absolute-escape"):
        text = job.read_text().replace('name: "tiny"', f'name: "{name}"')
        text = "\n".join(ln for ln in text.splitlines() if "cluster" not in ln)
        j = tmp / "named.conf"
        j.write_text(text)
        r = train(j, "--steps", "2", cwd=here)
        assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in (here / "workspace").iterdir())
    assert made == [".._.._escaped", "_tmp_absolute-escape"]
    assert not (tmp / "run" / "escaped").exists() and not pathlib.Path("/tmp/absolute-escape").exists()


def _store_job(tmp, path, extra=""):
    """A many-to-one job over the store at ``path`` (x: (N, T, 3), y: classes)."""
    job = tmp / "store.conf"
    job.write_text(f"""name: "store" train_steps: 3 disp_freq: 1
train_one_batch {{ alg: kBPTT }}
updater {{ type: kSGD learning_rate {{ type: kFixed base_lr: 0.1 }} }}
neuralnet {{ unroll_len: 4
  layer {{ name: "data" type: kRecordInput store_conf {{ path: "{path}" batchsize: 4 {extra} }} }}
  layer {{ name: "rnn" type: kGRU srclayers: "data" gru_conf {{ dim_hidden: 8 }} }}
  layer {{ name: "ip" type: kInnerProduct unroll_len: 1 srclayers: "rnn"
    unroll_conn_type: kUnrollFirstToLast innerproduct_conf {{ num_output: 2 }} }}
  layer {{ name: "loss" type: kSoftmaxLoss unroll_len: 1 srclayers: "ip" srclayers: "data"
    unroll_conn_type: kUnrollOneToOne unroll_conn_type: kUnrollFirstToLast }}
}}
cluster {{ workspace: "{tmp / 'ws'}" }}
""")
    return job


def case_float64_overflowing_float32(tmp):
    """6: a float64 .npz with x = 1e300 passed the finite check and overflowed in float32
    (exit 1, "lower the learning rate"); now exit 2 naming the file and the position."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 3))
    x[5, 2, 1] = 1e300
    np.savez(tmp / "big.npz", x=x, y=rng.integers(0, 2, 8))
    r = train(_store_job(tmp, tmp / "big.npz"))
    assert r.returncode == 2
    one_error_line(r, r"big.npz: x\[5, 2, 1\] is 1e\+300 \(sequence 5, step 2\), beyond what "
                      r"float32 holds")


def case_csv_label_out_of_range(tmp):
    """9: a CSV label 1e30 ended in an OverflowError; now one line naming the line."""
    lines = [f"{i % 2}," + ",".join(["0.5"] * 12) for i in range(8)]
    lines[3] = "1e30," + ",".join(["0.5"] * 12)
    (tmp / "d.csv").write_text("\n".join(lines) + "\n")
    job = _store_job(tmp, tmp / "d.csv", 'backend: "textfile" shape: 4 shape: 3')
    job.write_text(job.read_text().replace("kRecordInput", "kCSVInput"))
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r"d.csv.*4.*the label '1e30' is not a class id")


def case_singa_blob_shape_overflow(tmp):
    """11: a SINGA blob whose shape product wraps around 64 bits (2^21 x 2^21 x 2^22 = 2^64)
    passed the size check as 0 values and failed in a reshape."""
    from wire import ld, varint
    blob = b"".join(varint(1 << 3) + varint(s) for s in (2 ** 21, 2 ** 21, 2 ** 22))
    path = tmp / "step1-worker0"
    path.write_bytes(varint(3 << 3) + varint(1) + ld(4, b"0#w") + ld(5, blob))
    job = small_job(tmp)
    job.write_text(job.read_text() + f'checkpoint_path: "{path}"\n')
    r = train(job)
    assert r.returncode == 2
    one_error_line(r, r'param "0#w": shape \[2097152, 2097152, 4194304\] needs '
                      r"18446744073709551616 values but its blob holds 0")


def case_unroll_longer_than_the_corpus(tmp):
    """10: unroll_len 100000 on a small corpus built gigabytes of graph before "corpus too
    short" (1000000: a MemoryError with an empty reason); the corpus is checked first."""
    job = small_job(tmp)
    text = job.read_text().replace("unroll_len: 10", "unroll_len: 1000000")
    job.write_text(text)
    r = train(job, timeout=60)
    assert r.returncode == 2
    one_error_line(r, r'layer "data": .*train.txt has \d+ bytes, fewer than batchsize x '
                      r"\(unroll_len \+ 1\) = 4000004")
    assert not (tmp / "ws" / "visualization").exists()


def case_singa_data_refuses_what_it_cannot_write(tmp):
    """16, 17: tools/singa_data.py dropped the imaginary part of a complex x, and wrote a
    textfile its own reader refused or misread with --separator "" (or 5, or .)."""
    rng = np.random.default_rng(1)
    np.savez(tmp / "c.npz", x=rng.standard_normal((4, 3)) + 1j, y=np.arange(4))
    r = run("tools/singa_data.py", tmp / "c.npz", tmp / "c.bin")
    assert r.returncode == 2 and not (tmp / "c.bin").exists()
    one_error_line(r, r"x holds complex numbers")
    np.savez(tmp / "r.npz", x=rng.standard_normal((4, 3)), y=np.arange(4))
    for sep in ("", "5", ".", ";;"):
        out = tmp / f"r{len(sep)}{sep.strip('.;') or 'x'}.txt"
        r = run("tools/singa_data.py", tmp / "r.npz", out, "--backend", "textfile",
                "--separator", sep)
        assert r.returncode == 2 and not out.exists(), (sep, r.stderr)
        one_error_line(r, r"separator")
    r = run("tools/singa_data.py", tmp / "r.npz", tmp / "ok.txt", "--backend", "textfile",
            "--separator", "\t")
    assert r.returncode == 0, r.stderr


def case_stdout_closed_by_head(tmp):
    """22: engine.train ... | head -n 3 ended in a BrokenPipeError, exit 1, no checkpoint; a
    closed stdout is a stop like SIGTERM: checkpoint, exit 141, the rest in train.log."""
    job = small_job(tmp, steps=400)          # disp_freq 5: the 4th line comes early
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m engine.train "{job}" | head -n 3; '
                        'echo "status ${PIPESTATUS[0]}" >&2'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "status 141" in r.stderr, r.stderr
    assert not NO_TRACEBACK.search(r.stderr) and "BrokenPipe" not in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 3
    log = (tmp / "ws" / "train.log").read_text()
    # head may close the pipe before the first step (nothing to save) or after some
    m = re.search(r"stopped by SIGPIPE (at step (\d+); checkpoint (\S+\.npz)|before the first "
                  r"step; nothing to save)", log)
    assert m, log[-500:]
    if m.group(2):
        assert pathlib.Path(m.group(3)).is_file() and int(m.group(2)) < 400


def case_a_billion_wide_layer(tmp):
    """9: dim_hidden / num_output 10^9 ended in a MemoryError (exit 1, no layer named); the
    params' memory is estimated before anything is allocated."""
    for old, new, layer in (("dim_hidden: 16", "dim_hidden: 1000000000", "rnn1"),
                            ("num_output: 40", "num_output: 1000000000", "ip1")):
        sub = tmp / layer
        job = small_job(sub)
        job.write_text(job.read_text().replace(old, new))
        r = train(job, timeout=120)
        assert r.returncode == 2, r.stderr
        one_error_line(r, f'layer "{layer}": its param ', r"GiB", r"make the layer smaller")
        assert not (sub / "ws" / "checkpoints").exists()


def case_resume_after_the_vocabulary_changed(tmp):
    """13: --resume after the vocabulary file changed resumed silently (ids now mean other
    characters): compared with the vocabulary the checkpoint stores."""
    job = small_job(tmp)
    text = (tmp / "train.txt").read_text()
    (tmp / "vocab.txt").write_text("".join(sorted(set(text))))
    text = job.read_text()
    assert 'encoding: "utf-8" }' in text
    job.write_text(text.replace('encoding: "utf-8" }', f'encoding: "utf-8" vocab_path: "{tmp / "vocab.txt"}" }}', 1))
    assert train(job).returncode == 0, "first run"
    (tmp / "vocab.txt").write_text("".join(sorted(set(text + "@"))))   # "@" sorts early
    r = train(job, "--resume", "--steps", "20")
    assert r.returncode == 2
    one_error_line(r, r"vocab_path .* is not the vocabulary the checkpoint was trained with")


def case_resume_after_the_corpus_changed(tmp):
    """13: after the corpus changed (or shrank), --resume said "row 1 starts at offset ...;
    set state_carry: kResetBatch", the wrong cause, or resumed silently; it names the text."""
    for how in ("changed", "shrunk"):
        sub = tmp / how
        job = small_job(sub)
        assert train(job).returncode == 0
        corpus = sub / "train.txt"
        text = corpus.read_text()
        corpus.write_text(text.replace("return", "yields") if how == "changed"
                          else text[: len(text) * 2 // 3])
        r = train(job, "--resume", "--steps", "20")
        assert r.returncode == 2, (how, r.stdout[-300:])
        one_error_line(r, r"train.txt is not the text the checkpoint was trained on")
        assert "kResetBatch" not in r.stderr


def case_ctrl_c_early_in_every_command(tmp):
    """24: a Ctrl-C before a command's handler was installed printed a KeyboardInterrupt
    traceback; every command installs it first thing (the interpreter's own start-up,
    before any of the engine's code, is the only window left)."""
    import signal
    import time
    job = small_job(tmp)
    commands = [["-m", "engine.gradcheck", job], ["-m", "engine.export", tmp / "none.npz", tmp / "m.onnx"],
                ["tools/graph.py", job, tmp / "g.svg"], ["tools/plot.py", tmp],
                ["tools/singa_data.py", "--info", tmp / "none.bin"]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in commands:
        for delay in (0.08, 0.25):
            p = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
            assert "Traceback" not in err and "KeyboardInterrupt" not in err, (cmd, delay, err)
            assert p.returncode == 130 or delay > 0.1, (cmd, p.returncode, err)  # still starting
            if p.returncode == 130:
                assert err.strip().splitlines() == [
                    "stopped by SIGINT during start-up; nothing was written"], err


MPICH_STACK = """Abort(15) on node 1 (rank 1 in comm 0): Fatal error in internal_Allreduce: Other MPI error, error stack:
internal_Allreduce(4014)..................: MPI_Allreduce(sendbuf=MPI_IN_PLACE, count=1) failed
MPIR_Allreduce_impl(3804).................:
MPIR_Allreduce_allcomm_auto(3688).........:
MPIC_Sendrecv(266)........................:
MPID_Isend(63)............................:
MPIDI_CH3_iStartMsg(144)..................: Communication error with rank 0
[cli_1]: readline failed
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 1234 RUNNING AT host
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
"""


def case_killed_worker_is_one_line(tmp):
    """19: kill -9 of one rank sometimes printed MPICH's 16-line error stack before the
    documented line; the launcher holds the runtime's lines back and prints its one line
    (a stand-in mpiexec prints a recorded stack and ends as mpiexec does then)."""
    import contextlib
    import io
    pytest.importorskip("mpi4py")
    from engine import distributed as dist
    fake = tmp / "mpiexec"
    (tmp / "stack.txt").write_text(MPICH_STACK)
    fake.write_text(f"#!/bin/sh\necho 'step 5 from a worker' >&2\ncat '{tmp / 'stack.txt'}' >&2\n"
                    f"exit ${{FAKE_RC:-9}}\n")
    fake.chmod(0o755)
    real = dist.find_mpiexec
    dist.find_mpiexec = lambda: str(fake)
    try:
        for rc, want in (("9", 1), ("1", 1)):
            os.environ["FAKE_RC"] = rc
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                got = dist.launch(["job.conf"], 2)
            lines = err.getvalue().splitlines()
            assert got == want and lines[0] == "step 5 from a worker", lines
            if rc == "9":    # killed: the runtime's stack is replaced by one line
                assert len(lines) == 2 and lines[1].startswith("error: a worker ended abnormally")
            else:            # an ordinary failure: nothing is hidden
                assert len(lines) == 1 + len(MPICH_STACK.splitlines())
    finally:
        dist.find_mpiexec = real
        os.environ.pop("FAKE_RC", None)


def case_the_worker_whose_rows_overflow_is_named(tmp):
    """18: --workers 2 with y = 1e30 only in worker 1's rows named worker 0; the worker (and
    its rows of the batch) whose own share went non-finite is named."""
    pytest.importorskip("mpi4py")
    from engine.distributed import find_mpiexec
    if find_mpiexec() is None:
        pytest.skip("no mpiexec beside this Python (pip install mpich)")
    rng = np.random.default_rng(0)
    y = rng.standard_normal((8, 1)).astype(np.float32)
    y[3, 0] = 1e30                      # batch 0, row 3: worker 1's rows are 2-3
    np.savez(tmp / "d.npz", x=rng.standard_normal((8, 4, 3)).astype(np.float32), y=y)
    job = _store_job(tmp, tmp / "d.npz")
    job.write_text(job.read_text().replace("num_output: 2", "num_output: 1").replace(
        'kSoftmaxLoss unroll_len: 1 srclayers: "ip" srclayers: "data"',
        'kEuclideanLoss unroll_len: 1 srclayers: "ip" srclayers: "data" '
        "euclideanloss_conf { target: kLabels }"))
    r = train(job, "--workers", "2", timeout=120)
    assert r.returncode == 1
    one_error_line(r, r"step 1: non-finite .*; worker 1 \(rows 2-3 of the batch\)")


CASES = {f.__name__[5:]: f for f in [
    case_symlinked_lock, case_refused_run_leaves_the_lock_alone, case_metrics_without_checkpoint,
    case_unrelated_metrics_in_dot, case_graph_only_on_a_trained_workspace, case_too_many_workers,
    case_forget_bias_inf, case_relu_slope_nan, case_steps_out_of_range,
    case_sample_and_export_of_nan_params, case_checkpoint_path_with_nan, case_complex_param,
    case_garbage_npz_advice, case_meta_vocab_not_a_list, case_plot_with_a_bogus_backend,
    case_bench_outputs_checked_first, case_job_name_is_not_a_path,
    case_float64_overflowing_float32, case_csv_label_out_of_range, case_singa_blob_shape_overflow,
    case_unroll_longer_than_the_corpus, case_singa_data_refuses_what_it_cannot_write,
    case_stdout_closed_by_head, case_a_billion_wide_layer,
    case_resume_after_the_vocabulary_changed, case_resume_after_the_corpus_changed,
    case_ctrl_c_early_in_every_command, case_killed_worker_is_one_line,
    case_the_worker_whose_rows_overflow_is_named,
]}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, tmp_path):
    CASES[name](tmp_path)
