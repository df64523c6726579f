"""The CPU sparse convolution's two forms on the demo's real kernel maps: per-offset loop against gather.

    uv run --frozen --no-sync python tools/bench_torch_sparse_conv.py [--threads 1] [--grid 32] [--out F.json]

Generates a few rooms of the demo's synthetic data (``nvp3d demo``'s camera, image size and grid), runs two
3D-stage training steps of the demo's tiny model (random weights: in training the 3D stage prunes with the
ground-truth occupancy, so the voxel sets are the real ones) and records every sparse convolution's input, weight
and kernel map. Each is then run in both forms of ``frustum3d.sparse.backends.torch_backend`` (forced through its
``GATHER_*`` thresholds): forward + input gradient + weight gradient, median of ``--repeats``, and both forms are
compared in float64. Prints one row per convolution (voxels in / out, K^3, channels, table fill, the form the
automatic rule picks, ms per form) and the totals: the loop everywhere, the gather everywhere, and the automatic
choice (what training runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def capture_convs(data: Path, grid: int, image: tuple[int, int]) -> list[tuple]:
    """(feats, weight, kmap) of every sparse convolution of the second of two 3D training steps."""
    import frustum3d.sparse.functional as functional
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import DEMO_LR_3D, demo_spec, spec_3d_from_2d
    from nvp3d.training.fit import build_module

    voxel = json.loads((data / "meta" / "camera.json").read_text())["voxel_size"]
    spec = demo_spec(data, data.parent / "runs", image_size=image, voxel_size=voxel, num_gpus=0,
                     random_flip="horizontal")
    s3 = spec_3d_from_2d(spec, "", grid=grid, lr=DEMO_LR_3D, mask_prior_2d=True)
    dm = NVP3DDataModule(s3, splits=("train",))
    dm.setup("fit")
    module = build_module(s3, dm, load_weights=False, say=lambda *_: None)  # random weights (docstring)
    module.train()
    captured: list[tuple] = []
    original = functional._SparseConvFunction.apply

    def record(feats, weight, kmap, backend):
        captured.append((feats.detach().clone(), weight.detach().clone(), kmap))
        return original(feats, weight, kmap, backend)

    functional._SparseConvFunction.apply = record
    try:
        for i, batch in zip(range(2), dm.train_dataloader()):
            captured.clear()
            out = module.training_step(batch, i)
            (out["loss"] if isinstance(out, dict) else out).backward()
    finally:
        functional._SparseConvFunction.apply = original
    return captured


def run_form(form: str, feats, weight, kmap, grad_out):
    """Forward and both gradients in one form (``"loop"`` or ``"gather"``)."""
    from frustum3d.sparse.backends import torch_backend as tb

    saved = (tb.GATHER_MIN_FILL, tb.GATHER_MAX_ENTRIES)
    tb.GATHER_MIN_FILL, tb.GATHER_MAX_ENTRIES = (2.0, -1) if form == "loop" else (0.0, saved[1])
    try:
        out = tb.conv_forward(feats, weight, kmap)
        grads = tb.conv_backward(feats, grad_out, weight, kmap)
    finally:
        tb.GATHER_MIN_FILL, tb.GATHER_MAX_ENTRIES = saved
    return out, *grads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo trains with 1)")
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--image", default="80x60")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from datasets3d.synth import generate
    from frustum3d.sparse.backends import torch_backend as tb
    from nvp3d.demo.specs import DEMO_CLASS_TINT, parse_image_size

    image = parse_image_size(args.image)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, scenes=4, frames_per_scene=1, grid=args.grid, image_size=image, seed=0, check=False,
                 class_tint=DEMO_CLASS_TINT)
        convs = capture_convs(data, args.grid, image)
    rows, totals = [], {"loop": 0.0, "gather": 0.0, "auto": 0.0}
    for feats, weight, kmap in convs:
        grad_out = torch.randn(kmap.num_out, weight.shape[2], generator=torch.Generator().manual_seed(0))
        ref = run_form("loop", feats.double(), weight.double(), kmap, grad_out.double())
        got = run_form("gather", feats.double(), weight.double(), kmap, grad_out.double())
        err = max(float((a - b).abs().max()) / max(1e-30, float(a.abs().max())) for a, b in zip(ref, got))
        times = {}
        for form in ("loop", "gather"):
            run_form(form, feats, weight, kmap, grad_out)
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run_form(form, feats, weight, kmap, grad_out)
                samples.append(time.perf_counter() - t0)
            times[form] = statistics.median(samples) * 1e3
        auto = "gather" if tb.uses_gather(kmap) else "loop"
        for form in ("loop", "gather"):
            totals[form] += times[form]
        totals["auto"] += times[auto]
        row = {"n_in": kmap.num_in, "n_out": kmap.num_out, "kv": kmap.kernel_volume, "c_in": int(weight.shape[1]),
               "c_out": int(weight.shape[2]), "fill": round(kmap.fill(), 3), "auto": auto,
               "loop_ms": round(times["loop"], 3), "gather_ms": round(times["gather"], 3), "rel_err_fp64": err}
        rows.append(row)
        print("in {n_in:6d} out {n_out:6d} K^3 {kv:2d} C {c_in:3d}->{c_out:3d} fill {fill:.2f} auto {auto:6s} "
              "loop {loop_ms:7.2f} ms  gather {gather_ms:7.2f} ms  fp64 rel err {rel_err_fp64:.1e}".format(**row))
        if err > 1e-10:
            print(f"the two forms disagree (relative error {err:.1e})", file=sys.stderr)
            return 1
    print(f"{len(rows)} convolutions, forward + both gradients: loop {totals['loop']:.1f} ms, gather "
          f"{totals['gather']:.1f} ms, automatic {totals['auto']:.1f} ms "
          f"({totals['loop'] / totals['auto']:.2f}x the loop)")
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "totals_ms": totals, "threads": args.threads}, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
