#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions could not run, in one device call of about 7 minutes. Each step has its own
# timeout (together 10 minutes), so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_pending_out)
#
# Why one script: device time comes in calls of at most 10 minutes, and starts are often refused (stop 48 waited
# through five). Stop 48's checks: stop 49 ran the compiled-2D CUDA tests and the bf16 stream with and without
# inference.compile_2d (docs/speed.md), not the rest. What is open now, in order of how much each result decides:
#   1. the CUDA tests of the Predictor stream and host copies, the 2D and 3D graphs, the voxel and dense
#      fusions, lifting with a device intrinsic and frustum3d's map builders and decoder (last run: stop 48; stop 49
#      reordered the 2D graph tests' helper and changed the dense fusion's class table, neither run on a GPU);
#   2. tools/bench_inference.py --stream --stream-only with --compile-2d, bf16, batch 1 and 4, twice in a row: the
#      second process shows the warm-up with TorchInductor's on-disk cache filled by the first (stop 49, one H100,
#      first process: 76.5 / 59.2 s warm-up, stream 53.4 / 45.4 ms per frame; fp32 compiled is still unmeasured);
#   3. `nvp3d inference` on 64 images (--folder 64): stop 49 measured 2.55 images/s with 4.0 s of forward in
#      25 s, and the writers' 1.6x cheaper mesh and preview changed nothing; the row's write_seconds_mean (each
#      image's writing time in its writer process) tells whether the writers or the main process bound it, and the
#      same run writing only the volumes (inference.outputs; a third of the CPU time per image) says it again;
#      the 2D-only row (stop 52: no 3D stage at all) is the folder rate of the 2D network and its writers alone;
#   4. the torch map builders (FRUSTUM3D_KMAP_TRITON=0) against the Triton ones at batch 1 and 4;
#   5. the 3D training step (tools/bench_training.py --stages 3d).
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

# the compiled-2D tests spend most of a minute compiling (stop 49 ran them); the rest of test_cuda_graphs_2d.py is the
# graphed-vs-eager helper that stop 49 reordered without a GPU run
parallel=$("$py" -c "import xdist" 2>/dev/null && echo "-n 6")  # pytest-xdist where installed (the GPU image has it)
# shellcheck disable=SC2086
step tests 140 "$py" -m pytest -q $parallel -k "not compiled_2d_network_matches_eager_on_cpu and not compiled_graphs_match_eager" \
  packages/nvp3d-cli/tests/test_host_copy.py packages/nvp3d-cli/tests/test_cuda_graphs_2d.py \
  packages/nvp3d-cli/tests/test_inference_batching.py packages/nvp3d-cli/tests/test_cuda_graphs_3d.py \
  packages/nvp3d-cli/tests/test_stage3d_model.py packages/frustum3d/tests/test_lifting.py \
  packages/frustum3d/tests/test_panoptic.py packages/frustum3d/tests/test_kmap_triton.py \
  packages/frustum3d/tests/test_decoder.py
for run in 1 2; do
  step "stream_compiled_$run" 115 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 \
    --dtypes bf16 --graphs on --repeats 3 --stream 8 --stream-only --compile-2d
done
step folder 120 "$py" tools/bench_inference.py --preset full --grid 256 --batches 4 --dtypes bf16 --graphs on \
  --repeats 1 --stream 1 --stream-only --folder 64 --folder-configs graphed:bf16:4:8:processes \
  graphed:bf16:4:8:processes@volumes graphed:bf16:4:8:processes@semantic,panoptic,depth
step infer_torch_maps 40 env FRUSTUM3D_KMAP_TRITON=0 "$py" tools/bench_inference.py --preset full --grid 256 \
  --batches 4 --dtypes bf16 --graphs on --repeats 5
step train_3d 70 "$py" tools/bench_training.py --preset full --grid 256 --stages 3d --dtypes bf16 fp32 \
  --batches-3d 1 --repeats 3
