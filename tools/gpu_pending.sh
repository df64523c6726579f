#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions could not run, in one device call of about 7 minutes. Each step has its own
# timeout (together 10 minutes), so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR] [LIST]   (OUT_DIR defaults to $OUT, else ./gpu_pending_out; LIST is
#                                                inference, the default, or sparse)
#
# LIST sparse (stop 59, one H100, docs/frustum3d.md): in device time frustum3d's sparse conv is ahead of
# spconv-triton on every forward+backward row, but its subm k3 C64 half-precision forward is 0.91-0.93x, and the
# host-inclusive rows of that run were timed after the profiler had run in the process (pytorch/pytorch#144455).
# Open: (1) a block-config sweep of that forward, (2) the C16-C64 half-precision rows timed per call and as a
# stream in a process without the profiler, (3) the same rows' device time in a process of their own.
#
# Why one script: device time comes in calls of at most 10 minutes, and starts are often refused. Stop 57 ran the
# list on an H200 for the first time (docs/speed.md): the warm compiled stream gave 55.2 ms at bf16 batch 1 (H100s:
# 51.3-58.7), fp32 75.8 ms at batch 1 and 63.7 ms at batch 4, the folder 1.62 images/s; the CUDA test step was cut at
# 60 s and bf16 batch 4 by both stream steps' limits. What is still open on an H200:
#   1. the CUDA test of the 2D-only inference path (test_inference_2d_only.py; its step now has 90 s);
#   2. tools/bench_inference.py --stream --stream-only with --compile-2d, bf16, batch 1 and 4, twice in a row (the
#      first process compiles cold: 115 s of warm-up at batch 1 on the H200; the second now has 190 s, so that its
#      batch 4 finishes);
#   3. the 64-image folder with every output (8 writer processes).
# Not in it: the folder with stop 53's writers against the writers before them in one lease (b2ce636), which would
# tell whether that change helps on the GPU machine.
# Each step has its own timeout; a failed or timed-out step is reported and the next one still runs. Logs go to
# OUT_DIR (one file per step). It needs the workspace's packages importable (uv sync, or PYTHONPATH to
# packages/*/src) and a CUDA GPU.
set -u
out="${1:-${OUT:-gpu_pending_out}}"
list="${2:-inference}"
case "$list" in
  inference|sparse) ;;
  *) echo "gpu_pending: unknown list '$list'; use inference or sparse" >&2; exit 2 ;;
esac
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

if [ "$list" = sparse ]; then
  half=(--channels 16 32 64 --dtypes bf16 fp16 --spconv-max-configs 2 --backends triton)
  step sweep_subm_c64 170 "$py" tools/bench_sparse_conv.py --sweep --layers "subm k3" --channels 64 \
    --dtypes bf16 fp16 --sweep-seconds 150 --out "$out/sweep_subm_c64.json"
  step rows_call_stream 280 "$py" tools/bench_sparse_conv.py --fast "${half[@]}" --timing call stream \
    --out "$out/rows_call_stream.json"
  step rows_kernel 130 "$py" tools/bench_sparse_conv.py --fast "${half[@]}" --timing kernel \
    --out "$out/rows_kernel.json"
  exit 0
fi

step tests 90 "$py" -m pytest -q packages/nvp3d-cli/tests/test_inference_2d_only.py
step stream_compiled_1 200 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
  --dtypes bf16 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
step stream_compiled_2 190 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
  --dtypes bf16 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
step folder 110 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 --dtypes bf16 --graphs on \
  --repeats 1 --stream 1 --stream-only --folder 64 --folder-configs graphed:bf16:4:8:processes
