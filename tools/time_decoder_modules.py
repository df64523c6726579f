"""Per-module time and voxel counts of the 3D decoder in one inference frame (full preset, random weights).

    uv run --frozen --no-sync python tools/time_decoder_modules.py --depth 3 --dtype bf16       # GPU
    uv run --frozen --no-sync python tools/time_decoder_modules.py --preset tiny --grid 32 --image 64x48 --depth 1
                                                                                                 # CPU smoke run

Builds the network of ``tools/bench_inference.py`` (same synthetic frame, 2D network graphed on CUDA), hooks every
module of ``model.completion`` down to ``--depth`` levels of its tree, and synchronises the device around each
call, so a row is the time from that module's first launch to its last kernel's end: what the module costs on its
own, including its kernel maps (built on first use). Prints the median over ``--repeats`` frames after one warm-up
frame, with each module's input / output voxel counts (or dense shape), then the phases of the frame. The
synchronisations serialise the host and the device, so the rows add up to more than an unhooked frame
(``bench_inference.py`` measures that); they locate the work, they do not replace the frame time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402
from frustum3d.sparse import SparseVoxels  # noqa: E402


def _size(x) -> object:
    if isinstance(x, SparseVoxels):
        return x.num_voxels
    return tuple(x.shape) if torch.is_tensor(x) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--depth", type=int, default=2, help="module-tree levels under model.completion to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.checkpoint = ""
    device = bi.prepare_run(args)
    with tempfile.TemporaryDirectory() as tmp:  # the frame is read lazily: keep it until the run ends
        data = bi.make_frame(Path(tmp) / "data", args.grid, args.image)
        _, dm, model = bi.build(args, data, device)
        run(args, dm, model, device)


def run(args, dm, model, device: torch.device) -> None:
    """Time the hooked modules over ``args.repeats`` frames (after one warm-up frame) and print the table."""
    model.eval()
    # the 2D network graphed as in inference; the decoder's dense part eager, so that its modules are timed one by one
    model.net2d.enable_cuda_graphs(device.type == "cuda")
    batch = bi.batch_of(dm, 1, device)
    times: dict[str, list[float]] = {}
    sizes: dict[str, tuple] = {}
    starts: dict[int, float] = {}

    def hooks(name: str):
        def pre(mod, inputs):
            bi._sync(device)
            starts[id(mod)] = time.perf_counter()

        def post(mod, inputs, out):
            bi._sync(device)
            times.setdefault(name, []).append(1000 * (time.perf_counter() - starts.pop(id(mod))))
            sizes[name] = ([_size(a) for a in inputs if _size(a) is not None], _size(out))
        return pre, post

    for name, mod in model.completion.named_modules():
        if name and name.count(".") < args.depth:
            pre, post = hooks(name)
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    for frame in range(1 + args.repeats):
        if frame == 1:
            times.clear()  # the first frame builds caches and compiles
        phases, _ = bi.inference_phases(model, batch, dm.stuff_ids)
        with torch.no_grad(), bi.autocast_of(device, args.dtype):
            for name, run in phases:
                bi._sync(device)
                t0 = time.perf_counter()
                run()
                bi._sync(device)
                times.setdefault(f"phase {name}", []).append(1000 * (time.perf_counter() - t0))
    print(f"{args.preset} preset, {args.grid}^3, {args.dtype}, {device}: median ms over {args.repeats} frames")
    for name, values in times.items():
        inputs, out = sizes.get(name, ([], None))
        print(f"{statistics.median(values):9.3f}  {name:36s} in {inputs} out {out}")


if __name__ == "__main__":
    main()
