"""Optimizer parameter groups and learning-rate schedulers against hand-computed references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nvp3d.training.optim import (
    WarmupPolyLR,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    warmup_poly_factor,
)
from torch import nn


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"frozen": nn.Linear(3, 3), "head": nn.Linear(3, 3), "ln": nn.LayerNorm(3)})
        self.backbone["frozen"].requires_grad_(False)
        self.decoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.mask_embed = nn.Linear(4, 4)  # contains "embed" but is an ordinary layer: decayed


def _group_of(groups: list[dict], name: str) -> dict:
    hits = [g for g in groups if name in g["names"]]
    assert len(hits) == 1, name
    return hits[0]


def test_param_groups_lr_and_decay_rules() -> None:
    model = _Toy()
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1)
    names = [n for g in groups for n in g["names"]]
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(names) == expected and len(names) == len(expected)
    assert _group_of(groups, "backbone.head.weight")["lr"] == pytest.approx(1e-4)
    assert _group_of(groups, "backbone.head.weight")["weight_decay"] == 0.05
    assert _group_of(groups, "backbone.ln.weight") == _group_of(groups, "backbone.ln.bias")
    assert _group_of(groups, "backbone.ln.weight")["weight_decay"] == 0.0
    assert _group_of(groups, "backbone.ln.weight")["lr"] == pytest.approx(1e-4)
    assert _group_of(groups, "decoder.0.weight")["weight_decay"] == 0.05
    assert _group_of(groups, "decoder.0.weight")["lr"] == 1e-3
    assert _group_of(groups, "decoder.1.weight")["weight_decay"] == 0.0
    assert _group_of(groups, "query_feat.weight")["weight_decay"] == 0.0
    assert _group_of(groups, "level_embed")["weight_decay"] == 0.0
    assert _group_of(groups, "mask_embed.weight")["weight_decay"] == 0.05


def test_build_optimizer_types_and_errors() -> None:
    groups = build_param_groups(_Toy(), lr=1e-3)
    opt = build_optimizer(groups, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-4, 1e-3])
    sgd = build_optimizer(groups, "SGD", lr=1e-3, weight_decay=0.05, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="train.optim.type"):
        build_optimizer(groups, "lamb", lr=1e-3, weight_decay=0.0)


def test_warmup_poly_matches_closed_form() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.05}])
    sched = WarmupPolyLR(opt, max_steps=20, warmup_iters=5, warmup_factor=0.1, power=0.9)
    seen = []
    for _ in range(25):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lr0, lr1) in enumerate(seen):
        warm = 0.1 * (1 - step / 5) + step / 5 if step < 5 else 1.0
        poly = max(0.0, 1 - step / 20) ** 0.9
        assert lr0 == pytest.approx(0.5 * warm * poly, abs=1e-12)
        assert lr1 == pytest.approx(0.05 * warm * poly, abs=1e-12)
    assert seen[20][0] == 0.0 and seen[24][0] == 0.0
    assert warmup_poly_factor(10, 20, 0, 1.0, 0.9) == pytest.approx(math.pow(0.5, 0.9))


def test_warmup_poly_resume_keeps_current_max_steps() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupPolyLR(opt, max_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = WarmupPolyLR(opt2, max_steps=40)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 4 and sched2.max_steps == 40
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx((1 - 5 / 40) ** 0.9)


def test_build_scheduler_intervals_and_multistep() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = build_scheduler(opt, "MultiStep", milestones=[2, 4], gamma=0.5)
    assert cfg["interval"] == "epoch"
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cfg["scheduler"].step()
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert build_scheduler(opt, "warmuppoly", max_steps=5)["interval"] == "step"
    with pytest.raises(ValueError, match="lr_scheduler"):
        build_scheduler(opt, "cosine")
    with pytest.raises(ValueError, match="max_steps"):
        WarmupPolyLR(opt, max_steps=0)


def test_freeze_list_removes_parameters_from_the_optimizer() -> None:
    from nvp3d.training.module2d import apply_freeze

    model = _Toy()
    apply_freeze(model, ["decoder", "backbone.head"])
    names = {n for g in build_param_groups(model, lr=1e-3) for n in g["names"]}
    assert not any(n.startswith(("decoder.", "backbone.head.")) for n in names)
    assert "query_feat.weight" in names and "backbone.ln.weight" in names
    with pytest.raises(ValueError, match="train.freeze entry 'nope'"):
        apply_freeze(model, ["nope"])


def test_frozen_modules_keep_their_batch_norm_statistics(synthetic_data) -> None:
    """``train.freeze`` freezes a module's statistics too: in training mode the frozen occupancy module runs in
    eval mode (its batch-norm running means stay as they were), the rest trains and updates its statistics."""
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import demo_spec
    from nvp3d.training.module2d import PanopticModule2D

    data = synthetic_data("freeze_bn", 5)
    voxel_size = json.loads((data / "meta" / "camera.json").read_text())["voxel_size"]
    spec = demo_spec(data, data / "runs", image_size=(64, 48), voxel_size=voxel_size, num_gpus=0)
    spec.train.freeze = ["sem_seg_head.occupancy_module"]
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    torch.manual_seed(0)
    module = PanopticModule2D(spec, dm.thing_ids, dm.stuff_ids)
    module.train()
    frozen = module.model.get_submodule("sem_seg_head.occupancy_module")
    trained = module.model.get_submodule("sem_seg_head.depth_projector")
    assert not any(m.training for m in frozen.modules())
    assert trained.training and module.model.training
    bn_frozen = frozen.get_submodule("decoder.bn")
    bn_trained = trained.get_submodule("proj_convs1.0.conv_block.1")
    before = bn_frozen.running_mean.clone(), bn_trained.running_mean.clone()
    batch = next(iter(dm.train_dataloader()))
    total, _, _ = module.compute_losses(batch)
    total.backward()
    assert torch.equal(bn_frozen.running_mean, before[0])
    assert not torch.equal(bn_trained.running_mean, before[1])
    assert all(p.grad is None for p in frozen.parameters())
    module.eval()
    assert not module.model.training


def test_iters_per_epoch_longer_than_the_split_holds_several_passes(synthetic_data) -> None:
    """``train.iters_per_epoch`` beyond one pass: the train loader yields that many batches, each frame once per
    pass (a long epoch instead of many short ones, whose starts each wait for the loader to refill)."""
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import demo_spec

    data = synthetic_data("passes", 5)
    voxel_size = json.loads((data / "meta" / "camera.json").read_text())["voxel_size"]
    spec = demo_spec(data, data / "runs", image_size=(64, 48), voxel_size=voxel_size, num_gpus=0)
    spec.dataset.train.batch_size = 1
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    frames = len(dm.datasets["train"])
    spec.train.iters_per_epoch = 2 * frames + 1
    loader = dm.train_dataloader()
    assert loader.sampler.passes == 3 and len(loader) == 3 * frames
    order = list(loader.sampler)
    assert all(sorted(order[k * frames:(k + 1) * frames]) == list(range(frames)) for k in range(3))


def test_adamw_runs_fused_on_cpu_fp32_only() -> None:
    """The fused AdamW kernel serves CPU fp32 training (torch's CPU default loops over the parameters) and
    computes the default AdamW's step; bf16 keeps the default (Lightning refuses clipping with a fused optimizer),
    and a resumed optimizer takes this run's choice, not the saved one."""
    from nvp3d.config.train_spec import OptimSpec
    from nvp3d.training.optim import align_fused_after_resume, fused_adamw_fits, optimization_from_spec

    optim = OptimSpec(lr=1e-2, weight_decay=0.05, lr_scheduler="MultiStep", milestones=[10])
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = _Toy()
        opt = optimization_from_spec(model, optim, "none", precision=precision)["optimizer"]
        assert all(bool(g.get("fused")) == (precision == "fp32") for g in opt.param_groups)
        for step in range(3):
            opt.zero_grad()
            x = torch.randn(2, 3, generator=torch.Generator().manual_seed(step))
            (model.backbone["head"](x).square().sum() + model.mask_embed.weight.sum() + model.level_embed.sum()).backward()
            opt.step()
        runs[precision] = (model, opt)
    for (na, a), (nb, b) in zip(runs["fp32"][0].named_parameters(), runs["bf16"][0].named_parameters()):
        assert na == nb and torch.allclose(a, b, rtol=1e-5, atol=1e-6), na
    assert not fused_adamw_fits(runs["fp32"][1].param_groups, "sgd", "fp32")

    fused_opt = runs["fp32"][1]
    align_fused_after_resume([fused_opt], "bf16")
    assert all(g["fused"] is None for g in fused_opt.param_groups)
    align_fused_after_resume([fused_opt], "fp32")
    assert all(g["fused"] is True for g in fused_opt.param_groups)
