"""Which 2D loss term drives the shared network? Gradient norm of every weighted term, per parameter group.

    uv run --frozen --no-sync python tools/grad_terms_2d.py --out /tmp/gt                   # small preset, init
    uv run --frozen --no-sync python tools/grad_terms_2d.py --out /tmp/gt --checkpoint RUN/train2d/model_...pth
    uv run --frozen --no-sync python tools/grad_terms_2d.py --out /tmp/gt --set2d model.mask_former.mp_occ_weight=0.05

Why: the 2D recipe clips the total gradient norm (``train.clip_grad_norm``), so a term whose gradient dominates the
norm also sets how far every other term moves the shared parameters. The toolkit's multi-plane occupancy loss
sums its BCE over 100 depth bins per pixel (about 70 at initialisation, x ``mp_occ_weight`` 5), against a few
units for the panoptic terms; this tool measures what that does to the gradients instead of guessing.

What it does: generates (or reuses) synthetic scenes as ``tools/bench_learning.py`` does, builds the 2D network of
its recipe (``--recipe-2d``, ``--set2d`` overrides; random weights or ``--checkpoint``), runs the criterion on
``--batches`` training batches and, for every weighted term group (class, mask BCE, dice, each over the final and
the deep-supervision layers; depth; multi-plane occupancy), takes the gradient of that group alone with respect to
each parameter group (backbone, adapter, pixel decoder, query decoder, depth projector, occupancy head). Prints
the norms (mean over batches), the total norm and the factor the clip applies; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning import (  # noqa: E402
    RECIPE_2D,
    base_spec_2d,
    dotted,
    generate_parallel,
    merge,
    split_by_scene,
)

#: loss-key prefix -> the term group it belongs to (deep-supervision keys ``loss_ce_3`` etc. join their group)
TERM_GROUPS = {"loss_ce": "class", "loss_mask": "mask", "loss_dice": "dice", "loss_depth": "depth",
               "loss_mp_occ": "mp_occ"}


def term_group(key: str) -> str | None:
    """The group of a loss key (``loss_dice_4`` -> ``dice``), or None for keys outside :data:`TERM_GROUPS`."""
    for prefix, group in TERM_GROUPS.items():
        if key == prefix or (key.startswith(prefix + "_") and key[len(prefix) + 1:].isdigit()):
            return group
    return None


def parameter_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by part: the backbone, then each child of the 2D head."""
    groups = {"backbone": [p for p in model.backbone.parameters() if p.requires_grad]}
    for name, child in model.sem_seg_head.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            groups[name] = params
    return {k: v for k, v in groups.items() if v}


def grad_norms(total_by_group: dict[str, torch.Tensor], params: dict[str, list[torch.nn.Parameter]]
               ) -> dict[str, dict[str, float]]:
    """``{term group: {parameter group: ||d term / d params||}}`` plus an ``all`` parameter entry per term."""
    flat = [p for ps in params.values() for p in ps]
    out: dict[str, dict[str, float]] = {}
    for term, value in total_by_group.items():
        grads = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
        norms, i = {}, 0
        for name, ps in params.items():
            sq = sum(float(g.double().pow(2).sum()) for g in grads[i:i + len(ps)] if g is not None)
            norms[name] = sq ** 0.5
            i += len(ps)
        norms["all"] = sum(v * v for v in norms.values()) ** 0.5
        out[term] = norms
    return out


def build_spec(args: argparse.Namespace, data: Path) -> Any:
    """The 2D spec ``tools/bench_learning.py`` would train on ``data`` (recipe + ``--set2d``), CPU, no workers."""
    from nvp3d.config import validate_spec
    from nvp3d.demo.specs import parse_image_size

    camera = json.loads((data / "meta" / "camera.json").read_text())
    base = base_spec_2d(data, Path(args.out), parse_image_size(args.image), camera["voxel_size"], 0)
    recipe = yaml.safe_load(Path(args.recipe_2d).read_text()) or {}
    spec = merge(merge(base, recipe), dotted(args.set2d))
    spec["dataset"]["train"].update({"batch_size": args.batch, "num_workers": 0})
    return validate_spec(spec, source="grad_terms_2d spec")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="working folder (the synthetic data is generated here once)")
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--class-tint", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2, help="training batches to average over")
    ap.add_argument("--recipe-2d", default=str(RECIPE_2D))
    ap.add_argument("--set2d", action="append", default=[], help="2D spec override key=value (repeatable)")
    ap.add_argument("--checkpoint", default="", help="a 2D checkpoint of the same recipe (default: random weights)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.data.targets import criterion_targets
    from nvp3d.demo.specs import parse_image_size
    from nvp3d.model.checkpoint import load_stage_weights
    from nvp3d.training.module2d import PanopticModule2D

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "meta" / "camera.json").is_file():
        generate_parallel(data, args.scenes, 4, args.grid, parse_image_size(args.image), 0, 1, args.class_tint)
        split_by_scene(data, 1, False)
    spec = build_spec(args, data)
    dm = NVP3DDataModule(spec, stage="2d", splits=("train",))
    dm.setup()
    torch.manual_seed(0)
    module = PanopticModule2D(spec, dm.thing_ids, dm.stuff_ids)
    if args.checkpoint:
        load_stage_weights(module.model, args.checkpoint, "2d", "--checkpoint")
    module.train()
    params = parameter_groups(module.model)
    loader = dm.train_dataloader()
    weights = module.criterion.weight_dict
    sums: dict[str, dict[str, float]] = {}
    raw: dict[str, float] = {}
    seen = 0
    for batch in loader:
        if seen == args.batches:
            break
        out2d = module.model(batch["image"])
        targets = criterion_targets(batch, out2d["padded_size"], module.device, with_occupancy=module.use_occupancy)
        losses = module.criterion(out2d, targets, distributed=False)
        by_group: dict[str, torch.Tensor] = {}
        for key, value in losses.items():
            group = term_group(key)
            if group is None or key not in weights:
                continue
            by_group[group] = by_group.get(group, 0.0) + weights[key] * value
            raw[key] = raw.get(key, 0.0) + float(value.detach()) / args.batches
        by_group["total"] = sum(by_group.values())
        for term, norms in grad_norms(by_group, params).items():
            acc = sums.setdefault(term, {})
            for name, v in norms.items():
                acc[name] = acc.get(name, 0.0) + v / args.batches
        seen += 1
    clip = float(spec.train.clip_grad_norm or 0.0)
    names = list(params) + ["all"]
    print(f"gradient norm of each weighted term group (mean over {seen} batches of {args.batch}; "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'})")
    print("| term | weighted loss | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for term, norms in sums.items():
        value = sum(weights[k] * v for k, v in raw.items() if term in ("total", term_group(k)))
        print(f"| {term} | {value:.2f} | " + " | ".join(f"{norms[n]:.3g}" for n in names) + " |")
    total = sums["total"]["all"]
    if clip > 0:
        print(f"train.clip_grad_norm {clip}: the clip scales every step by {min(1.0, clip / total):.3g} "
              f"(total norm {total:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps({"norms": sums, "raw_losses": raw, "clip": clip,
                                               "checkpoint": args.checkpoint, "set2d": args.set2d}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
