#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions could not run, in one device call of about 7 minutes. Each step has its own
# timeout (together 10 minutes), so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_pending_out)
#
# Why one script: device time comes in calls of at most 10 minutes, and stop 46 lost most of its budget to refused
# starts before it could time its last change. It runs, in order of how much each result decides (stop 46 left
# them open; docs/speed.md, stop 46):
#   1. the CUDA tests of frustum3d's map builders, generated sets and norms (test_kmap_triton, test_sparse_modules,
#      test_decoder) and of the dense-levels graph (test_cuda_graphs_3d);
#   2. tools/bench_norm.py on CUDA: the batched instance norm's row-block broadcast (frustum3d 0.3.16) against the
#      gather form that cost 81.5 ms per batch-4 frame (3.6M rows per item, the 256^3 level's candidates);
#   3. tools/bench_inference.py, bf16 batch 1 and 4, with the Triton map builders (default), with their opt-in
#      per-row tap masks (FRUSTUM3D_TILE_TAP_MASKS=1) and with the torch builders (FRUSTUM3D_KMAP_TRITON=0), twice
#      each, interleaved: stop 46 saw the Triton builders ahead at batch 1 and behind at batch 4 (level 256
#      36.7-37.3 against 31.3 ms, one run each, with the gathers still in); the masks are the suspected fix;
#   4. tools/bench_training.py, the 3D step at batch 1 and 4, bf16 and fp32 (batch > 1 runs the changed norm).
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

step tests 120 "$py" -m pytest -q packages/frustum3d/tests/test_kmap_triton.py \
  packages/frustum3d/tests/test_sparse_modules.py packages/frustum3d/tests/test_decoder.py \
  packages/nvp3d-cli/tests/test_cuda_graphs_3d.py
step norm 45 "$py" tools/bench_norm.py --device cuda --rows 3600000 --batches 2 4 --channels 16 48
for run in 1 2; do
  step "infer_triton_$run" 55 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 --dtypes bf16 \
    --graphs on --repeats 5
  step "infer_tap_masks_$run" 55 env FRUSTUM3D_TILE_TAP_MASKS=1 "$py" tools/bench_inference.py --preset full \
    --grid 256 --batches 4 --dtypes bf16 --graphs on --repeats 5
  step "infer_torch_maps_$run" 55 env FRUSTUM3D_KMAP_TRITON=0 "$py" tools/bench_inference.py --preset full \
    --grid 256 --batches 4 --dtypes bf16 --graphs on --repeats 5
done
step train_3d 75 "$py" tools/bench_training.py --preset full --grid 256 --stages 3d --dtypes bf16 fp32 \
  --batches-3d 1 4 --repeats 3
