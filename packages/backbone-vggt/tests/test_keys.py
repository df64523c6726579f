"""Checkpoint compatibility: the full-size model's state_dict layout equals the reference key table."""

from __future__ import annotations

import pytest
import torch
from backbone_vggt import CheckpointError, build_aggregator, build_vggt, load_pretrained


@pytest.fixture(scope="module")
def meta_vggt():
    with torch.device("meta"):
        return build_vggt("vggt_1b")


def _table(entries):
    return [(name, tuple(shape)) for name, shape, _ in entries]


def test_full_vggt_keys_and_shapes_match_reference(meta_vggt, vggt_keys):
    ours = [(k, tuple(v.shape)) for k, v in meta_vggt.state_dict().items()]
    ref = _table(vggt_keys["vggt"]["keys"])
    ref_without_track = [e for e in ref if not e[0].startswith("track_head.")]
    # identical names, shapes and order for everything but the (not implemented) track head
    assert ours == ref_without_track
    assert len(ref) == vggt_keys["vggt"]["num_keys"] == 1797
    assert len(ref) - len(ours) == sum(e[0].startswith("track_head.") for e in ref) == 394
    counts = vggt_keys["vggt"]["params_by_module"]
    for module in ("aggregator", "camera_head", "depth_head", "point_head", "aggregator.patch_embed",
                   "aggregator.frame_blocks", "aggregator.global_blocks"):
        sub = meta_vggt.get_submodule(module)
        assert sum(p.numel() for p in sub.parameters()) == counts[module], module
    assert not meta_vggt.aggregator.patch_embed.mask_token.requires_grad
    persistent = set(meta_vggt.state_dict())
    assert "aggregator._resnet_mean" not in persistent and "aggregator._resnet_std" not in persistent


def test_aggregator_keys_match_reference(vggt_keys):
    ref = _table(vggt_keys["aggregator"]["keys"])
    with torch.device("meta"):
        agg = build_aggregator("vggt_1b")
    assert [(k, tuple(v.shape)) for k, v in agg.state_dict().items()] == ref


def test_strict_load_of_reference_table_on_meta(meta_vggt, vggt_keys):
    state = {name: torch.empty(shape, device="meta") for name, shape, _ in vggt_keys["vggt"]["keys"]}
    report = load_pretrained(meta_vggt, state, strict=True, assign=True)
    assert report.ok
    assert report.loaded == 1797 - 394
    assert report.skipped == {"track_head.": 394}
    # the aggregator alone loads the same checkpoint through its prefix
    with torch.device("meta"):
        agg = build_aggregator("vggt_1b")
    rep = load_pretrained(agg, state, strict=True, assign=True)
    assert rep.loaded == 1210


def test_strict_load_names_first_bad_key(meta_vggt, vggt_keys):
    state = {name: torch.empty(shape, device="meta") for name, shape, _ in vggt_keys["vggt"]["keys"]}
    missing = dict(state)
    del missing["aggregator.frame_blocks.3.attn.q_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*frame_blocks\.3\.attn\.q_norm\.weight.*\(64,\)"):
        load_pretrained(meta_vggt, missing, assign=True)
    extra = dict(state, **{"depth_head.extra.weight": torch.empty(3, device="meta")})
    with pytest.raises(CheckpointError, match=r"unexpected.*depth_head\.extra\.weight"):
        load_pretrained(meta_vggt, extra, assign=True)
    wrong = dict(state, **{"camera_head.embed_pose.weight": torch.empty(2048, 7, device="meta")})
    with pytest.raises(CheckpointError, match=r"camera_head\.embed_pose\.weight.*\(2048, 7\).*\(2048, 9\)"):
        load_pretrained(meta_vggt, wrong, assign=True)
    report = load_pretrained(meta_vggt, wrong, strict=False, assign=True)
    assert report.mismatched == [("camera_head.embed_pose.weight", (2048, 7), (2048, 9))]


def test_full_size_forward_shapes_on_meta(meta_vggt):
    """Shape walk of the real 1.2B model at the toolkit's 364x448 without allocating it (meta tensors)."""
    images = torch.empty(1, 1, 3, 364, 448, device="meta")
    with torch.no_grad():
        out = meta_vggt.eval()(images)
        tokens, start = meta_vggt.aggregator(images)
        (_, _), fused = meta_vggt.depth_head(tokens, images, start, return_features=True)
    assert start == 5 and len(tokens) == 24
    assert [i for i, t in enumerate(tokens) if t is not None] == [4, 11, 17, 23]
    assert tokens[23].shape == (1, 1, 5 + 26 * 32, 2048)
    assert out["depth"].shape == (1, 1, 364, 448, 1) and out["world_points"].shape == (1, 1, 364, 448, 3)
    assert out["pose_enc"].shape == (1, 1, 9)
    assert [tuple(f.shape[-2:]) for f in fused] == [(208, 256), (104, 128), (52, 64), (26, 32)]
    assert all(f.shape[:2] == (1, 256) for f in fused)


def test_small_preset_builds_and_walks_shapes():
    with torch.device("meta"):
        model = build_vggt("vggt_small").eval()
        images = torch.empty(2, 3, 28, 42)
        with torch.no_grad():
            out = model(images)
    assert model.aggregator.patch_embed.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert out["depth"].shape == (1, 2, 28, 42, 1) and out["pose_enc"].shape == (1, 2, 9)
