"""A batch's targets prepared once per criterion call, and host indices sent to the device without a sync.

The set criterion matches and scores every decoder layer (10 with deep supervision) against the same targets.
Per layer it used to concatenate the labels, pad the target masks and sample them image by image, and it indexed
device tensors with the matcher's host indices: each such index is a copy from pageable host memory, which makes
the host wait until the GPU has run everything queued before it. A training step bound by the host (the small
networks on a fast GPU) loses its lead at every one of them. :class:`BatchTargets` does the per-batch work once;
:func:`host_to_device` copies host indices through pinned memory, asynchronously.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BatchTargets", "MatchedPairs", "host_to_device"]


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device``; on CUDA through pinned memory and a non-blocking copy (no stream sync)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def pad_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image ``[n_i, H_i, W_i]`` masks into ``[B, max n, max H, max W]`` (zero pad)."""
    n = max(int(m.shape[0]) for m in masks)
    h = max(int(m.shape[-2]) for m in masks)
    w = max(int(m.shape[-1]) for m in masks)
    out = masks[0].new_zeros((len(masks), n, h, w))
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]].copy_(m)
    return out


class BatchTargets:
    """The per-batch views of a list of per-image target dicts (``labels [n_i]``, ``masks [n_i, H, W]``):
    counts, all labels in image order on the device, the zero-padded masks ``[B, n_max, H, W]`` and the rows of
    the real masks in its flattened ``[B * n_max]`` view (image 0's first). Built lazily, each once."""

    def __init__(self, targets: Sequence[dict], device: torch.device | str) -> None:
        self.targets = targets
        self.device = torch.device(device)
        self.sizes = [len(t["labels"]) for t in targets]
        self.offsets = [sum(self.sizes[:b]) for b in range(len(self.sizes))]
        self._same_size = len({tuple(t["masks"].shape[-2:]) for t in targets}) == 1
        self._labels: torch.Tensor | None = None
        self._padded: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    @property
    def n_max(self) -> int:
        return max(self.sizes, default=0)

    def labels(self) -> torch.Tensor:
        """``[N]`` every target's class, image 0's first (on the device)."""
        if self._labels is None:
            self._labels = torch.cat([t["labels"].to(self.device) for t in self.targets])
        return self._labels

    def same_size_masks(self) -> bool:
        """True when every image's masks have one size (then the padded masks need no spatial padding)."""
        return self._same_size

    def padded_masks(self) -> torch.Tensor:
        """``[B, n_max, H, W]`` zero-padded target masks (on the device)."""
        if self._padded is None:
            self._padded = pad_masks([t["masks"].to(self.device) for t in self.targets])
        return self._padded

    def mask_rows(self) -> torch.Tensor:
        """Rows of the real masks in ``padded_masks().flatten(0, 1)``, image 0's first (on the device)."""
        if self._rows is None:
            n = self.n_max
            host = torch.tensor([b * n + j for b, size in enumerate(self.sizes) for j in range(size)],
                                dtype=torch.int64)
            self._rows = host_to_device(host, self.device)
        return self._rows


class MatchedPairs(list):
    """The matcher's per-image ``(query rows, target columns)`` host index pairs, with their device form built
    once: :meth:`on_device` gives ``(image, query, target, target row in the batch's label order, row in the
    padded masks)`` for every matched pair, in one pinned, non-blocking copy. One object serves one batch (the
    device form is kept from the first call)."""

    def on_device(self, batch: BatchTargets) -> tuple[torch.Tensor, ...]:
        cached = getattr(self, "_device", None)
        if cached is not None:
            return cached
        rows = []
        n_max = batch.n_max
        for b, (src, tgt) in enumerate(self):
            src, tgt = src.to(torch.int64), tgt.to(torch.int64)
            rows.append(torch.stack([torch.full_like(src, b), src, tgt, tgt + batch.offsets[b], tgt + b * n_max]))
        host = torch.cat(rows, dim=1) if rows else torch.zeros(5, 0, dtype=torch.int64)
        self._device = tuple(host_to_device(host, batch.device).unbind(0))
        return self._device
