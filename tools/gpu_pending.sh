#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions could not run, in one device call of about 7 minutes. Each step has its own
# timeout (together 10 minutes), so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_pending_out)
#
# Why one script: device time comes in calls of at most 10 minutes, and starts are often refused (stop 48 waited
# through five). Stop 47's checks ran in stop 48 (docs/speed.md). What is open now, in order of how much each result
# decides:
#   1. the CUDA tests of the Predictor stream and host copies, the 2D/3D graphs, the voxel fusion, lifting with a
#      device intrinsic (stop 48's regression fix) and frustum3d's map builders and decoder;
#   2. tools/bench_inference.py --stream --stream-only, bf16 and fp32, batch 1 and 4, twice (stop 48: batch 1
#      56.5-72.6 ms per frame on one H100, spread over runs of one lease; fp32 batch 4 was cut by a timeout);
#   3. the torch map builders (FRUSTUM3D_KMAP_TRITON=0) against the Triton ones at batch 1 and 4, now that the
#      batched norm's gathers are gone (stop 46 compared them with the gathers in; never since);
#   4. the 3D training step (tools/bench_training.py --stages 3d), which stop 47's lifting change had broken on CUDA.
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

step tests 170 "$py" -m pytest -q packages/nvp3d-cli/tests/test_host_copy.py \
  packages/nvp3d-cli/tests/test_inference_batching.py packages/nvp3d-cli/tests/test_cuda_graphs_3d.py \
  packages/nvp3d-cli/tests/test_stage3d_model.py packages/frustum3d/tests/test_lifting.py \
  packages/frustum3d/tests/test_panoptic.py packages/frustum3d/tests/test_kmap_triton.py \
  packages/frustum3d/tests/test_decoder.py
for run in 1 2; do
  step "stream_$run" 120 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 --dtypes bf16 fp32 \
    --graphs on --repeats 3 --stream 8 --stream-only
done
step infer_torch_maps 55 env FRUSTUM3D_KMAP_TRITON=0 "$py" tools/bench_inference.py --preset full --grid 256 \
  --batches 4 --dtypes bf16 --graphs on --repeats 5
step train_3d 70 "$py" tools/bench_training.py --preset full --grid 256 --stages 3d --dtypes bf16 fp32 \
  --batches-3d 1 --repeats 3
