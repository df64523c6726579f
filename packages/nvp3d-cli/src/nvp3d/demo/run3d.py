"""The 3D half of ``nvp3d demo``: on top of a trained tiny 2D stage, train and evaluate the 3D stage and run
inference on the held-out frames.

``demo_3d(spec_2d, out_dir, checkpoint_2d)`` derives the 3D spec (:func:`nvp3d.demo.specs.spec_3d_from_2d`; with
the 2D mask prior and lr :data:`nvp3d.demo.specs.DEMO_LR_3D`), measures the held-out PRQ of the untrained 3D stage,
trains it (``<out>/train3d``), evaluates it (``<out>/evaluate3d``, ``metrics_3d.json``) and reconstructs the
images of the first held-out room (``<out>/inference``: overlays, npz, PLY meshes, index.json). It returns a summary
with PRQ/RSQ/RRQ before and after training and the timings. The 3D spec it trained and evaluated is written to
``<out>/spec_3d.yaml`` (``evaluate.checkpoint`` set): ``nvp3d evaluate -e`` takes it, and so does
``tools/diagnose_3d.py --demo <out>``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from nvp3d.config import dump_spec
from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.demo.specs import DEMO_COARSE_MASK_WEIGHT, DEMO_LR_3D, spec_3d_from_2d
from nvp3d.evaluation.evaluate import evaluate, evaluate_module
from nvp3d.fileio import write_json
from nvp3d.inference.run import run_inference
from nvp3d.status import StatusLogger
from nvp3d.training.checkpointing import latest_file
from nvp3d.training.fit import build_module, train

__all__ = ["SPEC_3D_NAME", "demo_3d"]

#: the 3D spec of a finished demo, in its output folder
SPEC_3D_NAME = "spec_3d.yaml"


def demo_3d(spec_2d: Any, out_dir: str | Path, checkpoint_2d: str | Path, *, grid: int, epochs: int = 6,
            say=print, enable_progress_bar: bool = False, cache_data: bool = True, lr: float = DEMO_LR_3D,
            mask_prior_2d: bool = True, coarse_mask_weight: float = DEMO_COARSE_MASK_WEIGHT) -> dict[str, Any]:
    """Run the 3D half of the demo (module docstring); returns the summary (also ``<out>/demo_3d.json``).

    ``lr`` and ``mask_prior_2d`` (``model.frustum3d.mask_prior_2d``): see :data:`nvp3d.demo.specs.DEMO_LR_3D`.
    ``coarse_mask_weight`` (``model.frustum3d.coarse_mask_weight``, evaluation and inference): see
    :data:`nvp3d.demo.specs.DEMO_COARSE_MASK_WEIGHT`; when it is on, the trained stage is also evaluated with the
    plain (toolkit) fusion (``prq_after_plain``).
    """
    import torch

    out = Path(out_dir)
    cuda = torch.cuda.is_available()
    s3 = spec_3d_from_2d(spec_2d, checkpoint_2d, grid=grid, epochs=epochs, lr=lr, mask_prior_2d=mask_prior_2d,
                         coarse_mask_weight=coarse_mask_weight)
    s3.evaluate.num_gpus = s3.inference.num_gpus = 1 if cuda else 0
    t0 = time.perf_counter()
    say("demo: evaluating the untrained 3D stage (trained 2D stage, random 3D head) on the test split")
    dm = NVP3DDataModule(s3, splits=("test",))
    dm.setup("test")
    before = evaluate_module(s3, build_module(s3, dm, say=lambda *_: None), dm)["kpi"]
    say(f"demo: training the 3D stage for {epochs} epochs (results in {out / 'train3d'})")
    train_status = StatusLogger(out / "train3d" / "status.json")
    train_status.started("Starting train (3D stage, demo).")
    t1 = time.perf_counter()
    train(s3, out / "train3d", train_status, say=say, enable_progress_bar=enable_progress_bar, cache_data=cache_data)
    train_status.success("train finished successfully.")
    t_train = time.perf_counter() - t1
    s3.evaluate.checkpoint = s3.inference.checkpoint = str(out / "train3d" / latest_file("3d"))
    dump_spec(s3, out / SPEC_3D_NAME)
    eval_status = StatusLogger(out / "evaluate3d" / "status.json")
    eval_status.started("Starting evaluate (3D stage, demo).")
    after = evaluate(s3, out / "evaluate3d", eval_status, say=say)
    eval_status.success("evaluate finished successfully.", kpi={k: after[k] for k in ("PRQ", "RSQ", "RRQ")})
    plain = None
    if coarse_mask_weight > 0:  # the same checkpoint with the toolkit's fusion, for comparison
        s3_plain = s3.model_copy(deep=True)
        s3_plain.model.frustum3d.coarse_mask_weight = 0.0
        with tempfile.TemporaryDirectory() as tmp:
            plain = evaluate(s3_plain, Path(tmp), None, say=lambda *_: None)
    images = out / "inference_images"
    ds = dm.datasets["test"].base
    # the first held-out room is reconstructed, the others only evaluated; the split's entries name the frames
    # without reading them
    first_room = ds.entries[0].scene_id if ds.entries else None
    for entry in ds.entries:
        if entry.scene_id != first_room:
            continue
        # the split's local root (a remote base_dir is read from its cache mirror)
        src = Path(ds.config.root) / "data" / entry.scene_id / f"rgb_{entry.image_id}.png"
        if src.is_file():
            images.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, images / f"{entry.key}.png")
    camera = Path(ds.config.root) / "meta" / "camera.json"
    if images.is_dir() and camera.is_file():  # the images' own camera, not the 3D-FRONT default
        shutil.copy(camera, images / "camera.json")
    inf = {}
    if images.is_dir():
        s3.inference.images_dir = str(images)
        inf = run_inference(s3, out / "inference", None, say=say, enable_progress_bar=enable_progress_bar)
    summary = {"prq_before": before, "prq_after": after, "prq_after_plain": plain,
               "coarse_mask_weight": float(coarse_mask_weight), "seconds_train_3d": t_train,
               "seconds_total_3d": time.perf_counter() - t0, "inference": inf,
               "train_dir": str(out / "train3d"), "eval_dir": str(out / "evaluate3d"),
               "inference_dir": str(out / "inference")}
    write_json(out / "demo_3d.json", summary)
    coarse = f", level-128 mask logits added x{coarse_mask_weight:g}" if coarse_mask_weight > 0 else ""
    say(f"  3D held-out PRQ{coarse}: untrained {before['PRQ']:.1f} -> trained {after['PRQ']:.1f} "
        f"(RSQ {after['RSQ']:.1f}, RRQ {after['RRQ']:.1f}, things {after['PRQ_th']:.1f}); meshes in "
        f"{out / 'inference'}")
    if plain is not None:
        say(f"  3D held-out PRQ with the plain fusion: {plain['PRQ']:.1f} (things {plain['PRQ_th']:.1f})")
    return summary
