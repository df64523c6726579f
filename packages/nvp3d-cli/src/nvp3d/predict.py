"""Single-image 3D panoptic reconstruction from Python: ``nvp3d.predict(image) -> Reconstruction``.

```python
from nvp3d.predict import predict
rec = predict("room.jpg", checkpoint="runs/a_3d/train/nvpanoptix3d_model_latest.pth")
mesh = rec.to_mesh()                 # vertices in camera metres, colours by instance / class
paths = rec.save("out/")             # overlays, depth PNG, room_panoptic3d.npz, room.ply
```

* ``image``: a path, a PIL image, an ``[H, W, 3]`` uint8 array or a ``[3, H, W]`` 0..255 tensor. It is resized to
  ``dataset.target_size`` of the spec (bilinear), as the data loader does.
* ``intrinsic``: 3x3 / 4x4 pinhole matrix of the image as given (its pixel size); ``None`` = the 3D-FRONT
  intrinsic rescaled to the image size.
* ``spec``: an :class:`~nvp3d.config.ExperimentSpec`, a YAML path, or ``None`` = the ``experiment.yaml`` next to
  the checkpoint (written by ``nvp3d train``).

A :class:`Predictor` keeps the network loaded for many images (``nvp3d inference`` uses it); ``predict`` caches
one per (checkpoint, spec) pair.

``<name>_panoptic3d.npz`` keys (see :meth:`Reconstruction.arrays`): ``geometry`` float32 [X,Y,Z] predicted TDF
in voxels (``truncation`` = free space), ``semantic`` int32 [X,Y,Z] class per voxel (0 = none), ``panoptic``
int32 [X,Y,Z] segment id (0 = none), ``segment_ids`` / ``segment_classes`` / ``segment_is_thing`` [M] (the
id -> class mapping), ``class_ids`` / ``class_names`` / ``class_colors`` (label space), ``frustum_mask`` bool
[X,Y,Z], ``grid_dims`` [3], ``voxel_size``, ``depth_range`` [2], ``truncation``, ``iso_value``,
``plane_intrinsic`` [4,4] and ``plane_size`` [W,H] (the lifting plane), ``image_size`` [W,H] (network input),
``grid_to_camera`` [4,4] (continuous voxel coordinates -> camera metres; voxel ``i`` spans ``[i, i+1)``),
``depth`` float32 [h,w] (predicted depth on the lifting plane, metres).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODES", "Predictor", "Reconstruction", "load_image", "predict", "resolve_spec"]

MODES = ("panoptic", "instance", "semantic")


class PredictInputError(ValueError):
    """Bad image / intrinsic / checkpoint given to the predictor (the message names it and the fix)."""


# ---------------------------------------------------------------------------------------------- inputs
def load_image(image: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from a path, PIL image, array or ``[3, H, W]`` tensor (module docstring)."""
    from datasets3d.image_modes import ImageModeError, to_rgb8
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        try:
            with Image.open(p) as im:
                return to_rgb8(im, f"image {p}")  # 16-bit scaled, not clipped; unusable modes refused
        except ImageModeError as exc:
            raise PredictInputError(str(exc)) from None
        except OSError as exc:
            raise PredictInputError(f"image {p} cannot be read as an image ({exc})") from exc
    if isinstance(image, Image.Image):
        return to_rgb8(image, "image")
    try:
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.dim() != 3 or t.shape[0] != 3:
                raise PredictInputError(f"image tensor must be [3, H, W] RGB in 0..255, got {tuple(t.shape)}")
            image = t.permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise PredictInputError(f"image array must be [H, W, 3] RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def _as_intrinsic(k: Any, what: str) -> np.ndarray:
    m = np.asarray(k, dtype=np.float64)
    if m.size == 16:
        m = m.reshape(4, 4)
    elif m.size == 9:
        m4 = np.eye(4)
        m4[:3, :3] = m.reshape(3, 3)
        m = m4
    else:
        raise PredictInputError(f"{what}: an intrinsic must be 3x3 or 4x4 (9 or 16 numbers), got shape {m.shape}")
    if not (m[0, 0] > 0 and m[1, 1] > 0 and np.isfinite(m).all()):
        raise PredictInputError(f"{what}: intrinsic needs positive fx, fy and finite values, got {m[:3, :3].tolist()}")
    return m


def resolve_spec(spec: Any, checkpoint: str | os.PathLike[str] | None) -> Any:
    """An ExperimentSpec from a spec object, a YAML path, or the ``experiment.yaml`` next to the checkpoint."""
    from nvp3d.config import ExperimentSpec, load_spec

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
    raise PredictInputError(f"no experiment.yaml next to checkpoint {checkpoint}: pass spec= explicitly")


def _label_space(spec: Any) -> tuple[dict[int, tuple[str, bool]], np.ndarray]:
    """class id -> (name, isthing) and a colour table ``[K, 3]`` from ``dataset.label_map`` (or the default)."""
    import json

    from datasets3d import default_colormap

    entries = None
    label_map = spec.dataset.label_map
    candidates = [Path(label_map)] if label_map else []
    if label_map and not Path(label_map).is_absolute():
        candidates.append(Path(spec.dataset.test.base_dir or ".") / label_map)
    for c in candidates:
        if c.is_file():
            entries = json.loads(c.read_text())
            break
    if entries is None:
        entries = default_colormap()
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


# ---------------------------------------------------------------------------------------------- result
@dataclass
class Reconstruction:
    """One image's 2D and 3D prediction (arrays are numpy; see the module docstring for the npz layout)."""

    image: np.ndarray  # [H, W, 3] uint8 network input
    depth: np.ndarray  # [h, w] float32 metres on the lifting plane
    panoptic_2d: np.ndarray  # [h, w] int32 segment ids on the lifting plane
    segments_2d: list[dict]
    semantic_2d: np.ndarray  # [h, w] int32 class per pixel (0 = void)
    geometry: np.ndarray  # [X, Y, Z] float32 TDF (voxels)
    semantic: np.ndarray  # [X, Y, Z] int32
    panoptic: np.ndarray  # [X, Y, Z] int32
    mapping: dict[int, int]  # segment id -> class
    frustum_mask: np.ndarray
    classes: dict[int, tuple[str, bool]]
    colors: np.ndarray  # [K, 3] uint8 class colours
    meta: dict[str, Any] = field(default_factory=dict)
    mode: str = "panoptic"

    @property
    def is_thing(self) -> dict[int, bool]:
        return {sid: self.classes.get(c, ("", False))[1] for sid, c in self.mapping.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``_panoptic3d.npz`` content (module docstring)."""
        ids = np.array(list(self.mapping), dtype=np.int64)
        m = self.meta
        return {
            "geometry": self.geometry.astype(np.float32), "semantic": self.semantic.astype(np.int32),
            "panoptic": self.panoptic.astype(np.int32), "segment_ids": ids,
            "segment_classes": np.array([self.mapping[i] for i in ids.tolist()], dtype=np.int64),
            "segment_is_thing": np.array([self.is_thing[i] for i in ids.tolist()], dtype=bool),
            "class_ids": np.array(sorted(self.classes), dtype=np.int64),
            "class_names": np.array([self.classes[c][0] for c in sorted(self.classes)]),
            "class_colors": self.colors[np.array(sorted(self.classes))],
            "frustum_mask": self.frustum_mask.astype(bool), "grid_dims": np.array(m["grid_dims"], dtype=np.int64),
            "voxel_size": np.float64(m["voxel_size"]), "depth_range": np.array(m["depth_range"], dtype=np.float64),
            "truncation": np.float64(m["truncation"]), "iso_value": np.float64(m["iso_value"]),
            "plane_intrinsic": np.asarray(m["plane_intrinsic"], dtype=np.float64),
            "plane_size": np.array(m["plane_size"], dtype=np.int64), "image_size": np.array(m["image_size"], np.int64),
            "grid_to_camera": np.asarray(m["grid_to_camera"], dtype=np.float64), "depth": self.depth.astype(np.float32),
        }

    def _vertex_labels(self, color_by: str) -> tuple[np.ndarray, np.ndarray]:
        """(label volume, colour table) for mesh colouring: ``semantic`` = class colours; ``instance`` = one
        colour per thing segment (stuff grey); ``panoptic`` = things by instance, stuff by class colour."""
        from nvp3d.inference.writers import instance_palette

        if color_by == "semantic":
            return self.semantic, self.colors
        n = int(self.panoptic.max()) + 1 if self.panoptic.size else 1
        table = instance_palette(max(n, 2))
        for sid, cls in self.mapping.items():
            if not self.is_thing[sid]:
                table[sid] = self.colors[cls] if color_by == "panoptic" and cls < len(self.colors) else (160, 160, 160)
        return self.panoptic, table

    def to_mesh(self, color_by: str | None = None, camera_frame: bool = True) -> Any:
        """Marching-cubes mesh at the iso value (:class:`nvp3d.inference.mesh.Mesh`), coloured per vertex.

        ``color_by``: ``semantic`` | ``instance`` | ``panoptic`` (default: the prediction mode). Vertices are in
        camera metres (x right, y down, z forward), or voxel units with ``camera_frame=False``.
        """
        from nvp3d.inference.mesh import extract_mesh

        mode = color_by or self.mode
        if mode not in MODES:
            raise ValueError(f"color_by must be one of {MODES}, got {mode!r}")
        labels, table = self._vertex_labels(mode)
        return extract_mesh(self.geometry, float(self.meta["iso_value"]), labels, table,
                            grid_to_camera=self.meta["grid_to_camera"] if camera_frame else None,
                            truncation=float(self.meta["truncation"]))

    def overlays(self) -> dict[str, np.ndarray]:
        """2D images: ``semantic`` / ``panoptic`` overlays on the input and the ``depth`` grey image."""
        from PIL import Image

        from nvp3d.inference.writers import colorize_labels, depth_to_png, instance_palette, overlay

        h, w = self.image.shape[:2]

        def up(labels: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.NEAREST))

        out = {"semantic": overlay(self.image, colorize_labels(up(self.semantic_2d), self.colors))}
        if self.mode != "semantic":
            pal = instance_palette(max(int(self.panoptic_2d.max()) + 1, 2))
            for seg in self.segments_2d:
                if not seg.get("isthing"):
                    c = int(seg["category_id"])
                    pal[int(seg["id"])] = self.colors[c] if self.mode == "panoptic" else (160, 160, 160)
            out["panoptic"] = overlay(self.image, colorize_labels(up(self.panoptic_2d), pal))
        out["depth"] = depth_to_png(self.depth, float(self.meta["depth_range"][1]))
        return out

    def save(self, directory: str | os.PathLike[str], name: str = "frame") -> dict[str, str]:
        """Write the overlays, ``<name>_depth.png``, ``<name>_panoptic3d.npz`` and ``<name>.ply``; returns the
        paths by kind (all files atomic)."""
        from nvp3d.inference.writers import write_npz, write_ply, write_png

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths: dict[str, str] = {}
        for kind, img in self.overlays().items():
            paths[kind] = str(write_png(d / f"{name}_{kind}.png", img))
        paths["volumes"] = str(write_npz(d / f"{name}_panoptic3d.npz", self.arrays()))
        mesh = self.to_mesh()
        paths["mesh"] = str(write_ply(d / f"{name}.ply", mesh.vertices, mesh.faces, mesh.colors,
                                      comment=f"nvp3d {self.mode} reconstruction, camera metres"))
        self.meta["mesh_vertices"], self.meta["mesh_faces"] = mesh.num_vertices, mesh.num_faces
        return paths


# ---------------------------------------------------------------------------------------------- predictor
class Predictor:
    """A loaded 3D-stage network that reconstructs images one batch at a time.

    Args:
        spec: experiment spec (sizes, grid, thresholds, label map).
        checkpoint: a 3D-stage checkpoint (holds both stages' weights).
        device: torch device (default: CUDA when available and ``inference.num_gpus`` > 0, else CPU).
        mode: ``panoptic`` | ``instance`` | ``semantic`` (default ``inference.mode``).
    """

    def __init__(self, spec: Any, checkpoint: str | os.PathLike[str], device: Any = None, mode: str | None = None,
                 say=print) -> None:
        import torch

        from nvp3d.model.checkpoint import load_stage_weights
        from nvp3d.stage3d.builder import build_model_3d, spec_2d

        self.spec = spec
        self.mode = mode or spec.inference.mode
        if self.mode not in MODES:
            raise PredictInputError(f"inference.mode must be one of {MODES}, got {self.mode!r}")
        if not checkpoint:
            raise PredictInputError("inference.checkpoint is empty: set it to a 3D-stage checkpoint "
                                    "(nvpanoptix3d_model_latest.pth of a dataset.enable_3d: true training run)")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"inference.checkpoint={checkpoint} does not exist")
        self.classes, self.colors = _label_space(spec)
        stuff = tuple(c for c, (_, thing) in self.classes.items() if not thing)
        things = tuple(c for c, (_, thing) in self.classes.items() if thing)
        self.stuff_ids, self.thing_ids = stuff, things
        self.model = build_model_3d(spec_2d(spec), things, stuff)
        for stage in ("2d", "3d"):
            say(str(load_stage_weights(self.model, str(checkpoint), stage, "inference.checkpoint")))
        if device is None:
            use_cuda = torch.cuda.is_available() and spec.inference.num_gpus > 0
            device = torch.device(f"cuda:{spec.inference.gpu_ids[0]}" if use_cuda else "cpu")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.geometry = self.model.geometry
        self.iso_value = float(spec.model.frustum3d.iso_recon_value)
        self._frustum_cache: dict[bytes, Any] = {}

    def prepare(self, image: Any, intrinsic: Any = None) -> tuple[Any, np.ndarray, np.ndarray]:
        """(``[3, H, W]`` float tensor at the network size, uint8 image at that size, plane intrinsic 4x4)."""
        import torch
        from frustum3d import geometry as G
        from PIL import Image

        rgb = load_image(image)
        h0, w0 = rgb.shape[:2]
        tw, th = self.geometry.image_size
        if (w0, h0) != (tw, th):
            rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.BILINEAR))
        if intrinsic is None:
            k = G.front3d_intrinsic((w0, h0)).numpy()
        else:
            k = _as_intrinsic(intrinsic, "intrinsic")
        k_plane = G.rescale_intrinsic(k, (w0, h0), self.geometry.plane_size).numpy()
        tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
        return tensor, rgb, k_plane

    def frustum(self, k_plane: np.ndarray) -> Any:
        key = np.round(k_plane, 6).tobytes()
        if key not in self._frustum_cache:
            self._frustum_cache[key] = self.geometry.frustum(k_plane)
        return self._frustum_cache[key]

    def __call__(self, image: Any, intrinsic: Any = None, frustum_mask: Any = None) -> Reconstruction:
        return self.predict_batch([image], [intrinsic], [frustum_mask])[0]

    def predict_batch(self, images: list[Any], intrinsics: list[Any] | None = None,
                      frustum_masks: list[Any] | None = None) -> list[Reconstruction]:
        """Reconstruct several images in one forward pass (all resized to the network size)."""
        import torch

        from nvp3d.stage3d.fusion import fuse_batch

        n = len(images)
        intrinsics = intrinsics or [None] * n
        frustum_masks = frustum_masks or [None] * n
        prepared = [self.prepare(im, k) for im, k in zip(images, intrinsics, strict=True)]
        x = torch.stack([p[0] for p in prepared]).to(self.device)
        k_plane = torch.from_numpy(np.stack([p[2] for p in prepared]))
        fr = torch.stack([torch.as_tensor(f).bool() if f is not None else self.frustum(p[2])
                          for f, p in zip(frustum_masks, prepared, strict=True)]).to(self.device)
        g = self.geometry
        with torch.no_grad():
            out = self.model(x, k_plane, fr)
            fused = fuse_batch(out, grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=self.stuff_ids,
                               object_mask_threshold=self.model.object_mask_threshold)
        plane = out["plane"]
        results = []
        for b, f in enumerate(fused):
            pan2d, segs = plane.panoptic_2d[b]
            sem2d = torch.zeros_like(pan2d, dtype=torch.int32)
            for s in segs:
                sem2d[pan2d == s["id"]] = int(s["category_id"])
            meta = {"grid_dims": list(g.grid_dims), "voxel_size": g.voxel_size,
                    "depth_range": [g.depth_min, g.depth_max], "truncation": g.truncation, "iso_value": self.iso_value,
                    "plane_intrinsic": prepared[b][2], "plane_size": list(g.plane_size),
                    "image_size": list(g.image_size), "grid_to_camera": g.grid_to_camera(prepared[b][2]).numpy()}
            panoptic = f.panoptic.cpu().numpy()
            mapping = dict(f.mapping)
            if self.mode == "instance":  # things only
                keep = {sid for sid, c in mapping.items() if c in set(self.thing_ids)}
                panoptic = np.where(np.isin(panoptic, list(keep)), panoptic, 0).astype(np.int32)
                mapping = {sid: c for sid, c in mapping.items() if sid in keep}
            results.append(Reconstruction(
                image=prepared[b][1], depth=plane.depth[b].cpu().numpy(), panoptic_2d=pan2d.cpu().numpy(),
                segments_2d=list(segs), semantic_2d=sem2d.cpu().numpy(), geometry=f.tdf.cpu().numpy(),
                semantic=f.semantic.cpu().numpy(), panoptic=panoptic, mapping=mapping,
                frustum_mask=fr[b].cpu().numpy(), classes=self.classes, colors=self.colors, meta=meta,
                mode=self.mode))
        return results


_CACHE: dict[tuple[str, int], Predictor] = {}


def predict(image: Any, intrinsic: Any = None, *, checkpoint: str | os.PathLike[str] | None = None,
            spec: Any = None, device: Any = None, mode: str | None = None) -> Reconstruction:
    """Reconstruct one image (module docstring). The loaded network is cached per (checkpoint, spec)."""
    resolved = resolve_spec(spec, checkpoint)
    ckpt = checkpoint or resolved.inference.checkpoint or resolved.evaluate.checkpoint
    key = (str(Path(ckpt).resolve()) if ckpt else "", id(spec) if spec is not None else 0)
    predictor = _CACHE.get(key)
    if predictor is None or (mode and predictor.mode != mode):
        predictor = Predictor(resolved, ckpt, device=device, mode=mode, say=lambda *_: None)
        _CACHE.clear()
        _CACHE[key] = predictor
    return predictor(image, intrinsic)
