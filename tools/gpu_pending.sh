#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions could not run, in one device call of about 7 minutes. Each step has its own
# timeout (together 10 minutes), so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_pending_out)
#
# Why one script: device time comes in calls of at most 10 minutes, and starts are often refused (stop 52 waited
# through eight). Stop 54 (one H100) ran the list below (docs/speed.md): the 2D-only CUDA test passed; the warm
# compiled stream gave 58.7 ms at batch 1 and 46.2 ms at batch 4 (stop 52, another H100: 51.3 / 45.1), fp32 81.2 ms;
# the folder 1.83 images/s (stop 52: 2.28) after a second call, as its step's 70 s had been too short. What is
# still open is the same list on an H200, the card the < 50 ms goal names:
#   1. the CUDA test of the 2D-only inference path (test_inference_2d_only.py);
#   2. tools/bench_inference.py --stream --stream-only with --compile-2d, bf16, batch 1 and 4, twice in a row (the
#      first process compiles cold: 98.9 s of warm-up at batch 1 in stop 54, and its batch 4 did not fit);
#   3. the 64-image folder with every output (8 writer processes);
#   4. fp32 with --compile-2d.
# Not in it: the folder with stop 53's writers against the writers before them in one lease (b2ce636), which would
# tell whether that change helps on the GPU machine.
# Each step has its own timeout; a failed or timed-out step is reported and the next one still runs. Logs go to
# OUT_DIR (one file per step). It needs the workspace's packages importable (uv sync, or PYTHONPATH to
# packages/*/src) and a CUDA GPU.
set -u
out="${1:-${OUT:-gpu_pending_out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_pending: $py sees no CUDA device (or cannot import torch); run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run one check, keep its log, report its exit status and tail
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc ($((SECONDS - t0)) s; log $out/$name.log)"
  tail -n 25 "$out/$name.log"
}

step tests 60 "$py" -m pytest -q packages/nvp3d-cli/tests/test_inference_2d_only.py
step stream_compiled_1 200 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
  --dtypes bf16 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
step stream_compiled_2 100 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
  --dtypes bf16 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
step folder 110 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 --dtypes bf16 --graphs on \
  --repeats 1 --stream 1 --stream-only --folder 64 --folder-configs graphed:bf16:4:8:processes
step stream_compiled_fp32 120 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
  --dtypes fp32 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
