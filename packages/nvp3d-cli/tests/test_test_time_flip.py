"""``model.test_time_flip``: the 2D evaluation also runs the network on the mirrored frames and scores the merged
predictions (the merge itself is tested against brute force in maskformer-head's post-processing tests)."""

from __future__ import annotations

import json

import pytest
import torch


def _module_and_data(data, flip: bool):
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import demo_spec
    from nvp3d.training.module2d import PanopticModule2D

    voxel_size = json.loads((data / "meta" / "camera.json").read_text())["voxel_size"]
    spec = demo_spec(data, data / "runs", image_size=(64, 48), voxel_size=voxel_size, num_gpus=0,
                     test_time_flip=flip)
    spec.evaluate.num_gpus = 0
    dm = NVP3DDataModule(spec, splits=("test",))
    dm.setup("test")
    torch.manual_seed(0)
    return spec, PanopticModule2D(spec, dm.thing_ids, dm.stuff_ids), dm


@pytest.mark.parametrize("flip", [False, True])
def test_evaluation_runs_the_network_on_the_mirrored_frames(synthetic_data, flip: bool) -> None:
    from nvp3d.evaluation.evaluate import evaluate_module

    spec, module, dm = _module_and_data(synthetic_data("tta", 11), flip)
    seen: list[torch.Tensor] = []
    module.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    kpi = evaluate_module(spec, module, dm)["kpi"]
    frames = sum(b["image"].shape[0] for b in dm.test_dataloader())
    assert sum(x.shape[0] for x in seen) == frames * (2 if flip else 1)
    if flip:  # each batch once as it is, once mirrored
        for plain, mirrored in zip(seen[0::2], seen[1::2]):
            assert torch.equal(mirrored, plain.flip(-1))
    assert {"PQ", "PQ_th", "PQ_st"} <= set(kpi)  # an untrained head may find no segment at all (PQ nan)


def test_mirrored_pass_is_merged_into_masks_classes_and_depth(synthetic_data) -> None:
    # predict_panoptic with a flipped pass equals the post-processor's merge plus the mean of the two depths
    from maskformer_head import merge_flipped, resize_mask_logits

    _spec, module, dm = _module_and_data(synthetic_data("tta", 11), True)
    module.eval()
    batch = next(iter(dm.test_dataloader()))
    h, w = batch["image"].shape[-2:]
    with torch.no_grad():
        out, out_f = module.model(batch["image"]), module.model(batch["image"].flip(-1))
    merged = module.predict_panoptic(out, (h, w), out_f)
    plain = module.predict_panoptic(out, (h, w))
    padded = tuple(out["padded_size"])
    for b, r in enumerate(merged):
        cls, masks = merge_flipped(out["pred_logits"][b].float(),
                                   resize_mask_logits(out["pred_masks"][b].float(), padded, (h, w), (h, w)),
                                   out_f["pred_logits"][b].float(),
                                   resize_mask_logits(out_f["pred_masks"][b].float(), padded, (h, w), (h, w)))
        sem = torch.einsum("qc,qhw->chw", cls.softmax(-1)[:, :-1], masks.sigmoid())
        torch.testing.assert_close(r["sem_seg"], sem)
        flipped_depth = module.predict_panoptic(out_f, (h, w))[b]["depth"]
        torch.testing.assert_close(r["depth"], (plain[b]["depth"] + flipped_depth.flip(-1)) / 2)
