"""``dataset.augmentation`` -> the ``datasets3d`` augmentation fields of the training split.

Applied (train split only; validation and test frames are never augmented):

* ``random_flip`` / ``random_flip_prob``: 3D-consistent flips (image, depth, 2D labels, intrinsics and every
  volume are flipped together by datasets3d), both stages;
* ``color_aug_ssd``: SSD photometric jitter of the image, both stages;
* ``random_zoom`` (ours): a random crop of ``1/z`` of the image resampled to full size, ``z`` uniform in
  ``[min, max]``; the intrinsic, the 3D targets and the frustum mask are re-framed with it (datasets3d's
  ``augment_zoom``), both stages.

Not applied, with a notice (:func:`augmentation_notices`):

* ``gen_aug_weight > 0``: generated images do not exist in datasets3d;
* ``enable_crop`` and a resize through ``train_min_size`` / ``train_max_size``: the 3D targets are not
  re-derived for a changed frustum (datasets3d refuses them with ``enable_3d``), and in the 2D stage the
  multi-plane occupancy head predicts on the fixed ``dataset.depth_size`` plane, so samples stay at
  ``dataset.target_size``.

Every draw is a pure function of ``(train.seed, epoch, frame index)`` (datasets3d's ``AugmentKey``); the
training sampler yields those keys, so an augmented run resumes bit-exactly.
"""

from __future__ import annotations

from typing import Any

from datasets3d.augment import fields_from_toolkit

__all__ = ["augmentation_notices", "train_augmentation_fields"]

#: the ``dataset.augmentation`` keys nvp3d passes to datasets3d
APPLIED_KEYS = ("random_flip", "random_flip_prob", "color_aug_ssd", "random_zoom")


def train_augmentation_fields(spec: Any) -> dict[str, Any]:
    """``DatasetConfig`` keyword arguments for the training split (empty when nothing is switched on)."""
    aug = spec.dataset.augmentation
    zoom = tuple(aug.random_zoom) != (1.0, 1.0)
    if not (aug.random_flip and aug.random_flip_prob > 0) and not aug.color_aug_ssd and not zoom:
        return {}
    section = {k: getattr(aug, k) for k in APPLIED_KEYS}
    return fields_from_toolkit(section, seed=int(spec.train.seed))


def augmentation_notices(spec: Any) -> list[str]:
    """Set ``dataset.augmentation`` keys that this run does not apply, each with the reason."""
    aug = spec.dataset.augmentation
    found = []
    if aug.gen_aug_weight > 0:
        found.append(f"gen_aug_weight={aug.gen_aug_weight} (generated images are not supported)")
    if aug.enable_crop:
        found.append("enable_crop=true (samples stay at dataset.target_size: the 3D targets and the fixed "
                     "multi-plane occupancy plane are not re-derived for a crop; dataset.augmentation.random_zoom "
                     "is the 3D-consistent crop)")
    return found
