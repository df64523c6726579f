"""CUDA-graph replay of the 2D network (``inference.cuda_graphs``, :mod:`nvp3d.model.graphed2d`).

On CPU: the switch changes nothing (same outputs bit for bit, training and gradient calls stay eager), and the
capture bookkeeping (one capture per input shape and autocast state, re-capture after a weight change, the
fallback levels) is checked with a stand-in for ``StaticGraph`` that runs the captured function eagerly.
On CUDA (skipped without a GPU): graphed outputs match eager ones within the stated tolerances.
"""

from __future__ import annotations

import pytest
import torch
from nvp3d.config import validate_spec
from nvp3d.model import graphed2d
from nvp3d.model.build import build_net2d
from nvp3d.model.graphed2d import Graphed2D, WeightWatch, capture_key, weight_signature
from nvp3d.model.net2d import Panoptic2DNet

pytestmark = pytest.mark.usefixtures("one_thread")

#: outputs compared between graphed and eager runs
KEYS = ("pred_logits", "pred_masks", "pred_depths", "depth_conf", "occupancy_logits")
#: graphed vs eager on CUDA: fp32 max |diff| <= 1e-4 * (1 + max |eager|) (the same kernels replayed: in practice
#: 0); bf16 autocast <= 2e-2 * (1 + max |eager|) (bf16 keeps 8 bits of mantissa; kernel choice may differ)
TOLERANCE = {None: 1e-4, torch.bfloat16: 2e-2}


def _net() -> Panoptic2DNet:
    torch.manual_seed(0)
    spec = validate_spec({"model": {"preset": "tiny", "backbone": {"freeze": True}},
                          "dataset": {"depth_size": [12, 16]}})
    return build_net2d(spec).eval()


@pytest.fixture(scope="module")
def net() -> Panoptic2DNet:
    return _net()


def _images(batch: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, 3, 48, 64, generator=g) * 255).to(device)


def _assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    """``a`` equals ``b`` within ``tol * (1 + max |finite b|)`` (random depth heads overflow to inf: equal infs
    and NaNs count as equal)."""
    for k in KEYS:
        x, y = a[k].float(), b[k].float()
        finite = y[torch.isfinite(y)]
        bound = tol * (1.0 + (finite.abs().max().item() if finite.numel() else 0.0))
        torch.testing.assert_close(x, y, rtol=0.0, atol=bound, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


class FakeStaticGraph:
    """Stands in for ``backbone_vggt.StaticGraph`` on CPU: 'captures' by remembering ``fn``, replays eagerly."""

    fail_levels: set[str] = set()
    made: list[tuple] = []

    def __init__(self, fn, example, autocast_dtype=None, warmup=3, pool=None, keep_alive=None,
                 capture_error_mode="global") -> None:
        level = "full" if getattr(fn, "__name__", "") == "forward_eager" else "backbone"
        if level in self.fail_levels:
            raise RuntimeError(f"operation not permitted when stream is capturing ({level})")
        self.fn = fn
        FakeStaticGraph.made.append((level, tuple(example.shape), autocast_dtype, capture_error_mode))

    def __call__(self, x):
        with torch.no_grad():
            return self.fn(x)


@pytest.fixture()
def fake_graphs(monkeypatch):
    FakeStaticGraph.made = []
    FakeStaticGraph.fail_levels = set()
    monkeypatch.setattr(graphed2d, "StaticGraph", FakeStaticGraph)
    return FakeStaticGraph


def test_switch_is_a_no_op_on_cpu(net: Panoptic2DNet) -> None:
    x = _images(2)
    with torch.no_grad():
        eager = net(x)
        net.enable_cuda_graphs(True, say=lambda *_: None)
        try:
            assert net.graphed is not None and not net.graphed.applies(x)  # CPU input: never replayed
            switched = net(x)
        finally:
            net.enable_cuda_graphs(False)
    assert net.graphed is None
    _assert_same(switched, eager, 0.0)
    assert eager["padded_size"] == switched["padded_size"]


def test_eager_forward_is_the_forward(net: Panoptic2DNet) -> None:
    x = _images(1)
    with torch.no_grad():
        a, b = net(x), net.forward_eager(x)
    _assert_same(a, b, 0.0)


def test_graphs_never_apply_in_training_or_with_gradients(net: Panoptic2DNet) -> None:
    g = Graphed2D(net, say=lambda *_: None)
    x = _images(1)
    cuda_like = x.new_empty(0)  # is_cuda is False on this machine: check the other conditions on a mock
    assert not g.applies(cuda_like)

    class Cuda:
        is_cuda = True

    with torch.no_grad():
        assert g.applies(Cuda())
        net.sem_seg_head.train()
        try:
            assert not g.applies(Cuda())
        finally:
            net.sem_seg_head.eval()
    with torch.enable_grad():
        assert not g.applies(Cuda())


def test_weight_signature_follows_weight_changes() -> None:
    net = _net()
    before = weight_signature(net)
    assert weight_signature(net) == before
    net.load_state_dict(net.state_dict())  # in-place copies bump the version counters
    after_load = weight_signature(net)
    assert after_load != before
    net.double()
    assert weight_signature(net) != after_load


def test_weight_watch_sees_replacements_without_walking_every_call() -> None:
    net = _net()
    watch = WeightWatch(net)
    first = watch.signature()
    assert watch.signature() == first and first == weight_signature(net)
    with torch.no_grad():
        net.sem_seg_head.predictor.class_embed.weight.add_(1.0)  # in place
    second = watch.signature()
    assert second != first
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state, assign=True)  # new Parameter objects
    third = watch.signature()
    assert third != second
    net.sem_seg_head.occupancy_module = torch.nn.Linear(2, 2)  # a replaced sub-module
    assert watch.signature() != third
    assert watch.signature() == weight_signature(net)


def test_capture_key_has_shape_dtype_and_autocast() -> None:
    x = torch.zeros(1, 3, 4, 4)
    plain = capture_key(x)
    assert plain == ((1, 3, 4, 4), torch.float32, x.device, None)
    if torch.cuda.is_available():  # CUDA autocast cannot be switched on without a GPU
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert capture_key(x)[3] == torch.bfloat16
    assert capture_key(torch.zeros(2, 3, 4, 4)) != plain


def test_one_capture_per_key_and_recapture_after_reload(fake_graphs) -> None:
    net = _net()
    g = Graphed2D(net, say=lambda *_: None)
    x1, x2 = _images(1), _images(2)
    with torch.no_grad():
        ref1 = net.forward_eager(x1)
        _assert_same(g(x1), ref1, 0.0)
        g(x1)
        assert g.captures == 1 and g.level == "full"
        g(x2)
        assert g.captures == 2 and len(g.graphs) == 2
        # new weights (load_state_dict copies in place): every capture is dropped and rebuilt on demand
        state = {k: v + 0.01 if k.startswith("sem_seg_head.") and v.is_floating_point() else v
                 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        out = g(x1)
        assert g.captures == 3 and len(g.graphs) == 1
        _assert_same(out, net.forward_eager(x1), 0.0)
        assert (out["pred_logits"] - ref1["pred_logits"]).abs().max() > 0  # the new weights were used
    assert [m[0] for m in fake_graphs.made] == ["full"] * 3
    # captured in thread-local mode: a DataLoader's pin-memory thread (3D training) or a writer thread may call
    # CUDA while this thread captures
    assert {m[3] for m in fake_graphs.made} == {"thread_local"}


def test_capture_cache_is_bounded(fake_graphs) -> None:
    net = _net()
    g = Graphed2D(net, max_captures=2, say=lambda *_: None)
    with torch.no_grad():
        for b in (1, 2, 3):
            g(_images(b))
    assert len(g.graphs) == 2 and g.captures == 3
    assert [k[0][0] for k in g.graphs] == [2, 3]  # the least recently used went first


def test_fallback_to_graphed_backbone_then_eager(fake_graphs) -> None:
    net = _net()
    said: list[str] = []
    fake_graphs.fail_levels = {"full"}
    g = Graphed2D(net, say=said.append)
    x = _images(1)
    with torch.no_grad():
        _assert_same(g(x), net.forward_eager(x), 0.0)
        assert g.level == "backbone" and "operation not permitted" in g.fallback_reason
        assert fake_graphs.made[-1][0] == "backbone" and fake_graphs.made[-1][1] == tuple(net.backbone_input(x).shape)
        assert any("falling back to 'backbone'" in s for s in said)
        fake_graphs.fail_levels = {"full", "backbone"}
        _assert_same(g(_images(2)), net.forward_eager(_images(2)), 0.0)
        assert g.level == "eager" and not g.graphs
    assert not g.applies(x)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


def _graphed_and_eager(net: Panoptic2DNet, batch: int, amp) -> tuple[list[dict], list[dict]]:
    """(graphed, eager) outputs of ``net`` for a CUDA batch and its half, under ``amp`` autocast (None: off); the
    eager ones first, so that they run the plain modules whatever the graphs' first capture changes."""
    x = _images(batch, "cuda")
    ctx = torch.autocast("cuda", dtype=amp) if amp is not None else torch.autocast("cuda", enabled=False)
    with torch.no_grad(), ctx:
        eager = [net.forward_eager(v) for v in (x, x * 0.5)]
        graphed = [net(v) for v in (x, x * 0.5)]
    return graphed, eager


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_matches_eager_on_cuda(amp, batch) -> None:
    net = _net().cuda()
    net.enable_cuda_graphs(True)
    (first, second), (eager, eager_half) = _graphed_and_eager(net, batch, amp)
    assert net.graphed.level == "full", net.graphed.fallback_reason
    assert net.graphed.captures == 1
    if amp is not None:  # the capture made the bf16 weight copies once; eager calls use them too
        from nvp3d.model.graphed2d import _has_low_precision

        assert _has_low_precision(net, amp)
    _assert_same(first, eager, TOLERANCE[amp])
    _assert_same(second, eager_half, TOLERANCE[amp])
    assert first["pred_logits"].data_ptr() != second["pred_logits"].data_ptr()  # cloned out of the graph


@cuda
def test_bf16_capture_sees_reloaded_weights_on_cuda() -> None:
    net = _net().cuda()
    net.enable_cuda_graphs(True)
    x = _images(1, "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = net(x)
        # the aggregator's weights: those with cached bf16 copies, which must not go stale
        state = {k: v * 1.05 if k.startswith("backbone.aggregator.") and v.is_floating_point() else v
                 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        replayed = net(x)
        eager = net.forward_eager(x)
    assert (replayed["pred_logits"].float() - before["pred_logits"].float()).abs().max() > 0
    assert net.graphed.captures == 2  # re-captured with fresh low-precision copies
    _assert_same(replayed, eager, TOLERANCE[torch.bfloat16])


@cuda
def test_a_capture_survives_later_captures_and_to_on_cuda() -> None:
    """fp32 capture, then a bf16 capture (evicts the fp32 position table from the DINO cache) and a same-device
    ``.to()`` (drops the bf16 weight copies): both graphs still replay the eager results."""
    net = _net().cuda()
    net.enable_cuda_graphs(True)
    x = _images(1, "cuda")
    off, bf16 = torch.autocast("cuda", enabled=False), torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with off:
            net(x)
        with bf16:
            net(x)
        net.to("cuda")
        torch.cuda.empty_cache()
        garbage = [torch.randn(1 << 20, device="cuda") for _ in range(8)]  # reuse any freed blocks
        with off:
            fp32_replay, fp32_eager = net(x), net.forward_eager(x)
        with bf16:
            bf16_replay, bf16_eager = net(x), net.forward_eager(x)
    del garbage
    assert net.graphed.captures == 2
    _assert_same(fp32_replay, fp32_eager, TOLERANCE[None])
    _assert_same(bf16_replay, bf16_eager, TOLERANCE[torch.bfloat16])


def test_low_precision_copies_are_made_once_per_weight_state(fake_graphs, monkeypatch) -> None:
    """Captures of several shapes share one set of bf16 weight copies; new weights need new copies."""
    from backbone_vggt import cache_low_precision_weights
    from nvp3d.model.graphed2d import _has_low_precision

    net = _net()
    assert not _has_low_precision(net, torch.bfloat16)
    cache_low_precision_weights(net, torch.bfloat16)
    assert _has_low_precision(net, torch.bfloat16) and not _has_low_precision(net, torch.float16)
    calls = []
    monkeypatch.setattr(graphed2d, "cache_low_precision_weights",
                        lambda m, d: calls.append(d) or cache_low_precision_weights(m, d))
    g = Graphed2D(net, say=lambda *_: None)
    monkeypatch.setattr(graphed2d, "capture_key", lambda x: (tuple(x.shape), x.dtype, x.device, torch.bfloat16))
    with torch.no_grad():
        g(_images(1))  # first call: signature unknown -> copies dropped (None), then made (bf16)
        g(_images(2))  # another shape: the copies are current, not made again
    assert calls == [None, torch.bfloat16]
    with torch.no_grad():
        net.backbone.aggregator.patch_embed.proj.weight.add_(0.0)  # bumps a version: weights "changed"
        g(_images(1))
    assert calls == [None, torch.bfloat16, None, torch.bfloat16]


def test_3d_stage_switch_follows_train_cuda_graphs_2d() -> None:
    """``build_net3d`` switches the frozen 2D network's graphs on from ``train.cuda_graphs_2d`` (default true);
    on CPU they never apply, so the 3D forward is unchanged."""
    from nvp3d.model.build import build_net3d

    base = {"model": {"preset": "tiny", "frustum3d": {"grid_dimensions": 32, "frustum_dims": 32}},
            "dataset": {"enable_3d": True, "target_size": [64, 48], "reduced_target_size": [32, 24],
                        "depth_size": [24, 32]}}
    on = build_net3d(validate_spec(base), (1,), (2,))
    assert on.net2d.graphed is not None and on.net2d.graphed.level == "full"
    off = validate_spec({**base, "train": {"cuda_graphs_2d": False}})
    assert build_net3d(off, (1,), (2,)).net2d.graphed is None


@cuda
def test_3d_training_forward_replays_the_frozen_2d_network_on_cuda() -> None:
    """The 3D stage in training mode: the frozen 2D forward (no_grad, eval) is replayed and equals the eager one,
    while a second thread keeps pinning host memory (a DataLoader's pin-memory thread) during the capture."""
    import threading

    from nvp3d.model.build import build_net3d

    torch.manual_seed(0)
    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {"grid_dimensions": 32, "frustum_dims": 32}},
                          "dataset": {"enable_3d": True, "target_size": [64, 48], "reduced_target_size": [32, 24],
                                      "depth_size": [24, 32]}})
    net = build_net3d(spec, (1,), (2,)).cuda().train()
    x = _images(2, "cuda")
    stop = threading.Event()

    def pin() -> None:
        while not stop.is_set():
            torch.empty(1 << 16).pin_memory()

    worker = threading.Thread(target=pin)
    worker.start()
    try:
        replayed = net.infer_2d(x)
    finally:
        stop.set()
        worker.join()
    assert net.net2d.graphed.captures == 1 and net.net2d.graphed.level == "full"
    with torch.no_grad():
        eager = net.net2d.forward_eager(x)
    _assert_same(replayed, eager, TOLERANCE[None])


# ---------------------------------------------------------------- inference.compile_2d (nvp3d.model.compiled2d)
def _fake_compile(net, enabled: bool = True) -> int:
    """Stands in for ``compile_2d``: marks the parts compiled (their plain forward) without compiling."""
    from nvp3d.model.compiled2d import compiled_parts

    parts = compiled_parts(net)
    for m in parts:
        m._compiled_call_impl = (lambda *a, _m=m, **k: _m.forward(*a, **k)) if enabled else None
    return len(parts)


def test_compile_2d_marks_every_block_and_head_part_and_undoes_it() -> None:
    from nvp3d.model.compiled2d import compile_2d, compiled_parts, is_compiled

    net = _net()
    keys = list(net.state_dict())
    agg = net.backbone.aggregator
    parts = compiled_parts(net)
    assert len(parts) == len(agg.frame_blocks) + len(agg.global_blocks) + 1 + len(list(net.sem_seg_head.children()))
    assert not is_compiled(net)
    assert compile_2d(net) == len(parts) and is_compiled(net)
    assert list(net.state_dict()) == keys  # compiled in place: no _orig_mod in the names
    compile_2d(net, enabled=False)
    assert not is_compiled(net) and all(m._compiled_call_impl is None for m in parts)


@pytest.mark.slow
@pytest.mark.skipif(not any(map(__import__("shutil").which, ("cc", "gcc", "clang"))),
                    reason="TorchInductor on CPU needs a C compiler")
def test_compiled_2d_network_matches_eager_on_cpu() -> None:
    """The compiled parts compute what the plain ones do (fp32, CPU inductor; fusion reorders sums only)."""
    from nvp3d.model.compiled2d import compile_2d

    net = _net()
    x = _images(2)
    with torch.no_grad():
        eager = net.forward_eager(x)
        compile_2d(net)
        try:
            compiled = net.forward_eager(x)
        finally:
            compile_2d(net, enabled=False)
    _assert_same(compiled, eager, 1e-4)


def test_failed_compiled_capture_retries_uncompiled_at_the_same_level(fake_graphs, monkeypatch) -> None:
    from nvp3d.model.compiled2d import is_compiled

    net = _net()
    monkeypatch.setattr(graphed2d, "compile_2d", _fake_compile)
    real_init = FakeStaticGraph.__init__

    def init(self, fn, example, **kw):  # a capture of the compiled network fails, the plain one works
        if is_compiled(net):
            raise RuntimeError("operation not permitted when stream is capturing (compiled)")
        real_init(self, fn, example, **kw)

    monkeypatch.setattr(FakeStaticGraph, "__init__", init)
    said: list[str] = []
    g = Graphed2D(net, say=said.append, compile=True)
    x = _images(1)
    with torch.no_grad():
        _assert_same(g(x), net.forward_eager(x), 0.0)
    assert g.level == "full" and not g.compile and "compiled" in g.compile_failure
    assert not is_compiled(net) and g.captures == 1
    assert any(s.startswith("inference.compile_2d: capturing the compiled 2D network failed") for s in said)


def test_switching_graphs_off_uncompiles(fake_graphs, monkeypatch) -> None:
    from nvp3d.model.compiled2d import is_compiled

    net = _net()
    monkeypatch.setattr(graphed2d, "compile_2d", _fake_compile)
    said: list[str] = []
    net.enable_cuda_graphs(True, compile=True, say=said.append)
    with torch.no_grad():
        net.graphed._capture(capture_key(_images(1)), _images(1))  # what a CUDA call does first
    assert is_compiled(net) and net.graphed.compile
    assert said == ["inference.compile_2d: compiling the 2D network for input (1, 3, 48, 64) (about a minute for "
                    "each new input size)"]
    net.enable_cuda_graphs(False)
    assert not is_compiled(net) and net.graphed is None


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_compiled_graphs_match_eager_on_cuda(amp) -> None:
    from nvp3d.model.compiled2d import is_compiled

    net = _net().cuda()
    net.enable_cuda_graphs(True, compile=True)
    (first, second), (eager, eager_half) = _graphed_and_eager(net, 2, amp)
    assert net.graphed.level == "full" and net.graphed.compile, net.graphed.compile_failure
    assert is_compiled(net) and net.graphed.captures == 1
    _assert_same(first, eager, TOLERANCE[amp])
    _assert_same(second, eager_half, TOLERANCE[amp])
    net.enable_cuda_graphs(False)
    assert not is_compiled(net)
