"""Category table (``meta/colormap.json``) and the dataset-id -> train-id mapping.

The colormap is a JSON list of ``{"color": [r,g,b], "isthing": 0|1, "id": int, "trainId": int, "name": str}``.
With ``contiguous_id=True`` the ``trainId`` values are used as given (and must exist); with
``contiguous_id=False`` the entries are sorted by ``id`` and numbered 1..N, so a colormap without
``trainId`` still works. Dataset id 0 is always "void / empty" and maps to train id 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError
from .io import read_json

# The 3D-FRONT / Matterport category table (names, thing flags and colours as in the public data tools).
FRONT3D_CATEGORIES: tuple[tuple[int, str, int, tuple[int, int, int]], ...] = (
    (1, "cabinet", 1, (220, 20, 60)),
    (2, "bed", 1, (255, 0, 0)),
    (3, "chair", 1, (0, 0, 142)),
    (4, "sofa", 1, (0, 0, 70)),
    (5, "table", 1, (0, 60, 100)),
    (6, "desk", 1, (0, 80, 100)),
    (7, "dresser", 1, (0, 0, 230)),
    (8, "lamp", 1, (119, 11, 32)),
    (9, "other", 1, (250, 170, 30)),
    (10, "wall", 0, (102, 102, 156)),
    (11, "floor", 0, (128, 64, 128)),
    (12, "ceiling", 0, (70, 70, 70)),
)


def default_colormap() -> list[dict]:
    """The 12-category table as colormap.json entries (trainId = id)."""
    return [
        {"color": list(color), "isthing": isthing, "id": cid, "trainId": cid, "name": name}
        for cid, name, isthing, color in FRONT3D_CATEGORIES
    ]


@dataclass(frozen=True)
class LabelSpace:
    """Resolved categories: train ids, thing/stuff split and a lookup table dataset id -> train id."""

    train_ids: tuple[int, ...]
    thing_ids: tuple[int, ...]
    stuff_ids: tuple[int, ...]
    names: dict[int, str]
    lut: np.ndarray  # int64 [max_dataset_id + 1]; -1 = unknown id, 0 = void
    source: str

    @property
    def identity_upto(self) -> int:
        """Largest m such that ids 0..m are all known and map to themselves (-1 if id 0 alone fails)."""
        ok = self.lut == np.arange(len(self.lut))
        return int(np.argmin(ok)) - 1 if not ok.all() else len(self.lut) - 1

    @property
    def num_classes(self) -> int:
        """Number of classes including class 0 (free space / void), e.g. 13 for 3D-FRONT."""
        return max(self.train_ids, default=0) + 1

    def map(self, ids: np.ndarray, path: Path | str) -> np.ndarray:
        """Map dataset semantic ids to train ids; unknown ids are an error naming ``path``.

        Uses a histogram instead of ``np.unique`` (no sort) so that 256^3 label volumes stay cheap, and
        returns the input unchanged when the mapping is the identity on the ids present.
        """
        ids = np.asarray(ids)
        if ids.size == 0:
            return ids
        if ids.dtype.kind == "i" and 2 ** (8 * ids.dtype.itemsize - 1) > len(self.lut):
            # one pass instead of min() + max(): negatives read as unsigned are >= 2**(bits-1) > len(lut)
            hi, lo = int(ids.view(ids.dtype.str.replace("i", "u")).max()), 0
        else:
            hi, lo = int(ids.max()), int(ids.min())
        if lo < 0 or hi >= len(self.lut):
            present = np.unique(ids)
            bad = [int(v) for v in present if v < 0 or v >= len(self.lut) or self.lut[v] < 0]
            raise DatasetFormatError(
                f"{path} contains semantic ids {bad[:10]} that are not in the colormap {self.source}; "
                "add them to the colormap or fix the data"
            )
        if self.identity_upto >= hi:
            return ids  # every id in [0, hi] is known and maps to itself: nothing to check or change
        present = np.flatnonzero(np.bincount(ids.ravel(), minlength=hi + 1))
        mapped = self.lut[present]
        if (mapped < 0).any():
            raise DatasetFormatError(
                f"{path} contains semantic ids {present[mapped < 0][:10].tolist()} that are not in the colormap "
                f"{self.source}; add them to the colormap or fix the data"
            )
        if np.array_equal(mapped, present):
            return ids
        return self.lut[ids].astype(ids.dtype if ids.dtype.kind == "i" else np.int64)


def load_label_space(path: Path, contiguous_id: bool, num_thing_classes: int | None = None) -> LabelSpace:
    """Read ``colormap.json`` and resolve train ids (see module docstring)."""
    entries = read_json(path, "colormap (label_map)")
    if not isinstance(entries, list) or not entries:
        raise DatasetFormatError(f"colormap {path} must be a non-empty JSON list of category dicts")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e or "isthing" not in e:
            raise DatasetFormatError(f"colormap {path} entry {i} ({e!r}) needs at least 'id' and 'isthing'")
        if int(e["id"]) <= 0:
            raise DatasetFormatError(f"colormap {path} entry {i} has id {e['id']}; id 0 is reserved for void")
    ids = [int(e["id"]) for e in entries]
    if len(set(ids)) != len(ids):
        raise DatasetFormatError(f"colormap {path} has duplicate ids: {sorted(ids)}")
    if contiguous_id:
        missing = [e.get("name", e["id"]) for e in entries if "trainId" not in e]
        if missing:
            raise DatasetFormatError(
                f"colormap {path}: entries {missing} have no 'trainId' but contiguous_id=True uses trainIds as "
                "given; add trainId to every entry or set contiguous_id=False to number classes 1..N by id"
            )
        train = {int(e["id"]): int(e["trainId"]) for e in entries}
        if len(set(train.values())) != len(train) or min(train.values()) <= 0:
            raise DatasetFormatError(f"colormap {path}: trainIds must be unique and >= 1, got {sorted(train.values())}")
    else:
        train = {cid: k + 1 for k, cid in enumerate(sorted(ids))}
    thing = tuple(sorted(train[int(e["id"])] for e in entries if int(e["isthing"])))
    stuff = tuple(sorted(train[int(e["id"])] for e in entries if not int(e["isthing"])))
    if num_thing_classes is not None and len(thing) != num_thing_classes:
        raise DatasetFormatError(
            f"colormap {path} marks {len(thing)} classes as things but num_thing_classes={num_thing_classes}; "
            "fix the isthing flags or num_thing_classes"
        )
    lut = np.full(max(ids) + 1, -1, dtype=np.int64)
    lut[0] = 0
    for cid, tid in train.items():
        lut[cid] = tid
    names = {train[int(e["id"])]: str(e.get("name", e["id"])) for e in entries}
    return LabelSpace(tuple(sorted(train.values())), thing, stuff, names, lut, str(path))
