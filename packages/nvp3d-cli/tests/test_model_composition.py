"""The 2D network Panoptic2DNet (tiny preset): image path, shapes, frozen backbone, presets, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nvp3d.config.loading import validate_spec
from nvp3d.model.build import build_net2d, head_settings
from nvp3d.model.checkpoint import CheckpointFileError, load_stage_weights, strip_prefixes
from nvp3d.model.image import backbone_size, padded_size, to_backbone_input
from nvp3d.model.net2d import Panoptic2DNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(**model):
    return validate_spec({"model": {"preset": "tiny", **model}, "dataset": {"depth_size": [12, 16]}})


@pytest.fixture(scope="module")
def tiny() -> Panoptic2DNet:
    # frozen aggregator, as with pretrained weights (the toolkit's case); without pretrained weights and without
    # model.backbone.freeze the aggregator is trained (test_backbone_freeze.py)
    torch.manual_seed(0)
    return build_net2d(_spec(backbone={"freeze": True}))


@pytest.fixture(scope="module")
def tiny_trained() -> Panoptic2DNet:
    torch.manual_seed(0)
    return build_net2d(_spec())


def test_image_path_sizes_match_toolkit() -> None:
    assert padded_size(240, 320, 32) == (256, 320)
    assert backbone_size((256, 320), 448, 14) == (364, 448)  # the toolkit's 364 x 448
    assert padded_size(240, 320, 0) == (240, 320)
    img = torch.full((1, 3, 240, 320), 255.0)
    x, pad = to_backbone_input(img, 32, 448, 14)
    assert pad == (256, 320) and x.shape == (1, 1, 3, 364, 448)
    # padding is zero and the image is scaled to [0, 1]: the resized bottom rows mix 1 and 0
    ref = torch.nn.functional.interpolate(torch.nn.functional.pad(img / 255.0, (0, 0, 0, 16)), size=(364, 448),
                                          mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, 0], ref)
    with pytest.raises(ValueError, match="images must be"):
        to_backbone_input(torch.zeros(1, 4, 8, 8), 32, 448, 14)


def test_tiny_forward_shapes_single_and_multi_frame(tiny: Panoptic2DNet) -> None:
    img = torch.rand(2, 3, 60, 80) * 255
    out = tiny(img)
    q = head_settings(_spec())["num_object_queries"]
    assert out["pred_logits"].shape == (2, q, 14)
    assert out["padded_size"] == (64, 96)
    assert out["pred_masks"].shape[:2] == (2, q)
    assert out["pred_depths"].shape[:2] == (2, 1) and out["pred_depths"].shape[-1] == 112
    assert out["occupancy_logits"].shape == (2, 100, 12, 16)
    assert len(out["aux_outputs"]) == tiny.head_config.dec_layers
    frames = tiny(torch.rand(1, 3, 3, 60, 80) * 255)  # [B, S, 3, H, W]: frames fold into the batch
    assert frames["pred_logits"].shape == (3, q, 14)


def test_backbone_frozen_depth_head_and_head_trained(tiny: Panoptic2DNet) -> None:
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    out = tiny(torch.rand(1, 3, 60, 80) * 255)
    (out["pred_masks"].mean() + out["pred_depths"].mean() + out["occupancy_logits"].mean()).backward()
    agg = list(tiny.backbone.aggregator.parameters())
    assert all(not p.requires_grad and p.grad is None for p in agg)
    assert not tiny.backbone.aggregator.training  # frozen part stays in eval mode
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.backbone.depth_head.parameters())
    for name in ("adapter", "pixel_decoder", "predictor", "depth_projector", "occupancy_module"):
        sub = getattr(tiny.sem_seg_head, name)
        assert any(p.grad is not None for p in sub.parameters()), name


@pytest.mark.parametrize("which", ["tiny", "tiny_trained"])
def test_every_trainable_parameter_gets_a_gradient(which: str, request) -> None:
    """What DDP with find_unused_parameters=False needs: no trainable parameter is left without gradient
    (frozen aggregator and trained aggregator)."""
    tiny: Panoptic2DNet = request.getfixturevalue(which)
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    out = tiny(torch.rand(1, 3, 60, 80) * 255)
    terms = [out["pred_logits"], out["pred_masks"], out["pred_depths"], out["occupancy_logits"], out["depth_conf"]]
    terms += [t for aux in out["aux_outputs"] for t in aux.values()]
    sum(t.float().mean() for t in terms).backward()
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in tiny.named_parameters() if not p.requires_grad and not n.startswith("backbone.aggregator")]
    allowed = ("predictor.depth_embed.", "predictor.cross_transformer", "predictor.depth_decoder_norm",
               "depth_projector.proj_convs1.0.", "depth_projector.proj_convs2.0.")
    assert frozen and all(any(a in n for a in allowed) for n in frozen)


def test_preset_defaults_yield_to_explicit_keys() -> None:
    assert head_settings(_spec())["hidden_dim"] == 32
    explicit = head_settings(_spec(mask_former={"hidden_dim": 64, "nheads": 4}))
    assert explicit["hidden_dim"] == 64 and explicit["num_object_queries"] == 16
    full = head_settings(validate_spec({}))
    assert full["hidden_dim"] == 256 and full["num_object_queries"] == 100 and full["dec_layers"] == 10
    with pytest.raises(ValueError, match="depth_dim"):
        build_net2d(_spec(sem_seg_head={"depth_dim": 48}))


def test_checkpoint_loading_strips_prefixes_and_ignores_3d(tiny: Panoptic2DNet, tmp_path: Path) -> None:
    assert strip_prefixes({"module.model.a.b": 1, "model.c": 2}) == {"a.b": 1, "c": 2}
    torch.manual_seed(1)
    other = build_net2d(_spec())
    state = {f"model.{k}": v.clone() for k, v in other.state_dict().items()}
    state["model.completion.weight"] = torch.zeros(3)  # a 3D-stage key: ignored by the 2D loader
    state["criterion.empty_weight"] = torch.ones(14)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 0}, path)
    report = load_stage_weights(tiny, str(path), "2d", "train.checkpoint_2d")
    assert report.loaded == len(other.state_dict()) and report.ignored == 1 and not report.missing
    for (k, a), b in zip(tiny.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert "loaded" in str(report)
    with pytest.raises(CheckpointFileError, match="train.checkpoint_2d"):
        load_stage_weights(tiny, str(tmp_path / "missing.pth"), "2d", "train.checkpoint_2d")
    bad = {k: v for k, v in state.items()}
    first = next(k for k in bad if bad[k].dim() == 2)
    bad[first] = torch.zeros(1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="shape"):
        load_stage_weights(tiny, str(tmp_path / "bad.pth"), "2d", "evaluate.checkpoint")
