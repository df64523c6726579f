"""Single-image 3D panoptic reconstruction from Python: a loaded :class:`Predictor` and ``predict(image)``.

```python
from nvp3d import predict
rec = predict("room.jpg", checkpoint="runs/a_3d/train/nvpanoptix3d_model_latest.pth")
mesh = rec.to_mesh()                 # vertices in camera metres, colours by instance / class
paths = rec.save("out/")             # overlays, depth PNG, room_panoptic3d.npz, room.ply
```

* ``image``: a path, a PIL image, an ``[H, W, 3]`` uint8 array or a ``[3, H, W]`` 0..255 tensor. It is resized to
  ``dataset.target_size`` of the spec (bilinear), as the data loader does.
* ``intrinsic``: 3x3 / 4x4 pinhole matrix of the image as given (its pixel size); ``None`` = the 3D-FRONT
  intrinsic rescaled to the image size.
* ``spec``: an :class:`~nvp3d.config.ExperimentSpec`, a YAML path, or ``None`` = the ``experiment.yaml`` next to
  the checkpoint (written by ``nvp3d train``), else the model the checkpoint records (:mod:`nvp3d.model.provenance`).

A :class:`Predictor` keeps the network loaded for many images (``nvp3d inference`` uses it); ``predict`` caches
one per (checkpoint, spec) pair. The result is a :class:`~nvp3d.inference.reconstruction.Reconstruction`.

``Predictor(..., outputs=[...])`` with only 2D kinds (semantic, panoptic, depth; ``inference.outputs``) skips the
3D stage: no frustum mask, lifting, completion decoder or fusion runs, only the 2D network and its post-processing
on the lifting plane (the very arithmetic of the full path, so the 2D results are equal), and only the 2D weights
are loaded, so a 2D-stage checkpoint is enough. Its reconstructions are 2D only (``only_2d``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from frustum3d import geometry as G
from PIL import Image
from torch.utils._pytree import tree_map

from nvp3d.config import ExperimentSpec, load_spec
from nvp3d.inference.host_copy import HostCopy, start_host_copy
from nvp3d.inference.inputs import PredictInputError, as_intrinsic, load_image
from nvp3d.inference.reconstruction import MODES, Reconstruction
from nvp3d.inference.volumes import VoxelVolumes
from nvp3d.inference.writers import OUTPUT_KINDS, needs_3d, unknown_kinds
from nvp3d.model.build import build_net3d
from nvp3d.model.checkpoint import NoStageWeightsError, load_stage_weights
from nvp3d.model.fusion import fuse_voxels_batch
from nvp3d.model.provenance import apply_checkpoint_record, read_spec_record
from nvp3d.precision import tf32_matmul

#: analytic frustum masks a Predictor keeps (one per plane intrinsic; 16.7 MB each at 256^3, on the host and the
#: device): a run's images usually share one intrinsic or a few
FRUSTUM_CACHE_SIZE = 4

__all__ = ["Pending2D", "Pending3D", "Predictor", "label_space", "predict", "resolve_spec"]


def resolve_spec(spec: Any, checkpoint: str | os.PathLike[str] | None) -> Any:
    """An ExperimentSpec from a spec object, a YAML path, or the ``experiment.yaml`` next to the checkpoint."""
    if isinstance(spec, ExperimentSpec):
        return spec
    if spec is not None:
        return load_spec(Path(spec))
    if checkpoint is None:
        raise PredictInputError("give spec= (an ExperimentSpec or a YAML path) or checkpoint= of a training run")
    for folder in (Path(checkpoint).parent, Path(os.path.realpath(checkpoint)).parent):
        candidate = folder / "experiment.yaml"
        if candidate.is_file():
            return load_spec(candidate)
    record = read_spec_record(checkpoint)
    if record is not None:  # the checkpoint says what it is: no spec needed
        resolved = load_spec(None)
        apply_checkpoint_record(resolved, record, f"checkpoint {checkpoint}")
        return resolved
    raise PredictInputError(f"no experiment.yaml next to checkpoint {checkpoint} and no model record in it: pass "
                            "spec= explicitly")


def label_space(spec: Any, recorded: list[dict[str, Any]] | None = None
                ) -> tuple[dict[int, tuple[str, bool]], np.ndarray]:
    """class id -> (name, isthing) and a colour table ``[K, 3]``.

    From ``dataset.label_map`` when the spec sets one (a path, relative paths also tried below
    ``dataset.test.base_dir``, or an ``s3://``/``gs://`` URL); else the label space ``recorded`` in the checkpoint
    (:mod:`nvp3d.model.provenance`); else the 3D-FRONT default.
    """
    import json

    from datasets3d import default_colormap, is_remote, resolve_dataset_path

    entries = None
    label_map = spec.dataset.label_map
    base = spec.dataset.test.base_dir
    candidates: list[str] = [label_map] if label_map else []
    if label_map and not is_remote(label_map) and not Path(label_map).is_absolute():
        candidates.append(base.rstrip("/") + "/" + label_map if is_remote(base) else str(Path(base or ".") / label_map))
    for c in candidates:
        try:
            path = Path(resolve_dataset_path(c))
        except FileNotFoundError:
            continue
        if path.is_file():
            entries = json.loads(path.read_text())
            break
    if entries is None:
        entries = recorded or default_colormap()
    classes: dict[int, tuple[str, bool]] = {}
    colors: dict[int, tuple[int, int, int]] = {}
    for e in entries:
        cid = int(e.get("trainId", e["id"]))
        classes[cid] = (str(e.get("name", cid)), bool(e["isthing"]))
        colors[cid] = tuple(int(v) for v in e.get("color", (128, 128, 128)))
    table = np.zeros((max(classes) + 1, 3), dtype=np.uint8)
    for cid, col in colors.items():
        table[cid] = col
    return classes, table


@dataclasses.dataclass
class Pending2D:
    """A batch whose 2D network was launched by :meth:`Predictor.start` and whose 3D part is still to run."""

    prepared: list[tuple[Any, np.ndarray, np.ndarray]]
    k_plane: torch.Tensor
    frustum: torch.Tensor | None  # None without the 3D stage
    frustum_host: list[np.ndarray] | None
    image_hw: Any
    out2d: dict[str, Any]
    done: Any = None  # a CUDA event on the 2D stream (overlapped), else None
    with_3d: bool = True  # the batch runs the 3D stage (Predictor.stage_3d when it started)


@dataclasses.dataclass
class Pending3D:
    """A batch whose 3D part ran (:meth:`Predictor.finish_async`) and whose results are being copied to the host."""

    prepared: list[tuple[Any, np.ndarray, np.ndarray]]
    frustum_host: list[np.ndarray] | None
    segments_2d: list[list[dict]]
    mappings: list[dict[int, int]]  # per frame: segment id -> class (the 3D segments; without 3D: the 2D ones)
    copy: HostCopy  # per frame: 2D panoptic ids, depth, then (with_3d) the voxels' index, TDF, semantic, panoptic ids
    with_3d: bool = True


#: host arrays per frame in a Pending3D's copy, without and with the 3D stage
ARRAYS_2D, ARRAYS_3D = 2, 6


class Predictor:
    """A loaded 3D-stage network that reconstructs images one batch at a time.

    Args:
        spec: experiment spec (sizes, grid, thresholds, label map).
        checkpoint: a 3D-stage checkpoint (holds both stages' weights); with only 2D ``outputs`` a 2D-stage one
            is enough.
        device: torch device (default: CUDA when available and ``inference.num_gpus`` > 0, else CPU).
        mode: ``panoptic`` | ``instance`` | ``semantic`` (default ``inference.mode``).
        outputs: the output kinds wanted (:data:`~nvp3d.inference.writers.OUTPUT_KINDS`; None = all). Without a
            3D kind (volumes, mesh, preview) the 3D stage is skipped and its weights are not loaded (module
            docstring).
    """

    def __init__(self, spec: Any, checkpoint: str | os.PathLike[str], device: Any = None, mode: str | None = None,
                 say=print, *, outputs: Iterable[str] | None = None) -> None:
        self.spec = spec
        self.mode = mode or spec.inference.mode
        if self.mode not in MODES:
            raise PredictInputError(f"inference.mode must be one of {MODES}, got {self.mode!r}")
        #: whether batches run the 3D stage (lifting, completion decoder, fusion); ``nvp3d inference`` switches it
        #: off for a run without 3D outputs. On only where :attr:`weights_3d` is.
        self.stage_3d = _stage_3d_for(outputs)
        _check_checkpoint(checkpoint, self.stage_3d)
        record = read_spec_record(checkpoint)
        self.classes, self.colors = label_space(spec, (record or {}).get("labels"))
        stuff = tuple(c for c, (_, thing) in self.classes.items() if not thing)
        things = tuple(c for c, (_, thing) in self.classes.items() if thing)
        self.stuff_ids, self.thing_ids = stuff, things
        self.model = build_net3d(spec, things, stuff)
        #: the 3D stage's weights were loaded (a Predictor made for 2D outputs loads the 2D ones only)
        self.weights_3d = self.stage_3d
        for stage in ("2d", "3d") if self.stage_3d else ("2d",):
            say(str(_load_stage(self.model, checkpoint, stage)))
        if device is None:
            use_cuda = torch.cuda.is_available() and spec.inference.num_gpus > 0
            device = torch.device(f"cuda:{spec.inference.gpu_ids[0]}" if use_cuda else "cpu")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.precision = spec.inference.precision
        self.allow_tf32 = bool(spec.inference.allow_tf32)  # set around each forward pass, restored after it
        # inference.overlap_2d: on CUDA the next batch's 2D network runs on a low-priority stream beside this
        # batch's 3D part on a high-priority one (created on first use)
        self.overlap_2d = bool(spec.inference.overlap_2d)
        self._overlap_streams: tuple[Any, Any, Any] | None = None
        #: predict_stream's third stage (results copied on a copy stream, collected one batch later): off until
        #: it is timed and its CUDA test has run on a GPU (stop 47 timed the two-stage pipeline only)
        self.defer_host_copy = False
        # CUDA graphs of the 2D network and the decoder's dense levels (inference.cuda_graphs): only ever used on
        # CUDA in eval/no-grad calls
        self.model.enable_cuda_graphs(bool(spec.inference.cuda_graphs), compile_2d=bool(spec.inference.compile_2d),
                                      say=say)
        if spec.inference.compile_2d and not (spec.inference.cuda_graphs and self.device.type == "cuda"):
            say("inference.compile_2d: ignored, it compiles what the CUDA graphs replay (needs "
                "inference.cuda_graphs: true and a CUDA device)")
        self.geometry = self.model.geometry
        self.iso_value = float(spec.model.frustum3d.iso_recon_value)
        # analytic frustum masks per plane intrinsic: (host copy for the Reconstruction, copy on self.device); a
        # 256^3 mask is 16.7 MB, so copying it to the device per batch and back per frame cost two transfers a
        # frame. Least recently used first; at most FRUSTUM_CACHE_SIZE intrinsics (a folder of images with many
        # different intrinsics must not fill the device)
        self._frustum_cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def prepare(self, image: Any, intrinsic: Any = None) -> tuple[Any, np.ndarray, np.ndarray]:
        """(``[3, H, W]`` float tensor at the network size, uint8 image at that size, plane intrinsic 4x4)."""
        rgb = load_image(image)
        h0, w0 = rgb.shape[:2]
        tw, th = self.geometry.image_size
        if (w0, h0) != (tw, th):
            rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.BILINEAR))
        if intrinsic is None:
            k = G.front3d_intrinsic((w0, h0)).numpy()
        else:
            k = as_intrinsic(intrinsic, "intrinsic")
        k_plane = G.rescale_intrinsic(k, (w0, h0), self.geometry.plane_size).numpy()
        tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
        return tensor, rgb, k_plane

    def frustum(self, k_plane: np.ndarray) -> torch.Tensor:
        """The analytic frustum mask (bool ``[X, Y, Z]``, on the host) of a plane intrinsic, cached."""
        return self._frustum(k_plane)[0]

    def _frustum(self, k_plane: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        key = np.round(k_plane, 6).tobytes()
        if key in self._frustum_cache:
            self._frustum_cache.move_to_end(key)
        else:
            host = self.geometry.frustum(k_plane)
            self._frustum_cache[key] = (host, host.to(self.device))
            while len(self._frustum_cache) > FRUSTUM_CACHE_SIZE:
                self._frustum_cache.popitem(last=False)
        return self._frustum_cache[key]

    def _frustum_masks(self, frustum_masks: list[Any], prepared: list[tuple[Any, np.ndarray, np.ndarray]]
                       ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """The batch's masks stacked on the device, and each one as a read-only host array for its Reconstruction
        (given masks as given, copied; missing ones analytic from the cache, shared by the frames of one intrinsic:
        a copy per frame was 2 ms of the host's time)."""
        host, dev = [], []
        for f, p in zip(frustum_masks, prepared, strict=True):
            if f is None:
                h, d = self._frustum(p[2])
                mask = h.numpy().view()
            else:
                d = torch.as_tensor(f).bool().to(self.device)
                mask = d.cpu().numpy().copy()  # a given mask may live on any device, and its owner may change it
            mask.flags.writeable = False
            host.append(mask)
            dev.append(d)
        return torch.stack(dev), host

    def __call__(self, image: Any, intrinsic: Any = None, frustum_mask: Any = None) -> Reconstruction:
        return self.predict_batch([image], [intrinsic], [frustum_mask])[0]

    def predict_batch(self, images: list[Any], intrinsics: list[Any] | None = None,
                      frustum_masks: list[Any] | None = None) -> list[Reconstruction]:
        """Reconstruct several images in one forward pass (all resized to the network size)."""
        n = len(images)
        intrinsics = intrinsics or [None] * n
        prepared = [self.prepare(im, k) for im, k in zip(images, intrinsics, strict=True)]
        return self.predict_prepared(prepared, frustum_masks)

    def autocast(self) -> Any:
        """The autocast context of ``inference.precision`` (``bf16``: bfloat16 autocast; ``fp32``: off)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def predict_prepared(self, prepared: list[tuple[Any, np.ndarray, np.ndarray]],
                         frustum_masks: list[Any] | None = None) -> list[Reconstruction]:
        """Reconstruct images already passed through :meth:`prepare`, in one forward pass."""
        return self.finish(self.start(prepared, frustum_masks))

    def predict_stream(self, batches: Iterable[tuple[list[tuple[Any, np.ndarray, np.ndarray]], list[Any] | None]]
                       ) -> Iterator[list[Reconstruction]]:
        """Reconstruct a stream of ``(prepared, frustum_masks)`` batches, yielding each batch's results in order.

        A software pipeline: batch i+1's 2D network is launched (:meth:`start`) before batch i's 3D part runs
        (:meth:`finish`). With :attr:`defer_host_copy` a third stage is added: batch i's results are copied to
        the host on a copy stream and collected (:meth:`collect`) after batch i+1's 3D part has run. With
        ``inference.overlap_2d`` on CUDA the device works on the 2D network (and the copy) while the host drives
        the 3D part; elsewhere the order changes nothing.
        """
        defer = self.defer_host_copy
        launched: Pending2D | None = None  # 2D network launched, 3D part to run
        copying: Pending3D | None = None  # 3D part done, results on their way to the host (deferred copy)
        for item in itertools.chain(batches, [None]):  # None: no next batch, finish the last one
            nxt = None if item is None else self.start(*item)
            if launched is not None:
                done = self.finish_async(launched, defer_copy=defer)
                if copying is not None:
                    yield self.collect(copying)
                copying = done
                if not defer:
                    yield self.collect(copying)
                    copying = None
            launched = nxt
        if copying is not None:
            yield self.collect(copying)

    def _streams(self) -> tuple[Any, Any, Any] | None:
        """(2D stream, 3D stream, copy stream) when batches overlap (CUDA and ``inference.overlap_2d``), else None.

        The 3D stream has the higher priority: its many small kernels, each one waited on by the host (pruning,
        kernel-map sizes), go ahead of the 2D network's large ones queued beside them. The copy stream moves
        finished results to the host while the next batch's 3D part runs (:meth:`predict_stream`)."""
        if self.device.type != "cuda" or not self.overlap_2d:
            return None
        if self._overlap_streams is None:
            least, greatest = torch.cuda.Stream.priority_range()
            self._overlap_streams = (torch.cuda.Stream(self.device, priority=least),
                                     torch.cuda.Stream(self.device, priority=greatest),
                                     torch.cuda.Stream(self.device, priority=least))
        return self._overlap_streams

    def start(self, prepared: list[tuple[Any, np.ndarray, np.ndarray]], frustum_masks: list[Any] | None = None
              ) -> Pending2D:
        """Check and upload a batch and launch its 2D network; :meth:`finish` does the rest.

        On CUDA with ``inference.overlap_2d`` the 2D network runs on its own stream and this returns as soon as
        its work is queued; call :meth:`finish` of the previous batch next (:meth:`predict_stream`). Without
        :attr:`stage_3d` no frustum mask is made (``frustum_masks`` are not read)."""
        with_3d = self._with_3d()
        frustum_masks = frustum_masks or [None] * len(prepared)
        k_plane = torch.from_numpy(np.stack([p[2] for p in prepared]))
        fr, fr_host = self._frustum_masks(frustum_masks, prepared) if with_3d else (None, None)
        streams = self._streams()
        side = contextlib.nullcontext() if streams is None else torch.cuda.stream(streams[0])
        if streams is not None:  # the inputs and weights written on the caller's stream come first
            streams[0].wait_stream(torch.cuda.current_stream(self.device))
        with side, torch.no_grad(), self.autocast(), tf32_matmul(self.allow_tf32):
            x = torch.stack([p[0] for p in prepared]).to(self.device)
            if with_3d:
                fr = self.model.frustum_batch(x, fr)
            else:
                self.model.check_images(x)
            out2d = self.model.infer_2d(x)
            done = None
            if streams is not None:
                done = torch.cuda.Event()
                done.record(streams[0])
        return Pending2D(prepared=prepared, k_plane=k_plane, frustum=fr, frustum_host=fr_host, image_hw=x.shape[-2:],
                         out2d=out2d, done=done, with_3d=with_3d)

    def _with_3d(self) -> bool:
        """:attr:`stage_3d`, refused in one line where the 3D weights were not loaded."""
        if self.stage_3d and not self.weights_3d:
            raise PredictInputError("this Predictor loaded no 3D weights (made for 2D outputs only): make it with a "
                                    "3D kind (volumes, mesh or preview) in outputs= / inference.outputs")
        return self.stage_3d

    def finish(self, pending: Pending2D) -> list[Reconstruction]:
        """The 3D part, fusion and host copies of a batch started by :meth:`start`."""
        return self.collect(self.finish_async(pending))

    def finish_async(self, pending: Pending2D, defer_copy: bool = False) -> Pending3D:
        """Run the 3D part and fusion of a batch started by :meth:`start` (or, started without the 3D stage, only
        the 2D post-processing) and start copying its results to the host; :meth:`collect` waits for the copy
        and builds the results. ``defer_copy`` (overlapped batches only): copy on the copy stream, so that the
        host need not wait for it before the next batch's 3D part."""
        streams = self._streams() if pending.done is not None else None
        main = contextlib.nullcontext() if streams is None else torch.cuda.stream(streams[1])
        with main, torch.no_grad(), self.autocast(), tf32_matmul(self.allow_tf32):
            if streams is not None:
                here = streams[1]
                here.wait_event(pending.done)
                # tensors made on the 2D stream (or cached) and read here: the allocator must not hand their
                # memory to the 2D stream's next batch before this stream is done with them
                tree_map(lambda t: t.record_stream(here) if isinstance(t, torch.Tensor) and t.is_cuda else t,
                         (pending.out2d, pending.frustum))
            run = self._run_3d if pending.with_3d else self._run_2d
            tensors, segments, mappings = run(pending)
            copy = start_host_copy(tensors, stream=streams[2] if streams is not None and defer_copy else None)
        # the 2D outputs are not kept: only what the host-side results need waits for the copy
        return Pending3D(prepared=pending.prepared, frustum_host=pending.frustum_host, segments_2d=segments,
                         mappings=mappings, copy=copy, with_3d=pending.with_3d)

    def _run_3d(self, pending: Pending2D) -> tuple[list[torch.Tensor], list[list[dict]], list[dict[int, int]]]:
        """The 3D part and fusion of a batch: (the tensors to copy to the host, :data:`ARRAYS_3D` per frame; the
        2D segments and the 3D segments' classes per frame)."""
        g = self.geometry
        out = self.model.forward_3d(pending.out2d, pending.image_hw, pending.k_plane, pending.frustum)
        # the 3D result as values at the predicted voxels (about 1 MB a frame instead of 192 MiB of dense
        # volumes at 256^3); the Reconstruction builds the dense volumes when they are read
        fused = fuse_voxels_batch(out, grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=self.stuff_ids,
                                  object_mask_threshold=self.model.object_mask_threshold)
        plane = out["plane"]
        tensors = [t for b, f in enumerate(fused) for t in (
            plane.panoptic_2d[b][0], plane.depth[b].float(), f.index, f.tdf, f.semantic, f.panoptic)]
        return (tensors, [list(plane.panoptic_2d[b][1]) for b in range(len(fused))],
                [dict(f.mapping) for f in fused])

    def _run_2d(self, pending: Pending2D) -> tuple[list[torch.Tensor], list[list[dict]], list[dict[int, int]]]:
        """Without the 3D stage: the 2D post-processing of :meth:`_run_3d` alone (the same function on the same
        2D outputs, so the same 2D results); :data:`ARRAYS_2D` tensors per frame, the 2D segments, and their
        classes as each frame's segment mapping."""
        plane = self.model.plane_2d(pending.out2d, pending.image_hw)
        n = len(plane.panoptic_2d)
        tensors = [t for b in range(n) for t in (plane.panoptic_2d[b][0], plane.depth[b].float())]
        segments = [list(plane.panoptic_2d[b][1]) for b in range(n)]
        return tensors, segments, [{int(s["id"]): int(s["category_id"]) for s in segs} for segs in segments]

    def collect(self, done: Pending3D) -> list[Reconstruction]:
        """Host-side :class:`Reconstruction` per frame of a batch from :meth:`finish_async` (waits for its copy)."""
        per_frame = ARRAYS_3D if done.with_3d else ARRAYS_2D
        arrays = done.copy.arrays()
        return [self._reconstruction(done, b, arrays[b * per_frame:(b + 1) * per_frame])
                for b in range(len(done.segments_2d))]

    def _reconstruction(self, done: Pending3D, b: int, arrays: Sequence[np.ndarray]) -> Reconstruction:
        """Frame ``b``'s Reconstruction from its host ``arrays`` (2D panoptic ids, depth, then, with the 3D stage,
        the voxels' index, TDF, semantic and panoptic ids)."""
        g = self.geometry
        prepared, segs = done.prepared[b], done.segments_2d[b]
        pan2d, depth = arrays[0], arrays[1]
        voxels = VoxelVolumes(tuple(int(d) for d in g.grid_dims), float(g.truncation), *arrays[2:]) if (
            done.with_3d) else None
        meta = {"grid_dims": list(g.grid_dims), "voxel_size": g.voxel_size,
                "depth_range": [g.depth_min, g.depth_max], "truncation": g.truncation, "iso_value": self.iso_value,
                "plane_intrinsic": prepared[2], "plane_size": list(g.plane_size),
                "image_size": list(g.image_size), "grid_to_camera": g.grid_to_camera(prepared[2]).numpy()}
        mapping = done.mappings[b]
        if self.mode == "instance":  # things only (the semantic volume keeps every class, as before)
            keep = {sid for sid, c in mapping.items() if c in set(self.thing_ids)}
            if voxels is not None:
                panoptic = voxels.panoptic
                things = np.where(np.isin(panoptic, list(keep)), panoptic, 0).astype(np.int32)
                voxels = dataclasses.replace(voxels, panoptic=things)
            mapping = {sid: c for sid, c in mapping.items() if sid in keep}
        return Reconstruction(
            image=prepared[1], depth=depth, panoptic_2d=pan2d, segments_2d=segs,
            semantic_2d=semantic_of_segments(pan2d, segs), voxels=voxels, mapping=mapping,
            frustum_mask=done.frustum_host[b] if done.with_3d else None, classes=self.classes, colors=self.colors,
            meta=meta, mode=self.mode, only_2d=not done.with_3d)


def _stage_3d_for(outputs: Iterable[str] | None) -> bool:
    """Whether a Predictor for ``outputs`` (None = all kinds) runs the 3D stage; an unknown kind is refused in one
    line."""
    if outputs is not None:
        unknown = unknown_kinds(outputs)
        if unknown:
            raise PredictInputError(f"outputs: unknown kind(s) {unknown}; choose from {list(OUTPUT_KINDS)} "
                                    "(inference.outputs)")
    return needs_3d(outputs)


def _check_checkpoint(checkpoint: str | os.PathLike[str] | None, stage_3d: bool) -> None:
    """Refuse an empty or missing ``inference.checkpoint`` in one line (which kind of checkpoint the run needs)."""
    if not checkpoint:
        if stage_3d:
            raise PredictInputError("inference.checkpoint is empty: set it to a 3D-stage checkpoint "
                                    "(nvpanoptix3d_model_latest.pth of a dataset.enable_3d: true training run)")
        raise PredictInputError("inference.checkpoint is empty: set it to a checkpoint of nvp3d train (2D outputs "
                                "only: a 2D-stage panoptic_recon_3d_model_latest.pth is enough)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"inference.checkpoint={checkpoint} does not exist")


def _load_stage(model: torch.nn.Module, checkpoint: str | os.PathLike[str], stage: str) -> Any:
    """Load one stage's weights of ``inference.checkpoint``; a checkpoint without 3D weights is refused with the
    fix (a 2D-stage checkpoint writes the 2D kinds only)."""
    try:
        return load_stage_weights(model, str(checkpoint), stage, "inference.checkpoint")
    except NoStageWeightsError as exc:
        if stage != "3d":
            raise
        raise PredictInputError(f"{exc}: use a 3D-stage checkpoint, or set inference.outputs to 2D kinds only "
                                "(semantic, panoptic, depth)") from exc


def semantic_of_segments(panoptic: np.ndarray, segments: list[dict]) -> np.ndarray:
    """int32 class map of a 2D panoptic id map: each segment's ``category_id`` where its ``id`` is, 0 elsewhere
    (one table lookup instead of one pass over the map per segment)."""
    top = max([int(panoptic.max(initial=0))] + [int(s["id"]) for s in segments])
    table = np.zeros(top + 1, dtype=np.int32)
    for s in segments:
        table[int(s["id"])] = int(s["category_id"])
    return table[np.clip(panoptic, 0, top)]


_CACHE: dict[tuple[str, int, bool], Predictor] = {}


def predict(image: Any, intrinsic: Any = None, *, checkpoint: str | os.PathLike[str] | None = None,
            spec: Any = None, device: Any = None, mode: str | None = None,
            outputs: Iterable[str] | None = None) -> Reconstruction:
    """Reconstruct one image (module docstring). The loaded network is cached per (checkpoint, spec, whether the
    3D stage runs). ``outputs`` with 2D kinds only: a 2D-only reconstruction (the 3D stage skipped; a 2D-stage
    checkpoint is enough)."""
    resolved = resolve_spec(spec, checkpoint)
    ckpt = checkpoint or resolved.inference.checkpoint or resolved.evaluate.checkpoint
    key = (str(Path(ckpt).resolve()) if ckpt else "", id(spec) if spec is not None else 0, _stage_3d_for(outputs))
    predictor = _CACHE.get(key)
    if predictor is None or (mode and predictor.mode != mode):
        predictor = Predictor(resolved, ckpt, device=device, mode=mode, say=lambda *_: None, outputs=outputs)
        _CACHE.clear()
        _CACHE[key] = predictor
    return predictor(image, intrinsic)
