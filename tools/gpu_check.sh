#!/usr/bin/env bash
# The GPU check (issue 24): on a machine with an NVIDIA GPU, in under 8 minutes,
#   1. makes sure CuPy is there (installs the gpu extra when it is not),
#   2. runs the suite's device tests on the real CuPy (tests/test_backends.py: every layer
#      family and whole nets on CuPy against NumPy) and the stand-in's tests beside them,
#   3. trains char-rnn (GRU 512, configs/char-rnn.conf) for 200 steps on the GPU and on the
#      CPU and compares their losses,
#   4. times bench.charrnn on the GPU: the engine on CuPy against PyTorch on cuDNN.
# Everything it prints is also kept under gpu-check/ (one log per part).
#
#     bash tools/gpu_check.sh [GPU_ID]        # default 0
set -uo pipefail
cd "$(dirname "$0")/.."
GPU="${1:-0}"
OUT=gpu-check
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 )) s] $*"; }
fail=0

say "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed -n "$((GPU + 1))p" || echo 'nvidia-smi missing')"
if ! python -c "import cupy" 2>/dev/null; then
  say "CuPy is missing: pip install -e '.[gpu]'"
  python -m pip install -q -e '.[gpu]' || { say "FAIL: CuPy could not be installed"; exit 1; }
else
  python -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
fi
python - "$GPU" <<'PY' || { say "FAIL: CuPy finds no usable GPU $GPU"; exit 1; }
import sys, cupy
print("CuPy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "devices", cupy.cuda.runtime.getDeviceCount())
cupy.cuda.Device(int(sys.argv[1])).use()
print("a product on the GPU:", float((cupy.arange(4.0) @ cupy.arange(4.0))))
PY

say "2. device tests (real CuPy: tests/test_backends.py; the stand-in: test_standin, test_device_path)"
timeout 240 python -m pytest -q -rs tests/test_backends.py tests/test_standin.py \
    tests/test_device_path.py -x 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || { say "FAIL: device tests"; fail=1; }
if grep -q "SKIPPED.*CuPy with a usable GPU is not available" "$OUT/tests.log"; then
  say "FAIL: the CuPy cases were skipped (no usable GPU for the tests)"; fail=1
fi

say "3. char-rnn GRU 512, 200 steps, GPU and CPU"
[ -f data/corpus/train.txt ] || python tools/make_corpus.py >/dev/null
for dev in gpu cpu; do
  flag=$([ $dev = gpu ] && echo "--gpu $GPU" || echo "--cpu")
  rm -rf "$OUT/ws-$dev"
  timeout 150 python -m engine.train configs/char-rnn.conf --steps 200 $flag \
      --workspace "$OUT/ws-$dev" > "$OUT/train-$dev.log" 2>&1 \
    || { say "FAIL: training on the $dev (see $OUT/train-$dev.log)"; tail -3 "$OUT/train-$dev.log"; fail=1; }
  grep -E "^step +200 +train|done:" "$OUT/train-$dev.log" | sed "s/^/  $dev: /"
done
python - "$OUT" <<'PY' || fail=1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def last(dev):
    recs = [json.loads(l) for l in (out / f"ws-{dev}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["phase"] == "train"][-1]
g, c = last("gpu"), last("cpu")
d = abs(g["loss"] - c["loss"]) / c["loss"]
print(f"  step {g['step']}: train loss GPU {g['loss']:.4f}, CPU {c['loss']:.4f}, relative "
      f"difference {d:.2e}; speed GPU {g.get('chars_per_s', 0):,.0f}, CPU {c.get('chars_per_s', 0):,.0f} chars/s")
if d > 0.02:   # float32 on two devices for 200 steps: the curves agree, the digits drift
    print("  FAIL: the losses differ by more than 2 %")
    sys.exit(1)
PY

say "4. bench.charrnn on GPU $GPU: engine (CuPy) vs PyTorch (cuDNN)"
timeout 240 python -m bench.charrnn --gpu "$GPU" --case all --pairs 2 --steps 20 --warmup 3 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" \
  || { say "FAIL: bench.charrnn"; fail=1; }

say "done: $([ $fail = 0 ] && echo 'every part passed' || echo 'SOME PARTS FAILED'); logs in $OUT/"
exit $fail
