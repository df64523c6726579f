#!/usr/bin/env bash
# The CUDA-only checks that CPU sessions cannot run, in one device call of about 6 minutes (steps 1-3 took 255 s in
# stop 39, every step passed; steps 4-5, new in stop 40, about 70 s on an H100, whose profile then had no call
# sites; docs/speed.md). Each step has its own timeout; together they allow 17 minutes, more than one 10-minute call,
# so a hanging step costs the steps after it.
#
#   bash tools/gpu_pending.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_pending_out)
#
# Why one script: the sessions that wrote these checks had no GPU, and device time comes in calls of at most
# 10 minutes. It runs, in order of how much each result decides:
#   1. the CUDA-only tests of the opt-in training graphs (train.cuda_graphs_train_2d), the sparse tensors' pinned
#      copies and the device sync count (they skip on a CPU);
#   2. tools/bench_training.py: the small preset's 2D step at batch 8 and 32, fp32, eager against the training
#      graphs, in one process (the ratio is the result; stop 32 measured 0.293 s per step at batch 32 eagerly);
#   3. tools/count_step_ops.py --device cuda: the synchronising CUDA calls left in the 2D step (stop 36: 71 in the
#      criterion, 64 of them copies of segment lists the tool had left on the host; since stop 37 its batch is moved
#      as Lightning moves one, so expect the matcher's 7);
#   4. tools/bench_inference.py --profile: one full-preset bf16 frame's GPU time and synchronising ops by call site
#      (stop 40 on an H100: 96 ms of kernels in a 154 ms frame, aten::copy_ 16.4 ms the largest, source unknown);
#   5. tools/count_step_ops.py --stage infer --device cuda: the inference forward's waits by line (stop 40: 41 in
#      the decoder).
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

step tests 180 "$py" -m pytest -q -x packages/nvp3d-cli/tests/test_graphed_train2d.py \
  packages/frustum3d/tests/test_sparse_tensor.py tests/test_count_step_ops.py
# the graphed-training test bounds the replay by 4x the eager noise it measures, which varies from run to run: repeat
# it (stop 39: 4 of 4 passed)
step graphed_repeat 150 bash -c "for i in 1 2 3 4; do \"$py\" -m pytest -q packages/nvp3d-cli/tests/test_graphed_train2d.py -k replayed_training_steps || exit 1; done"
step train_graphs 240 "$py" tools/bench_training.py --preset small --grid 64 --stages 2d --dtypes fp32 \
  --batches-2d 8 32 --train-graphs-2d off on --repeats 5 --out "$out/train_graphs.json"
step syncs_2d 90 "$py" tools/count_step_ops.py --stage 2d --preset small --batch 32 --device cuda
step profile_infer 240 "$py" tools/bench_inference.py --preset full --grid 256 --batches 1 --dtypes bf16 --graphs on \
  --repeats 3 --profile --top 30 --json "$out/profile_infer.json"
step syncs_infer 120 "$py" tools/count_step_ops.py --stage infer --preset full --grid 256 --image 320x240 --device cuda \
  --by func --top 20
