"""The preview's pooled mesh on ``tools/bench_writers.py``'s synthetic room: a large grid's preview is rendered
from its volumes pooled to the picture's detail (``nvp3d.inference.preview.preview_stride``), and looks like the
full-resolution mesh's."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def room(repo_root: Path, monkeypatch: pytest.MonkeyPatch):
    """``tools/bench_writers.py``'s synthetic room (walls, floor and twelve objects) at a given grid size."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_writers")
    return lambda grid: tool.synthetic_reconstruction(grid, size=(64, 48))


def test_coarse_mesh_lies_where_the_full_mesh_is_and_the_preview_looks_the_same(room) -> None:
    """``to_mesh(stride=2)`` (the preview's mesh of a large grid) has about a quarter of the faces, lies within
    about a block of the full mesh, in the same coordinates, with the same labels nearby; the preview rendered from
    it differs from the full mesh's in few pixels."""
    from nvp3d.inference.preview import render_preview
    from scipy.spatial import cKDTree

    rec = room(96)
    full, coarse = rec.to_mesh(camera_frame=False), rec.to_mesh(camera_frame=False, stride=2)
    assert 0.15 < coarse.num_faces / full.num_faces < 0.35
    dist, hit = cKDTree(full.vertices).query(coarse.vertices)
    assert np.percentile(dist, 99) < 2.0  # voxels: pooling moves surfaces out by up to a block
    assert (coarse.labels == full.labels[hit]).mean() > 0.95
    # the camera frame is the same map of the same points
    cam = rec.to_mesh(stride=2).vertices
    g2c = np.asarray(rec.meta["grid_to_camera"])
    expect = (np.concatenate([coarse.vertices + 0.5, np.ones((len(cam), 1))], 1) @ g2c.T)[:, :3]
    np.testing.assert_allclose(cam, expect, rtol=1e-5, atol=1e-6)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="stride must be a whole number"):
            rec.to_mesh(stride=bad)
    a, b = render_preview(rec.to_mesh()), render_preview(rec.to_mesh(stride=2))
    differ = (np.abs(a.astype(int) - b.astype(int)).sum(-1) > 30).mean()
    assert differ < 0.05, differ


def test_save_reconstruction_previews_a_pooled_mesh_of_a_large_grid(room, tmp_path: Path) -> None:
    """A 256^3 grid's preview is rendered from its 128^3 pooling (preview_stride 2); smaller grids at full
    resolution. The written mesh stays full resolution, and a preview alone records no mesh size."""
    from nvp3d.inference.preview import PREVIEW_CELLS, preview_stride, render_preview
    from nvp3d.inference.writers import save_reconstruction
    from PIL import Image

    assert [preview_stride((n, n, n)) for n in (64, 128, 255, 256, 384, 512)] == [1, 1, 1, 2, 3, 4]
    assert preview_stride((256, 256, 32)) == 256 // PREVIEW_CELLS
    rec = room(96)
    paths = save_reconstruction(rec, tmp_path, "f", ["mesh", "preview"])
    written = np.asarray(Image.open(paths["preview"]))
    np.testing.assert_array_equal(written, render_preview(rec.to_mesh()))  # 96^3: full resolution
    assert rec.meta["mesh_faces"] == rec.to_mesh().num_faces
    rec = room(256)
    rec.meta.pop("mesh_faces", None)
    paths = save_reconstruction(rec, tmp_path, "g", ["preview"])
    np.testing.assert_array_equal(np.asarray(Image.open(paths["preview"])), render_preview(rec.to_mesh(stride=2)))
    assert "mesh_faces" not in rec.meta and not (tmp_path / "g.ply").exists()
