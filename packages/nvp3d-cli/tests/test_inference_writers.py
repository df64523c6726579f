"""Inference output writers: PLY (checked with an independent minimal PLY parser), npz, PNG, JSON, overlays
and the marching-cubes mesh (checked against the analytic sphere it was sampled from)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvp3d.fileio import write_json
from nvp3d.inference.mesh import extract_mesh, label_vertices
from nvp3d.inference.writers import (
    colorize_labels,
    depth_to_png,
    instance_palette,
    overlay,
    write_npz,
    write_ply,
    write_png,
)
from PIL import Image

_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1", "int": "<i4",
              "int32": "<i4", "uint": "<u4", "short": "<i2", "ushort": "<u2", "char": "i1"}


def parse_ply(path: Path) -> dict[str, np.ndarray]:
    """Minimal independent reader of binary little-endian and ascii PLY (vertex + triangle face lists)."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[0] == "ply"
    fmt = header[1].split()[1]
    elements: list[tuple[str, int, list]] = []
    for line in header[2:]:
        parts = line.split()
        if parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property":
            elements[-1][2].append(parts[1:])
    out: dict[str, np.ndarray] = {}
    if fmt == "ascii":
        rows = raw[end:].decode("ascii").split("\n")
        pos = 0
        for name, count, props in elements:
            vals = [list(map(float, rows[pos + i].split())) for i in range(count)]
            pos += count
            out[name] = np.array(vals) if count else np.zeros((0, len(props)))
        return out
    assert fmt == "binary_little_endian"
    offset = end
    for name, count, props in elements:
        if props[0][0] == "list":
            count_t, idx_t = _PLY_TYPES[props[0][1]], _PLY_TYPES[props[0][2]]
            dt = np.dtype([("n", count_t), ("idx", idx_t, (3,))])
            arr = np.frombuffer(raw, dtype=dt, count=count, offset=offset)
            assert (arr["n"] == 3).all()
            out[name] = arr["idx"].astype(np.int64)
        else:
            dt = np.dtype([(p[1], _PLY_TYPES[p[0]]) for p in props])
            arr = np.frombuffer(raw, dtype=dt, count=count, offset=offset)
            out[name] = arr
        offset += count * dt.itemsize
    assert offset == len(raw), "trailing bytes after the last element"
    return out


def test_ply_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 3)).astype(np.float32)
    f = rng.integers(0, 7, size=(5, 3))
    c = rng.integers(0, 256, size=(7, 3)).astype(np.uint8)
    p = write_ply(tmp_path / "m.ply", v, f, c)
    got = parse_ply(p)
    np.testing.assert_array_equal(np.stack([got["vertex"][k] for k in "xyz"], 1), v)
    np.testing.assert_array_equal(np.stack([got["vertex"][k] for k in ("red", "green", "blue")], 1), c)
    np.testing.assert_array_equal(got["face"], f)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_ply_empty_and_bad_faces(tmp_path: Path) -> None:
    p = write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    got = parse_ply(p)
    assert len(got["vertex"]) == 0 and len(got["face"]) == 0
    with pytest.raises(ValueError, match="face indices"):
        write_ply(tmp_path / "b.ply", np.zeros((2, 3)), np.array([[0, 1, 2]]))
    assert not (tmp_path / "b.ply").exists()


def test_npz_png_json(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_npz(tmp_path / "x.npz", {"a": a, "m": np.array([[1, 2]])})
    with np.load(tmp_path / "x.npz") as z:
        assert set(z.files) == {"a", "m"}
        np.testing.assert_array_equal(z["a"], a)
    img = np.random.default_rng(1).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    write_png(tmp_path / "i.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "i.png")), img)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "f.png", img.astype(np.float32))
    write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    write_json(tmp_path / "n.json", {"a": float("nan"), "b": [float("inf")]})  # strict JSON: NaN/inf are null
    assert json.loads((tmp_path / "n.json").read_text()) == {"a": None, "b": [None]}
    with pytest.raises(TypeError):  # not JSON at all: nothing is written, no temporary is left
        write_json(tmp_path / "o.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.png", "j.json", "n.json", "x.npz"]


def test_colorize_overlay_depth() -> None:
    lab = np.array([[0, 1], [2, 7]])
    table = np.array([[0, 0, 0], [10, 20, 30], [40, 50, 60]], np.uint8)
    col = colorize_labels(lab, table)
    for i in range(2):
        for j in range(2):
            want = table[lab[i, j]] if lab[i, j] < 3 else (0, 0, 0)
            assert tuple(col[i, j]) == tuple(want)
    img = np.full((2, 2, 3), 100, np.uint8)
    ov = overlay(img, col, alpha=0.5)
    assert tuple(ov[0, 0]) == (100, 100, 100)  # void pixel untouched
    assert tuple(ov[0, 1]) == (55, 60, 65)
    d = depth_to_png(np.array([[0.0, 3.0], [6.0, 9.0]]), 6.0)
    assert d.tolist() == [[0, 128], [255, 255]]
    pal = instance_palette(20)
    assert tuple(pal[0]) == (0, 0, 0) and len({tuple(p) for p in pal[1:]}) == 19


def test_mesh_of_sphere_lies_on_the_iso_surface() -> None:
    n, r, iso = 32, 8.0, 1.0
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(np.float64)
    centre = np.array([15.3, 16.1, 15.7])
    dist = np.abs(np.linalg.norm(g - centre, axis=-1) - r)
    tdf = np.minimum(dist, 3.0)
    labels = np.where(dist < 1.5, np.where(g[..., 0] < centre[0], 1, 2), 0)
    table = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    mesh = extract_mesh(tdf, iso, labels, table)
    assert mesh.num_faces > 500
    radii = np.linalg.norm(mesh.vertices - centre, axis=1)
    # two shells, at r - iso and r + iso (linear interpolation error well below a voxel)
    off = np.minimum(np.abs(radii - (r - iso)), np.abs(radii - (r + iso)))
    assert off.max() < 0.15, off.max()
    far = np.abs(mesh.vertices[:, 0] - centre[0]) > 1.5
    expect = np.where(mesh.vertices[:, 0] < centre[0], 1, 2)
    np.testing.assert_array_equal(mesh.labels[far], expect[far])
    np.testing.assert_array_equal(mesh.colors[far], table[expect[far]])
    # camera transform: a pure scale + shift of (g = p + 0.5)
    m = np.diag([0.03, 0.03, 0.03, 1.0])
    m[:3, 3] = [-1.0, -2.0, 0.5]
    moved = extract_mesh(tdf, iso, labels, table, grid_to_camera=m)
    np.testing.assert_allclose(moved.vertices, (mesh.vertices + 0.5) * 0.03 + m[:3, 3], atol=1e-5)


def test_mesh_empty_field_and_label_lookup() -> None:
    mesh = extract_mesh(np.full((8, 8, 8), 3.0), 1.0)
    assert mesh.num_vertices == 0 and mesh.num_faces == 0
    lab = np.zeros((5, 5, 5), np.int64)
    lab[0, 0, 0], lab[4, 4, 4] = 3, 9
    got = label_vertices(np.array([[0.4, 0.2, 0.0], [3.6, 4.0, 3.9], [2.4, 2.4, 2.4]]), lab)
    assert got.tolist() == [3, 9, 9]
    with pytest.raises(ValueError, match="iso_value"):
        extract_mesh(np.ones((4, 4, 4)), 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_label_vertices_is_the_nearest_labelled_voxel_by_brute_force(seed: int) -> None:
    """Direct lookups (the rounded voxel is labelled) and the KD-tree rest both give a label of a labelled voxel
    at the smallest distance; positions outside the grid and half-way ties included."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((9, 7, 8), np.int64)
    where = rng.random(lab.shape) < 0.15
    lab[where] = rng.integers(1, 6, int(where.sum()))
    pts = np.concatenate([rng.uniform(-1.5, 9.5, (300, 3)),  # some outside the grid
                          rng.integers(0, 7, (100, 3)) + np.array([0.5, 0.0, 0.0])])  # half-way ties
    got = label_vertices(pts, lab)
    idx = np.argwhere(lab != 0)
    dist = np.linalg.norm(pts[:, None, :] - idx[None, :, :], axis=2)
    best = dist.min(axis=1, keepdims=True)
    for i in range(len(pts)):
        ties = idx[np.abs(dist[i] - best[i]) < 1e-9]
        assert got[i] in {int(lab[tuple(v)]) for v in ties}, (pts[i], got[i])
    assert label_vertices(pts, np.zeros_like(lab)).tolist() == [0] * len(pts)


def test_preview_renders_an_oblique_view_of_the_mesh(tmp_path: Path) -> None:
    from nvp3d.inference.mesh import extract_mesh
    from nvp3d.inference.preview import render_preview
    from PIL import Image

    tdf = np.full((24, 24, 24), 3.0, np.float32)
    labels = np.zeros((24, 24, 24), np.int32)
    zz, yy, xx = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    for c, lab in (((7, 12, 12), 1), ((16, 12, 12), 2)):
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) - 4.0
        tdf = np.minimum(tdf, np.abs(d).astype(np.float32))
        labels[d < 1.5] = lab
    table = np.array([[0, 0, 0], [220, 30, 30], [30, 30, 220]], np.uint8)
    mesh = extract_mesh(tdf, 1.0, labels, table)
    img = render_preview(mesh, (160, 120))
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    drawn = (img != 250).any(-1)
    assert 0.05 < drawn.mean() < 0.9  # the mesh fills part of the frame
    reds = ((img[..., 0] > 2 * img[..., 2].astype(int)) & drawn).sum()
    blues = ((img[..., 2] > 2 * img[..., 0].astype(int)) & drawn).sum()
    assert reds > 50 and blues > 50  # both instances visible, in their colours
    assert (render_preview(mesh.__class__(*(a[:0] for a in (mesh.vertices, mesh.faces, mesh.colors,
                                                            mesh.labels))), (32, 24)) == 250).all()
    Image.fromarray(img).save(tmp_path / "p.png")


def _brute_force_raster(xy: np.ndarray, z: np.ndarray, colors: np.ndarray, w: int, h: int) -> np.ndarray:
    """Per pixel centre, per triangle: barycentric inside test and interpolated depth; nearest wins."""
    from nvp3d.inference.preview import BACKGROUND

    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for j in range(h):
        for i in range(w):
            p = np.array([i + 0.5, j + 0.5])
            best = np.inf
            for f in range(len(xy)):
                a, b, c = xy[f]
                area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
                if abs(area) < 1e-12:
                    continue
                w0 = ((b[0] - p[0]) * (c[1] - p[1]) - (b[1] - p[1]) * (c[0] - p[0])) / area
                w1 = ((c[0] - p[0]) * (a[1] - p[1]) - (c[1] - p[1]) * (a[0] - p[0])) / area
                w2 = 1.0 - w0 - w1
                if min(w0, w1, w2) < 0:
                    continue
                depth = w0 * z[f, 0] + w1 * z[f, 1] + w2 * z[f, 2]
                if depth < best:
                    best, img[j, i] = depth, colors[f]
    return img


def test_rasterize_matches_brute_force_z_buffer() -> None:
    """Random overlapping triangles of all sizes (sub-pixel to larger than the image, both windings, partly
    off-screen): the vectorised rasteriser equals a per-pixel brute force pixel for pixel."""
    from nvp3d.inference.preview import rasterize

    rng = np.random.default_rng(3)
    w, h = 37, 23
    centres = rng.uniform([-5, -5], [w + 5, h + 5], (60, 1, 2))
    spans = rng.choice([0.4, 2.0, 6.0, 40.0], (60, 1, 1))
    xy = centres + rng.normal(0, 1, (60, 3, 2)) * spans
    z = rng.uniform(0.5, 5.0, (60, 3))
    colors = rng.integers(0, 250, (60, 3)).astype(np.uint8)
    got = rasterize(xy, z, colors, w, h)
    assert (got != 250).any(-1).mean() > 0.5
    np.testing.assert_array_equal(got, _brute_force_raster(xy, z, colors, w, h))
    # order independence: the nearest triangle wins whatever the face order (the painter's loop did not)
    perm = rng.permutation(60)
    np.testing.assert_array_equal(rasterize(xy[perm], z[perm], colors[perm], w, h), got)


@pytest.mark.parametrize("stride,shape", [(2, (6, 5, 4)), (3, (7, 9, 3)), (1, (3, 3, 3))])
def test_pool_nearest_is_the_block_minimum_and_its_label_by_brute_force(stride: int, shape: tuple) -> None:
    """Every coarse voxel holds its block's smallest |tdf| and that voxel's label; blocks past the grid's end
    count only the voxels inside it (the padding is free space)."""
    from nvp3d.inference.mesh import pool_nearest

    rng = np.random.default_rng(stride)
    tdf = rng.uniform(-3, 3, shape).astype(np.float32)  # signed: the pooling is of the unsigned distance
    labels = rng.integers(0, 9, shape).astype(np.int32)
    field, lab = pool_nearest(tdf, labels, stride, fill=3.0)
    assert field.shape == lab.shape == tuple(-(-n // stride) for n in shape)
    for i, j, k in np.ndindex(field.shape):
        block = np.abs(tdf[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride, k * stride:(k + 1) * stride])
        blab = labels[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride, k * stride:(k + 1) * stride]
        assert field[i, j, k] == block.min()
        assert lab[i, j, k] in set(blab[block == block.min()].tolist())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="stride must be a whole number"):
            pool_nearest(tdf, labels, bad, fill=3.0)
    with pytest.raises(ValueError, match="same"):
        pool_nearest(tdf, labels[:1], 2, fill=3.0)
