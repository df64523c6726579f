"""Latency of full 2D+3D NVPanoptix3D inference per frame, with a breakdown, and 3D-stage training cost.

Run on a GPU machine (the coordinator runs it on an H100):

    uv run --frozen --no-sync python tools/bench_inference.py                 # full preset, 320x240, 256^3
    uv run --frozen --no-sync python tools/bench_inference.py --train         # + 3D training step time/memory
    uv run --frozen --no-sync python tools/bench_inference.py --preset tiny --grid 32 --image 64x48 --repeats 1
                                                                               # CPU smoke run

What it does: generates one synthetic 3D-FRONT-format frame (``datasets3d.synth``) at the requested image size
and grid (so the 3D stage sees a realistic depth and surface), builds the 3D-stage network of the preset with
random weights (no download; the timing does not depend on the weights except through pruning, see below),
and times, per frame, in fp32 and bf16 autocast, for batch 1 and the batch sizes of ``--batches`` (the best
ms/frame is reported):

* ``backbone``: VGGT aggregator + DPT depth head;
* ``head``: the 2D head (adapter, pixel decoder, depth projector, masked decoder, occupancy head);
* ``plane``: 2D post-processing to the lifting plane + the depth-feature projector;
* ``lifting``: projective + occupancy-aware lifting and their union;
* ``decoder.encoder`` (input blocks and L0..L4), ``decoder.level64`` (dense up-path and level-64 heads),
  ``decoder.level128``, ``decoder.level256`` (generative up-sampling, occupancy, geometry and mask heads),
  ``decoder.other`` (pruning, unions, query dot products: the rest of the decoder forward);
* ``fusion``: densify the TDF and 3D panoptic fusion per frame.

Module times come from forward hooks with a device synchronisation around each module (that adds a little
overhead; the ``total`` column is measured separately without hooks). Random weights predict occupancy near
0.5, so pruning keeps about half the candidates; a trained model keeps fewer voxels and runs faster at the
sparse levels. ``--checkpoint`` loads a trained 3D checkpoint instead.

``--train`` also measures one 3D-stage training step (forward, loss, backward, AdamW step) at batch 1: mean
step time and peak GPU memory (``torch.cuda.max_memory_allocated``) in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleTimer:
    """Forward-hook timer of named modules (synchronising the device around each call)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self.handles = []

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def pre(mod, args):
            _sync(self.device)
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            _sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._start.pop(id(mod))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


DECODER_GROUPS = {
    "decoder.encoder": ("input_encoders", "enc0", "enc1", "enc2", "enc3", "enc4", "adapters"),
    "decoder.level64": ("dec4", "dec3", "dec2", "occupancy_64", "segm_embed_64", "query_proj_64"),
    "decoder.level128": ("dec1", "occupancy_128", "segm_embed_128", "query_proj_128"),
    "decoder.level256": ("dec0", "occupancy_256", "geometry_head", "segm_embed_256", "query_proj_256"),
}


def make_frame(out: Path, grid: int, image: tuple[int, int]) -> Path:
    from datasets3d.synth import generate

    generate(out, scenes=1, frames_per_scene=1, grid=grid, image_size=image, seed=0, check=False)
    return out


def build(args, data: Path, device: torch.device):
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import demo_spec
    from nvp3d.model.build import build_net3d

    camera = json.loads((data / "meta" / "camera.json").read_text())
    spec = demo_spec(data, data / "runs", image_size=args.image, voxel_size=camera["voxel_size"], num_gpus=0,
                     min_instance_pixels=1, batch_size=1)
    spec.model.preset = args.preset
    spec.dataset.enable_3d = True
    f3 = spec.model.frustum3d
    f3.grid_dimensions = f3.frustum_dims = args.grid
    if args.preset == "full":
        from nvp3d.config import validate_spec
        from nvp3d.config.loading import spec_to_dict

        d = spec_to_dict(spec)
        for section in ("sem_seg_head", "mask_former"):
            d["model"].pop(section, None)  # let the full preset's defaults apply
        spec = validate_spec(d, source="bench spec")
    spec.train.optim.lr = 1e-4
    for split in ("train", "val", "test"):
        getattr(spec.dataset, split).json_path = str(data / "meta" / "train.json")
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    if args.checkpoint:
        from nvp3d.model.checkpoint import load_stage_weights

        for stage in ("2d", "3d"):
            print(load_stage_weights(model, args.checkpoint, stage, "--checkpoint"))
    return spec, dm, model.to(device)


def batch_of(dm, n: int, device: torch.device) -> dict:
    from datasets3d import collate_samples

    s = dm.datasets["train"][0]
    batch = collate_samples([s] * n)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def run_once(model, batch, stuff_ids, timer: ModuleTimer | None, device: torch.device, dtype) -> dict[str, float]:
    from nvp3d.model.fusion import fuse_batch

    t: dict[str, float] = {}
    g = model.geometry
    auto = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), auto:
        _sync(device)
        t0 = time.perf_counter()
        out2d = model.infer_2d(batch["image"])
        _sync(device)
        t1 = time.perf_counter()
        p = model.plane(out2d, batch["image"].shape[-2:])
        _sync(device)
        t2 = time.perf_counter()
        lifted, ms = model.lift(p, batch["intrinsic_reduced"], batch["frustum_mask"])
        _sync(device)
        t3 = time.perf_counter()
        out = model.completion(lifted, p.queries, batch["frustum_mask"], ms_features=ms)
        _sync(device)
        t4 = time.perf_counter()
        out["plane"] = p
        fuse_batch(out, grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=stuff_ids,
                   object_mask_threshold=model.object_mask_threshold)
        _sync(device)
        t5 = time.perf_counter()
    t.update({"2d": t1 - t0, "plane": t2 - t1, "lifting": t3 - t2, "decoder": t4 - t3, "fusion": t5 - t4,
              "total": t5 - t0, "voxels_256": float(out["geometry"].num_voxels)})
    return t


def bench_inference(args, spec, dm, model, device) -> list[dict]:
    rows = []
    model.eval()
    for dtype in args.dtypes:
        for bs in sorted(set([1, *args.batches])):
            try:
                batch = batch_of(dm, bs, device)
                first = run_once(model, batch, dm.stuff_ids, None, device, dtype)  # warm-up
                totals = []
                for _ in range(args.repeats):
                    totals.append(run_once(model, batch, dm.stuff_ids, None, device, dtype))
                # breakdown pass with module hooks
                timer = ModuleTimer(device)
                timer.attach("backbone", model.backbone)
                timer.attach("head", model.sem_seg_head)
                for group, names in DECODER_GROUPS.items():
                    for n in names:
                        m = getattr(model.completion, n, None)
                        if m is not None:
                            timer.attach(group, m)
                run_once(model, batch, dm.stuff_ids, timer, device, dtype)
                timer.times.clear()  # keep the second hooked pass (warm caches, like the unhooked repeats)
                hooked = run_once(model, batch, dm.stuff_ids, timer, device, dtype)
                timer.detach()
            except torch.cuda.OutOfMemoryError:
                print(f"{dtype} batch {bs}: out of memory")
                torch.cuda.empty_cache()
                continue
            med = {k: statistics.median(r[k] for r in totals) for k in totals[0]}
            dec_groups = {g: timer.times.get(g, 0.0) for g in DECODER_GROUPS}
            row = {"dtype": dtype, "batch": bs, "ms_per_frame": 1000 * med["total"] / bs,
                   "backbone": 1000 * timer.times.get("backbone", 0.0) / bs,
                   "head": 1000 * timer.times.get("head", 0.0) / bs, "plane": 1000 * med["plane"] / bs,
                   "lifting": 1000 * med["lifting"] / bs,
                   **{g: 1000 * v / bs for g, v in dec_groups.items()},
                   "decoder.other": 1000 * max(0.0, hooked["decoder"] - sum(dec_groups.values())) / bs,
                   "fusion": 1000 * med["fusion"] / bs, "voxels_256": med["voxels_256"] / bs,
                   "first_call_ms": 1000 * first["total"] / bs}
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def bench_train(args, spec, dm, model, device) -> list[dict]:
    from nvp3d.data.targets import gt_occupancy
    from nvp3d.training.losses import Stage3DCriterion

    crit = Stage3DCriterion(spec)
    rows = []
    for dtype in args.dtypes:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = batch_of(dm, 1, device)
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for i in range(args.repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                auto = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
                with auto:
                    out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"],
                                gt_occupancy(batch, device))
                total, terms, _ = crit(out, batch)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                _sync(device)
                if i > 0:
                    times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            print(f"train {dtype}: out of memory at batch 1")
            continue
        row = {"dtype": dtype, "step_s": statistics.median(times), "loss": float(total.detach())}
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(json.dumps({"train": row}), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["dtype", "batch", "ms_per_frame", "backbone", "head", "plane", "lifting", "decoder.encoder",
            "decoder.level64", "decoder.level128", "decoder.level256", "decoder.other", "fusion", "voxels_256"]
    cols += ["peak_mem_gb"] if rows and "peak_mem_gb" in rows[0] else []
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="full", choices=("full", "tiny"))
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--train", action="store_true", help="also time a 3D training step (batch 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    w, h = (int(v) for v in args.image.lower().split("x"))
    args.image = (w, h)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        data = make_frame(Path(tmp) / "data", args.grid, args.image)
        spec, dm, model = build(args, data, device)
        n3 = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n = sum(p.numel() for p in model.parameters())
        print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), preset "
              f"{args.preset}, grid {args.grid}^3, image {w}x{h}, parameters {n / 1e6:.1f} M ({n3 / 1e6:.2f} M trainable)")
        rows = bench_inference(args, spec, dm, model, device)
        print("\nper-frame latency in ms (breakdown from a hooked pass; ms_per_frame = unhooked median)")
        print(table(rows))
        for dtype in args.dtypes:
            best = min((r for r in rows if r["dtype"] == dtype), key=lambda r: r["ms_per_frame"], default=None)
            one = next((r for r in rows if r["dtype"] == dtype and r["batch"] == 1), None)
            if best and one:
                print(f"{dtype}: batch 1 {one['ms_per_frame']:.1f} ms/frame; best batch {best['batch']} "
                      f"{best['ms_per_frame']:.1f} ms/frame")
        if args.train:
            tr = bench_train(args, spec, dm, model, device)
            print("\n3D-stage training step at batch 1")
            for r in tr:
                mem = f", peak memory {r['peak_mem_gb']:.1f} GiB" if "peak_mem_gb" in r else ""
                print(f"{r['dtype']}: {r['step_s']:.3f} s/step{mem}")


if __name__ == "__main__":
    main()
