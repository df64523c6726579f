"""CUDA-graph replay of the 3D decoder's dense levels (``inference.cuda_graphs``, :mod:`nvp3d.model.graphed3d`).

On CPU: the switch installs and removes the decoder's runner, and a CPU call runs the eager method (no capture,
same outputs); the capture bookkeeping (one capture per key, the bound, a rebuild after a weight change, a failed
capture ending graph use) is checked with a stand-in for ``StaticGraph`` that runs the captured function eagerly. On CUDA (skipped without a GPU): replayed outputs equal the eager ones bit for bit, in fp32 and
under bf16 autocast, one capture per key, and an in-place weight change is seen (the capture is rebuilt).
"""

from __future__ import annotations

import pytest
import torch
from frustum3d.decoder import FrustumDecoder, decoder_input_groups
from frustum3d.sparse import SparseVoxels
from nvp3d.config import validate_spec
from nvp3d.model.graphed3d import GraphedDenseLevels

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")

GRID, FEAT, CLASSES, QUERIES = 32, 6, 5, 7
#: decoder outputs compared between the replayed and the eager runs
DENSE_KEYS = ("occupancy_64", "panoptic_64", "coords_64", "coords_128", "coords_256")


def _decoder(device: str) -> FrustumDecoder:
    torch.manual_seed(0)
    return FrustumDecoder(decoder_input_groups(FEAT, CLASSES), query_dim=12, unet_features=4, unet_output_channels=4,
                          grid_dims=(GRID,) * 3).to(device).eval()


def _inputs(device: str, batch: int = 2) -> tuple[SparseVoxels, torch.Tensor, torch.Tensor]:
    """Random lifted voxels (a slab of the grid), queries and an all-true frustum."""
    g = torch.Generator().manual_seed(batch)
    occupied = torch.zeros(batch, GRID, GRID, GRID, dtype=torch.bool)
    occupied[:, 4:28, 4:28, 10:14] = torch.rand(batch, 24, 24, 4, generator=g) < 0.7
    coords = occupied.nonzero().int()
    channels = sum(decoder_input_groups(FEAT, CLASSES))
    lifted = SparseVoxels(coords.to(device), torch.randn(coords.shape[0], channels, generator=g).to(device),
                          spatial_shape=(GRID,) * 3, batch_size=batch)
    queries = torch.randn(batch, QUERIES, 12, generator=g).to(device)
    return lifted, queries, torch.ones(batch, GRID, GRID, GRID, dtype=torch.bool, device=device)


def _run(dec: FrustumDecoder, inputs, amp: torch.dtype | None) -> dict:
    with torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = dec(*inputs)
    return {k: out[k] for k in DENSE_KEYS} | {"geometry": out["geometry"].feats, "panoptic_256": out["panoptic_256"].feats}


def _assert_equal(a: dict, b: dict) -> None:
    for key, value in b.items():
        assert torch.equal(a[key], value), key


def test_switch_installs_the_runner_and_cpu_calls_stay_eager() -> None:
    from nvp3d.model.build import build_net3d

    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {"grid_dimensions": 32, "frustum_dims": 32}},
                          "dataset": {"enable_3d": True, "target_size": [64, 48], "reduced_target_size": [32, 24],
                                      "depth_size": [24, 32]}})
    net = build_net3d(spec, (1,), (2,))
    net.enable_cuda_graphs(True)
    assert isinstance(net.completion.dense_runner, GraphedDenseLevels) and net.net2d.graphed is not None
    net.enable_cuda_graphs(False)
    assert net.completion.dense_runner is None and net.net2d.graphed is None

    dec = _decoder("cpu")
    inputs = _inputs("cpu")
    eager = _run(dec, inputs, None)
    dec.dense_runner = runner = GraphedDenseLevels(dec)
    _assert_equal(_run(dec, inputs, None), eager)
    assert runner.captures == 0 and not runner.graphs  # CPU tensors: the eager method ran


class FakeGraph:
    """Stands in for ``backbone_vggt.StaticGraph`` on CPU: 'captures' by remembering ``fn``, replays eagerly (or
    fails the capture when ``fail`` is set)."""

    fail = False
    made: list[tuple] = []

    def __init__(self, fn, example, autocast_dtype=None, capture_error_mode="global", **_kw) -> None:
        if FakeGraph.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.fn = fn
        FakeGraph.made.append((tuple(tuple(t.shape) for t in example), autocast_dtype, capture_error_mode))

    def __call__(self, *inputs):
        with torch.no_grad():
            return self.fn(*inputs)


@pytest.fixture()
def fake_runner(monkeypatch):
    """A GraphedDenseLevels that treats CPU inputs as capturable, with :class:`FakeGraph` captures."""
    from nvp3d.model import graphed3d

    FakeGraph.fail, FakeGraph.made = False, []
    monkeypatch.setattr(graphed3d, "StaticGraph", FakeGraph)
    monkeypatch.setattr(GraphedDenseLevels, "applies", lambda self, inputs: not self.fallback_reason)
    return FakeGraph


def test_one_capture_per_key_bounded_and_rebuilt_after_a_weight_change(fake_runner) -> None:
    dec = _decoder("cpu")
    said: list[str] = []
    runner = GraphedDenseLevels(dec, max_captures=2, say=said.append)
    dec.dense_runner = runner
    one, two, three = _inputs("cpu", 1), _inputs("cpu", 2), _inputs("cpu", 3)
    eager = _run(_decoder("cpu"), one, None)
    _assert_equal(_run(dec, one, None), eager)
    _run(dec, one, None)
    assert runner.captures == 1 and fake_runner.made[0][2] == "thread_local"  # other threads may use CUDA
    _run(dec, two, None)
    _run(dec, three, None)  # a third batch size: the least recently used capture goes
    assert runner.captures == 3 and len(runner.graphs) == 2
    with torch.no_grad():
        dec.occupancy_64.weight.add_(0.1)  # a new weight signature drops every capture
    _run(dec, three, None)
    assert runner.captures == 4 and len(runner.graphs) == 1 and not said


def test_a_failed_capture_runs_eagerly_from_then_on(fake_runner) -> None:
    dec = _decoder("cpu")
    inputs = _inputs("cpu")
    eager = _run(dec, inputs, None)
    said: list[str] = []
    dec.dense_runner = runner = GraphedDenseLevels(dec, say=said.append)
    fake_runner.fail = True
    _assert_equal(_run(dec, inputs, None), eager)
    assert runner.fallback_reason.startswith("RuntimeError: operation not permitted")
    assert "dense levels failed" in said[0] and runner.captures == 0
    fake_runner.fail = False
    _assert_equal(_run(dec, inputs, None), eager)
    assert runner.captures == 0 and len(said) == 2  # no second try, no second notice (message + traceback)


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_replayed_dense_levels_equal_eager_on_cuda(amp) -> None:
    dec = _decoder("cuda")
    inputs = _inputs("cuda")
    eager = _run(dec, inputs, amp)
    dec.dense_runner = runner = GraphedDenseLevels(dec)
    first, second = _run(dec, inputs, amp), _run(dec, inputs, amp)
    assert runner.captures == 1 and not runner.fallback_reason
    _assert_equal(first, eager)
    _assert_equal(second, eager)
    # an in-place weight change: read by the replay, and the weight signature rebuilds the capture
    with torch.no_grad():
        dec.occupancy_64.weight.add_(0.1)
    changed = _run(dec, inputs, amp)
    assert runner.captures == 2
    dec.dense_runner = None
    _assert_equal(changed, _run(dec, inputs, amp))
    assert not torch.equal(changed["occupancy_64"], eager["occupancy_64"])
