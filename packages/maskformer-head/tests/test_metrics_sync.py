"""``sum_over_ranks``: the statistics reduction that ``DepthAwarePanopticQuality.sync`` (and nvp3d's depth
errors) use: identity outside a process group, a sum over the ranks inside one."""

from __future__ import annotations

import torch
import torch.distributed as dist
from maskformer_head import DepthAwarePanopticQuality, sum_over_ranks


def test_outside_a_process_group_the_stats_are_returned_as_they_are() -> None:
    stats = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    assert sum_over_ranks(stats) is stats
    metric = DepthAwarePanopticQuality(thing_classes=[1], stuff_classes=[2], num_classes=3)
    before = metric.stats.clone()
    metric.sync()
    assert torch.equal(metric.stats, before)


def test_inside_a_process_group_the_stats_are_all_reduced(tmp_path) -> None:
    """One rank of gloo (the summation over two ranks is covered by nvp3d's two-process evaluation test):
    the reduced statistics come back on the CPU with the same values."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats = torch.arange(4, dtype=torch.float64)
        total = sum_over_ranks(stats)
        assert total.device.type == "cpu" and torch.equal(total, torch.arange(4, dtype=torch.float64))
    finally:
        dist.destroy_process_group()
