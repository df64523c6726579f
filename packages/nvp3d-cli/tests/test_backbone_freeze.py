"""``model.backbone.freeze``: the aggregator trains when it starts from random weights, is frozen when
pretrained weights are given (the toolkit's rule) or when asked, and gets ``lr * backbone_multiplier``."""

from __future__ import annotations

import pytest
import torch
from nvp3d.config import validate_spec
from nvp3d.model.build import build_net2d
from nvp3d.training.optim import build_param_groups


def _spec(**backbone):
    return validate_spec({"model": {"preset": "tiny", "backbone": backbone},
                          "dataset": {"target_size": [64, 48], "reduced_target_size": [32, 24],
                                      "depth_size": [24, 32]}}, source="test")


@pytest.mark.parametrize(("backbone", "frozen"), [
    ({}, False), ({"pretrained_model_path": "vggt.pt"}, True), ({"freeze": True}, True),
    ({"pretrained_model_path": "vggt.pt", "freeze": False}, False),
])
def test_freeze_rule(backbone, frozen) -> None:
    spec = _spec(**backbone)
    assert spec.model.backbone.aggregator_frozen() is frozen
    net = build_net2d(spec)
    trainable = [p.requires_grad for n, p in net.backbone.aggregator.named_parameters() if "mask_token" not in n]
    assert all(not t for t in trainable) if frozen else all(trainable)


def test_trained_aggregator_gets_gradients_and_its_lr_multiplier() -> None:
    torch.manual_seed(0)
    net = build_net2d(_spec())
    net.train()
    out = net(torch.rand(1, 3, 48, 64) * 255)
    (out["pred_masks"].mean() + out["pred_depths"].mean()).backward()
    grads = [p.grad for n, p in net.backbone.aggregator.named_parameters() if p.requires_grad]
    assert grads and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    groups = build_param_groups(net, lr=1e-3, backbone_multiplier=0.25)
    agg = [g for g in groups if any(n.startswith("backbone.aggregator.") for n in g["names"])]
    assert agg and all(g["lr"] == pytest.approx(2.5e-4) for g in agg)
    assert all(not n.startswith("backbone.") for g in groups if g["lr"] == pytest.approx(1e-3) for n in g["names"])


def test_small_preset_builds_a_vit_s_aggregator() -> None:
    spec = validate_spec({"model": {"preset": "small"}}, source="test")
    assert spec.model.sem_seg_head.depth_dim == 64 and spec.model.mask_former.hidden_dim == 128
    net = build_net2d(spec)
    assert net.backbone.aggregator.embed_dim == 384 and net.backbone_width == 224
    assert not spec.model.backbone.aggregator_frozen()


def test_input_width_resizes_the_aggregator_input() -> None:
    """``model.backbone.input_width``: null keeps the preset's width (tiny: 112 px = 8 patches); a wider input gives
    the aggregator more patches (168 px = 12 across) and finer mask features; a width that is not a multiple of
    the 14-px patch is a one-line spec error that names a valid width."""
    from nvp3d.errors import SpecError

    images = torch.rand(1, 3, 48, 64) * 255
    shapes = {}
    for width in (None, 168):
        net = build_net2d(_spec(**({} if width is None else {"input_width": width}))).eval()
        assert net.backbone_width == (112 if width is None else width)
        assert net.backbone_input(images).shape[-1] == net.backbone_width
        with torch.no_grad():
            shapes[width] = net(images)["pred_masks"].shape[-2:]
    assert shapes[168][0] > shapes[None][0] and shapes[168][1] > shapes[None][1]
    with pytest.raises(SpecError, match=r"input_width=170 must be a multiple of the 14-px patch, e\.g\. 168"):
        _spec(input_width=170)
