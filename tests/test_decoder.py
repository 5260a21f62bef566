"""The segmentation head (pixel decoder + transformer decoder) against the original's outputs."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from attention_replay import replay_attention_masks
from conftest import assert_close, inference_fixture_paths, load_fixture, synthesize

from clipvis.modeling.mask_former_head import MaskFormerHead
from clipvis.modeling.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from clipvis.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from clipvis.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder, attention_mask_from_masks

HEAD_PREFIX = "sem_seg_head."
FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = (4, 8, 16, 32)
COMPARED = ("pred_object_logits", "pred_masks", "pred_ious", "pred_embds")
FIXTURES = inference_fixture_paths()


def head_state_dict(manifest, seed: int) -> dict:
    """The synthetic official weights of the head, with the `sem_seg_head.` prefix stripped."""
    head_manifest = [(name, shape) for name, shape in manifest if name.startswith(HEAD_PREFIX)]
    return {name[len(HEAD_PREFIX):]: value for name, value in synthesize(head_manifest, seed).items()}


def build_head(manifest, meta: dict, backbone: dict) -> MaskFormerHead:
    """A head sized from the fixture: input channels from its backbone maps, widths from the manifest."""
    shapes = dict(manifest)
    conv_dim = shapes[HEAD_PREFIX + "pixel_decoder.mask_features.weight"][1]
    mask_dim = shapes[HEAD_PREFIX + "pixel_decoder.mask_features.weight"][0]
    hidden_dim = shapes[HEAD_PREFIX + "predictor.decoder_norm.weight"][0]
    input_shapes = {name: (backbone[name].shape[1], stride) for name, stride in zip(FEATURE_NAMES, FEATURE_STRIDES)}
    pixel_decoder = MSDeformAttnPixelDecoder(input_shapes, conv_dim=conv_dim, mask_dim=mask_dim)
    predictor = MultiScaleMaskedTransformerDecoder(
        conv_dim, hidden_dim=hidden_dim, num_queries=meta["num_queries"], dec_layers=meta["dec_layers"],
        mask_dim=mask_dim)
    return MaskFormerHead(pixel_decoder, predictor).eval()


@pytest.fixture(scope="module")
def runs(reference):
    """Per fixture file name: (fixture, head loaded with the synthetic weights, those weights, head
    outputs on the fixture's first two frames, teacher-forced with the original's attention masks: see
    tests/attention_replay.py). Built lazily, once per module."""
    cache = {}

    def get(path):
        if path.name not in cache:
            torch.manual_seed(0)
            fixture = load_fixture(path)
            head = build_head(fixture["manifest"], fixture["meta"], fixture["backbone"])
            state = head_state_dict(fixture["manifest"], fixture["meta"]["weight_seed"])
            head.load_state_dict(state, strict=True)
            features = {name: fixture["backbone"][name] for name in FEATURE_NAMES}
            if _features_are_decoder_input(fixture):
                with torch.no_grad(), replay_attention_masks(fixture, force=True) as replay:
                    outputs = head(features)
                replay.check_decisions(margin=1e-5)
            else:  # the recorded masks are of the padded input: nothing to replay
                with torch.no_grad():
                    outputs = head(features)
            cache[path.name] = (fixture, head, state, outputs)
        return cache[path.name]

    return get


def _features_are_decoder_input(fixture: dict) -> bool:
    """Whether the stored stride-4 backbone map has the decoder's mask size (False when the frames were padded)."""
    return tuple(fixture["backbone"]["res2"].shape[-2:]) == tuple(fixture["decoder"]["pred_masks"].shape[-2:])


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_state_dict_keys_are_the_official_ones(runs, path):
    fixture, head, _, _ = runs(path)
    expected = {name[len(HEAD_PREFIX):]: tuple(shape) for name, shape in fixture["manifest"]
                if name.startswith(HEAD_PREFIX)}
    actual = {name: tuple(value.shape) for name, value in head.state_dict().items()}
    assert sorted(set(actual) - set(expected)) == [], "keys the official checkpoint lacks (e.g. position encodings)"
    assert sorted(set(expected) - set(actual)) == [], "official keys the head does not have"
    assert actual == expected


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_head_matches_reference(runs, path):
    fixture, _, _, outputs = runs(path)
    decoder = fixture["decoder"]
    res2 = fixture["backbone"]["res2"]
    if not _features_are_decoder_input(fixture):
        pytest.skip(
            f"stored backbone features ({tuple(res2.shape[-2:])} at stride 4) are not the decoder's input "
            f"(masks {tuple(decoder['pred_masks'].shape[-2:])}: the frames were padded to a multiple of 32); "
            "the end-to-end test covers this fixture")
    frames = res2.shape[0]
    for key in COMPARED:  # teacher-forced: CPU-independent within rounding
        assert_close(outputs[key], decoder[key][:frames], rel=1e-5, name=key)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_aux_outputs_one_per_earlier_prediction(runs, path):
    fixture, _, _, outputs = runs(path)
    aux = outputs["aux_outputs"]
    assert len(aux) == fixture["meta"]["dec_layers"] - 1
    for entry in aux:
        assert set(entry) == {"pred_object_logits", "pred_masks", "pred_ious"}
        for key in entry:
            assert entry[key].shape == outputs[key].shape
    if aux:  # the first prediction comes from the learnable queries alone: the same for every frame
        first = aux[0]["pred_object_logits"]
        assert_close(first[1:], first[:1].expand_as(first[1:]), rel=1e-6, name="aux0 object logits")


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_strict_loading_rejects_bad_state_dicts(runs, path):
    _, head, state, _ = runs(path)
    missing = dict(state)
    missing.pop("predictor.decoder_norm.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        head.load_state_dict(missing, strict=True)
    wrong_shape = dict(state)
    weight = wrong_shape["pixel_decoder.mask_features.weight"]
    wrong_shape["pixel_decoder.mask_features.weight"] = torch.zeros(weight.shape[0] + 1, *weight.shape[1:])
    with pytest.raises(RuntimeError, match="size mismatch"):
        head.load_state_dict(wrong_shape, strict=True)


def _small_head(dec_layers: int) -> MaskFormerHead:
    input_shapes = {"res2": (16, 4), "res3": (24, 8), "res4": (40, 16), "res5": (48, 32)}
    pixel_decoder = MSDeformAttnPixelDecoder(input_shapes, conv_dim=64, mask_dim=32, transformer_enc_layers=2,
                                             transformer_dim_feedforward=128)
    predictor = MultiScaleMaskedTransformerDecoder(64, hidden_dim=64, num_queries=7, dim_feedforward=96,
                                                   dec_layers=dec_layers, mask_dim=32)
    return MaskFormerHead(pixel_decoder, predictor).eval()


@pytest.mark.parametrize("dec_layers", [1, 5])
def test_odd_input_size_runs_with_right_shapes(dec_layers):
    torch.manual_seed(1)
    head = _small_head(dec_layers)
    # a 136x200 input: the backbone halves its stride-4 map with floor rounding
    sizes = {"res2": (34, 50), "res3": (17, 25), "res4": (8, 12), "res5": (4, 6)}
    channels = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
    features = {name: torch.randn(2, channels[name], *size) for name, size in sizes.items()}
    with torch.no_grad():
        out = head(features)
    assert out["pred_object_logits"].shape == (2, 7, 2)
    assert out["pred_masks"].shape == (2, 7, 34, 50)
    assert out["pred_ious"].shape == (2, 7, 1)
    assert out["pred_embds"].shape == (2, 7, 64)
    assert len(out["aux_outputs"]) == dec_layers - 1
    for key in ("pred_object_logits", "pred_masks", "pred_ious", "pred_embds"):
        assert torch.isfinite(out[key]).all(), key
    assert ((out["pred_ious"] > 0) & (out["pred_ious"] < 1)).all()
    # batch items are decoded independently
    with torch.no_grad():
        single = head({name: value[1:] for name, value in features.items()})
    for key in ("pred_object_logits", "pred_masks", "pred_ious", "pred_embds"):
        assert_close(single[key], out[key][1:], rel=1e-4, name=key)


def test_pixel_decoder_outputs_coarse_to_fine():
    torch.manual_seed(2)
    head = _small_head(2)
    sizes = {"res2": (20, 28), "res3": (10, 14), "res4": (5, 7), "res5": (3, 4)}
    channels = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
    features = {name: torch.randn(1, channels[name], *size) for name, size in sizes.items()}
    with torch.no_grad():
        mask_features, multi_scale = head.pixel_decoder(features)
    assert mask_features.shape == (1, 32, 20, 28)
    assert [tuple(m.shape) for m in multi_scale] == [(1, 64, 3, 4), (1, 64, 5, 7), (1, 64, 10, 14)]
    with pytest.raises(AssertionError, match="res2"):
        head.pixel_decoder({name: value for name, value in features.items() if name != "res2"})


def _bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample `[D, H, W]` at (x, y) in [0, 1] of the image extent (pixel centres at (i + 0.5) / size);
    positions outside the image read zero."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    result = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < width and 0 <= yi < height:
            result += weight * image[:, yi, xi]
    return result


@pytest.mark.parametrize("heads", [2, 3])  # 3: the head's table row is not a power-of-two fraction of x's stride
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deformable_attention_matches_pointwise_sampling(heads, dtype):
    torch.manual_seed(3)
    batch, head_dim, queries, points = 2, 3, 4, 2
    sizes = [(5, 4), (3, 2)]
    total = sum(h * w for h, w in sizes)
    value = torch.randn(batch, total, heads, head_dim, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(sizes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(sizes), points, dtype=torch.float64)
    out = multi_scale_deformable_attention(value.to(dtype), torch.tensor(sizes), torch.tensor([0, 20]),
                                           locations.to(dtype), weights.to(dtype)).double()
    assert out.shape == (batch, queries, heads * head_dim)

    expected = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        start = 0
        for level, (h, w) in enumerate(sizes):
            maps = value[b, start:start + h * w].permute(1, 2, 0).reshape(heads, head_dim, h, w)
            for q in range(queries):
                for m in range(heads):
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected[b, q, m] += weights[b, q, m, level, p] * _bilinear_zero_padded(maps[m], x, y)
            start += h * w
    assert_close(out, expected.flatten(2), rel=1e-10 if dtype == torch.float64 else 1e-5, name="deformable attention")


def test_msdeformattn_offsets_are_in_level_pixels():
    """With zero offset weights, a bias of (+1, 0) pixel moves every sample one pixel right."""
    torch.manual_seed(4)
    attention = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=1).double()
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
        attention.value_proj.weight.copy_(torch.eye(8))
        attention.value_proj.bias.zero_()
        attention.output_proj.weight.copy_(torch.eye(8))
        attention.output_proj.bias.zero_()
    h, w = 3, 5
    feature = torch.randn(1, h * w, 8, dtype=torch.float64)
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    reference = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None, :, None]
    out = attention(torch.randn(1, h * w, 8, dtype=torch.float64), reference, feature, [(h, w)], None)
    grid = feature.view(h, w, 8)
    shifted = torch.cat([grid[:, 1:], torch.zeros(h, 1, 8, dtype=torch.float64)], dim=1)
    assert_close(out, shifted.reshape(1, h * w, 8), rel=1e-10, name="shifted samples")


def test_attention_mask_hides_pixels_below_half_and_unmasks_empty_queries():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 8, 12)
    logits[0, 1] = -5.0  # covers nothing: must see everything
    mask = attention_mask_from_masks(logits, (4, 6))
    assert mask.shape == (2, 3, 24) and mask.dtype == torch.bool
    resized = F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False).flatten(2)
    expected = resized.sigmoid() < 0.5
    expected[0, 1] = False
    assert torch.equal(mask, expected)


def test_masked_cross_attention_equals_torch_multihead_attention_with_the_mask_per_head():
    """The cross-attention layer computes nn.MultiheadAttention's result with the mask broadcast over heads."""
    from clipvis.modeling.transformer_decoder import MaskedCrossAttentionLayer

    torch.manual_seed(6)
    layer = MaskedCrossAttentionLayer(16, 4).double().eval()
    queries, query_pos = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    pixels, pixel_pos = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    hidden = torch.rand(2, 5, 7) < 0.5
    hidden[:, :, 0] = False
    out = layer(queries, pixels, hidden, pixel_pos, query_pos)
    attended = layer.multihead_attn(queries + query_pos, pixels + pixel_pos, pixels,
                                    attn_mask=hidden.repeat_interleave(4, dim=0), need_weights=False)[0]
    assert_close(out, layer.norm(queries + attended), rel=1e-12, name="masked cross-attention")


def test_final_predictions_only_gives_the_full_decoders_final_predictions():
    """Inference (`final_predictions_only`) makes the earlier layers' attention masks from mask features resized
    to each level instead of resizing full-size mask logits. Its decisions equal the training-mode decoder's
    (which keeps every layer's full-size masks) except within rounding of the threshold; fed the full decoder's
    decisions (teacher forcing), its final predictions equal the full decoder's up to rounding."""
    from clipvis.modeling import transformer_decoder

    torch.manual_seed(0)
    decoder = transformer_decoder.MultiScaleMaskedTransformerDecoder(dec_layers=4).eval()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.normal_(0, 0.05)
    features = [torch.randn(2, 256, 6, 8), torch.randn(2, 256, 12, 16), torch.randn(2, 256, 24, 32)]
    mask_features = torch.randn(2, 48, 64, 256).permute(0, 3, 1, 2)  # channel-last, as the pixel decoder's
    own = transformer_decoder.attention_mask_from_masks
    recorded, sizes_seen = [], []

    def record(logits, size):
        recorded.append(own(logits, size))
        return recorded[-1]

    def teacher_forced(logits, size):
        sizes_seen.append(tuple(logits.shape[-2:]))
        expected = recorded[len(sizes_seen) - 1]
        ours = own(logits, size)
        resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).flatten(2)
        near_threshold = resized.abs() <= 1e-5 * resized.abs().amax()
        assert not ((ours != expected) & ~near_threshold).any()
        return expected

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_decoder, "attention_mask_from_masks", record)
        outputs = decoder(features, mask_features)
        patch.setattr(transformer_decoder, "attention_mask_from_masks", teacher_forced)
        with decoder.final_predictions_only():
            final = decoder(features, mask_features)
    assert sizes_seen == [(6, 8), (12, 16), (24, 32)]  # the logits are made at each layer's level size
    assert final["aux_outputs"] == [] and len(outputs["aux_outputs"]) == 3
    assert final["pred_masks"].shape == outputs["pred_masks"].shape == (2, 100, 48, 64)
    for key in ("pred_masks", "pred_object_logits", "pred_ious", "pred_embds"):
        torch.testing.assert_close(final[key], outputs[key], rtol=0, atol=1e-5 * float(outputs[key].abs().max()))
