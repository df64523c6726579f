"""Command line of the generator (``python -m datasets3d.synth``), mirrored by ``nvp3d dataset synth``."""

from __future__ import annotations

import argparse
import json
import sys


def parse_image_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"image size must look like 320x240, got {text!r}") from exc
    if w <= 1 or h <= 1:
        raise argparse.ArgumentTypeError(f"image size must be at least 2x2, got {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets3d.synth",
                                description="Generate synthetic rooms in the processed 3D-FRONT format.")
    p.add_argument("--out", required=True, help="output dataset root (meta/ and data/ are created)")
    p.add_argument("--scenes", type=int, required=True, help="number of rooms")
    p.add_argument("--frames-per-scene", type=int, required=True, help="camera poses per room")
    p.add_argument("--grid", type=int, default=256, help="voxel grid size per axis (default 256)")
    p.add_argument("--image", type=parse_image_size, default=(320, 240), help="image size WxH (default 320x240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-test-scenes", type=int, default=0,
                   help="more rooms for the test split only (the train/val rooms stay those of --scenes)")
    p.add_argument("--voxel-size", type=float, default=None, help="metres (default 0.03*256/grid)")
    p.add_argument("--no-check", action="store_true", help="skip the per-frame geometry self-check")
    return p


def main(argv: list[str] | None = None) -> int:
    from .generate import generate

    args = build_parser().parse_args(argv)
    summary = generate(args.out, args.scenes, args.frames_per_scene, grid=args.grid, image_size=args.image,
                       seed=args.seed, voxel_size=args.voxel_size, check=not args.no_check,
                       extra_test_scenes=args.extra_test_scenes)
    summary.pop("checks", None)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
