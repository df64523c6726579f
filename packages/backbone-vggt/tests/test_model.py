"""End-to-end VGGT wrapper, checkpoint formats, bad input, mixed precision and training-mode behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from backbone_vggt import (
    BackboneInputError,
    CameraHead,
    CheckpointError,
    ConfigError,
    RotaryPositionEmbedding2D,
    build_aggregator,
    build_vggt,
    load_pretrained,
    set_attention_backend,
)
from torch.testing import assert_close


def _tiny_state(vggt_tiny) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, case in (("aggregator.", "agg_conv"), ("depth_head.", "depth_head"), ("point_head.", "point_head")):
        state.update({prefix + k: v for k, v in vggt_tiny[case]["state_dict"].items()})
    return state


@pytest.fixture(scope="module")
def tiny_model(vggt_tiny):
    model = build_vggt("vggt_tiny", enable_camera=False)
    report = load_pretrained(model, _tiny_state(vggt_tiny), strict=True)
    assert report.ok and report.loaded == 148 + 62 + 62
    return model.eval()


def test_tiny_vggt_end_to_end_matches_reference(tiny_model, vggt_tiny):
    images = vggt_tiny["agg_conv"]["images"]
    with torch.no_grad():
        out = tiny_model(images)
    assert_close(out["depth"], vggt_tiny["depth_head"]["out_fp32"]["pred"], rtol=1e-4, atol=1e-4)
    assert_close(out["depth_conf"], vggt_tiny["depth_head"]["out_fp32"]["conf"], rtol=1e-4, atol=1e-4)
    assert_close(out["world_points"], vggt_tiny["point_head"]["out_fp32"]["pred"], rtol=1e-4, atol=1e-4)
    assert out["world_points_conf"].shape == (1, 2, 70, 98)
    assert out["images"] is images and "pose_enc" not in out


@pytest.mark.parametrize("suffix,wrap", [(".pt", "model"), (".pth", "state_dict"), (".safetensors", None),
                                         (".pt", None)])
def test_checkpoint_file_formats(tmp_path, vggt_tiny, tiny_model, suffix, wrap):
    state = _tiny_state(vggt_tiny)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    model = build_vggt("vggt_tiny", enable_camera=False)
    report = load_pretrained(model, path)
    assert report.ok and report.loaded == len(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, tiny_model.state_dict()[name]), name


def test_bad_checkpoints_give_clear_errors(tmp_path, vggt_tiny):
    model = build_vggt("vggt_tiny", enable_camera=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(model, tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_pretrained(model, garbage)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_pretrained(model, {"aggregator.camera_token": 3})
    # a full model with a camera head against a checkpoint that has none
    with pytest.raises(CheckpointError, match=r"missing keys, first 'camera_head\."):
        load_pretrained(build_vggt("vggt_tiny"), _tiny_state(vggt_tiny))
    # wrong preset: shapes differ, first mismatch is named with both shapes
    with pytest.raises(CheckpointError, match=r"shape mismatches, first 'aggregator\.camera_token'"):
        load_pretrained(build_vggt("vggt_tiny", enable_camera=False, embed_dim=64), _tiny_state(vggt_tiny))


def test_disabled_heads_are_skipped_with_report(vggt_tiny):
    model = build_vggt("vggt_tiny", enable_camera=False, enable_point=False)
    report = load_pretrained(model, _tiny_state(vggt_tiny))
    assert report.skipped == {"point_head.": 62}
    assert "skipped 62 point_head.* keys" in str(report)


def test_bad_images_are_rejected(tiny_model):
    with pytest.raises(BackboneInputError, match="not a multiple of the patch size 14"):
        tiny_model(torch.rand(1, 1, 3, 71, 98))
    with pytest.raises(BackboneInputError, match="expected 3 image channels"):
        tiny_model(torch.rand(1, 1, 4, 70, 98))
    with pytest.raises(BackboneInputError, match="float RGB images"):
        tiny_model(torch.randint(0, 255, (1, 1, 3, 70, 98), dtype=torch.uint8))
    with pytest.raises(BackboneInputError, match="expected images"):
        tiny_model.aggregator(torch.rand(3, 70, 98))
    with pytest.raises(ConfigError, match="unknown preset"):
        build_vggt("vggt_huge")
    with pytest.raises(ConfigError, match="unknown patch_embed"):
        build_aggregator("vggt_tiny", patch_embed="resnet50")
    with pytest.raises(ConfigError, match="unknown attention backend"):
        set_attention_backend(tiny_model, "flash9")


def test_rope_matches_bruteforce_rotation():
    """Independent check: rotate channel pairs (i, i + d/4) of each half by pos * base^(-2i/(d/2)) in float64."""
    rope = RotaryPositionEmbedding2D(100)
    head_dim, n = 16, 6
    x = torch.randn(2, 3, n, head_dim, dtype=torch.float64)
    pos = torch.tensor([[0, 0], [1, 1], [1, 2], [2, 1], [3, 7], [9, 4]])
    cos, sin = rope.tables(pos, head_dim, torch.float64)
    out = rope.apply(x, cos, sin)
    half, quarter = head_dim // 2, head_dim // 4
    expected = x.clone()
    for t in range(n):
        for axis in range(2):  # 0: rows (first half), 1: columns (second half)
            for i in range(quarter):
                theta = float(pos[t, axis]) * 100.0 ** (-2 * i / half)
                a, b = axis * half + i, axis * half + i + quarter
                xa, xb = x[..., t, a], x[..., t, b]
                expected[..., t, a] = xa * math.cos(theta) - xb * math.sin(theta)
                expected[..., t, b] = xb * math.cos(theta) + xa * math.sin(theta)
    # float32 angles (as the reference) limit agreement to ~1e-6 rad * |pos|
    assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the attention blocks' form: quarters swapped by one flip, rotate_half's signs folded into the sin table
    assert_close(rope.rotate(x, cos, rope.signed_sin(sin)), out, rtol=1e-15, atol=1e-15)
    # bf16 tokens are rotated in float32 and only the result is rounded
    out_bf16 = rope.apply(x.to(torch.bfloat16), *rope.tables(pos, head_dim, torch.bfloat16))
    assert out_bf16.dtype == torch.bfloat16
    assert_close(out_bf16.double(), expected, rtol=2e-2, atol=2e-2)


def test_bf16_autocast_keeps_residual_stream_and_heads_fp32(tiny_model, vggt_tiny):
    images = vggt_tiny["agg_conv"]["images"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(images)
        tokens, _ = tiny_model.aggregator(images)
    assert all(t.dtype == torch.float32 for t in tokens)
    assert out["depth"].dtype == torch.float32 and out["world_points"].dtype == torch.float32
    ref = vggt_tiny["depth_head"]["out_fp32"]["pred"]
    rel = float(((out["depth"] - ref).abs() / ref.abs()).max())
    assert rel < 0.1, rel


def test_training_uses_checkpointing_with_identical_gradients(vggt_tiny):
    images = vggt_tiny["agg_conv"]["images"][:, :, :, :28, :42].double()
    state = {k: v for k, v in vggt_tiny["agg_conv"]["state_dict"].items() if not k.startswith(("frame_blocks.2",
             "frame_blocks.3", "global_blocks.2", "global_blocks.3"))}
    grads = []
    for checkpointing in (True, False):
        agg = build_aggregator("vggt_tiny", depth=2, cached_layer_indices=[0])
        load_pretrained(agg, state)
        agg = agg.double().train()
        agg.gradient_checkpointing = checkpointing
        tokens, _ = agg(images)
        tokens[-1].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in agg.parameters() if p.grad is not None]))
    assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def _dense_block(block, x):
    """Plain float64 re-statement of a pre-norm block (explicit softmax attention)."""
    h = F.layer_norm(x, x.shape[-1:], block.norm1.weight, block.norm1.bias, 1e-5)
    heads = block.attn.num_heads
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(-3, -2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    att = att.transpose(-3, -2).flatten(-2) @ block.attn.proj.weight.T + block.attn.proj.bias
    x = x + block.ls1.gamma * att
    h = F.layer_norm(x, x.shape[-1:], block.norm2.weight, block.norm2.bias, 1e-5)
    h = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return x + block.ls2.gamma * h


def test_camera_head_matches_dense_restatement():
    torch.manual_seed(3)
    head = CameraHead(dim_in=32, trunk_depth=2, num_heads=2).double().eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = [torch.randn(2, 3, 7, 32, dtype=torch.float64)]
    with torch.no_grad():
        preds = head(tokens, num_iterations=3)
        pose_tokens = F.layer_norm(tokens[-1][:, :, 0], (32,), head.token_norm.weight, head.token_norm.bias, 1e-5)
        pred, expected = None, []
        for _ in range(3):
            inp = head.empty_pose_tokens.expand(2, 3, -1) if pred is None else pred
            cond = F.silu(inp @ head.embed_pose.weight.T + head.embed_pose.bias)
            cond = cond @ head.poseLN_modulation[1].weight.T + head.poseLN_modulation[1].bias
            shift, scale, gate = cond.split(32, dim=-1)
            x = gate * (F.layer_norm(pose_tokens, (32,), eps=1e-6) * (1 + scale) + shift) + pose_tokens
            for block in head.trunk:
                x = _dense_block(block, x)
            x = F.layer_norm(x, (32,), head.trunk_norm.weight, head.trunk_norm.bias, 1e-5)
            delta = F.gelu(x @ head.pose_branch.fc1.weight.T + head.pose_branch.fc1.bias)
            delta = delta @ head.pose_branch.fc2.weight.T + head.pose_branch.fc2.bias
            pred = delta if pred is None else pred + delta
            expected.append(torch.cat([pred[..., :7], pred[..., 7:].clamp_min(0)], dim=-1))
    assert len(preds) == 3
    for ours, ref in zip(preds, expected):
        assert ours.shape == (2, 3, 9)
        assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_full_vggt_with_camera_head_runs(vggt_tiny):
    model = build_vggt("vggt_tiny")
    state = _tiny_state(vggt_tiny)
    report = load_pretrained(model, state, strict=False)
    assert report.loaded == len(state) and all(k.startswith("camera_head.") for k in report.missing)
    with torch.no_grad():
        out = model.eval()(vggt_tiny["agg_conv"]["images"][0])  # [S, 3, H, W] is batched automatically
    assert out["pose_enc"].shape == (1, 2, 9) and len(out["pose_enc_list"]) == 4
    assert bool((out["pose_enc"][..., 7:] >= 0).all())


def test_meta_build_then_assign_load_runs(vggt_tiny):
    with torch.device("meta"):
        model = build_vggt("vggt_tiny", enable_camera=False)
    load_pretrained(model, _tiny_state(vggt_tiny), assign=True)
    assert not model.aggregator._resnet_mean.is_meta
    with torch.no_grad():
        out = model.eval()(vggt_tiny["agg_conv"]["images"])
    assert_close(out["depth"], vggt_tiny["depth_head"]["out_fp32"]["pred"], rtol=1e-4, atol=1e-4)


def test_cached_low_precision_weights_are_bit_identical_under_autocast(tiny_model, vggt_tiny):
    from backbone_vggt import Linear, cache_low_precision_weights

    images = vggt_tiny["agg_conv"]["images"]
    agg = tiny_model.aggregator
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = agg(images)
        cache_low_precision_weights(agg, torch.bfloat16)
        try:
            cached, _ = agg(images)
            lin = agg.frame_blocks[0].attn.qkv
            assert isinstance(lin, Linear) and lin._lp_weight.dtype == torch.bfloat16
            x = torch.randn(2, lin.in_features)
            lin._lp_weight = torch.zeros_like(lin._lp_weight)  # prove the cached copy is what runs
            assert_close(lin(x).float(), lin.bias.to(torch.bfloat16).float().expand(2, -1))
            with torch.autocast("cpu", enabled=False):
                assert_close(lin(x), F.linear(x, lin.weight, lin.bias))  # fp32 path ignores the cache
        finally:
            cache_low_precision_weights(agg, None)
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


def test_static_graph_refuses_cpu_tensors():
    from backbone_vggt import StaticGraph

    with pytest.raises(BackboneInputError, match="CUDA graphs need CUDA tensors"):
        StaticGraph(lambda x: x * 2, torch.zeros(2))
    with pytest.raises(BackboneInputError, match="CUDA graphs need CUDA tensors"):  # every input of a tuple
        StaticGraph(lambda x, y: x * y, (torch.zeros(2), torch.zeros(2)))
