"""The frozen CLIP backbone against the original's features, for every inference fixture."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipvis.errors import CheckpointError, ClipvisError
from clipvis.modeling.clip_backbone import ClipBackbone
from conftest import assert_close, inference_fixture_paths, load_fixture, synthesize

FEATURES = ("res2", "res3", "res4", "res5", "clip_vis_dense")


def backbone_weights(data: dict) -> dict[str, torch.Tensor]:
    """The `backbone.` part of the fixture's synthetic official state dict, prefix stripped."""
    manifest = [(name, shape) for name, shape in data["manifest"] if name.startswith("backbone.")]
    weights = synthesize(manifest, data["meta"]["weight_seed"])
    return {name[len("backbone."):]: tensor for name, tensor in weights.items()}


def normalized_frames(data: dict, count: int) -> torch.Tensor:
    """The first `count` video frames, normalized with the fixture's pixel mean/std: [count,3,H,W]."""
    meta = data["meta"]
    mean = torch.tensor(meta["pixel_mean"]).view(-1, 1, 1)
    std = torch.tensor(meta["pixel_std"]).view(-1, 1, 1)
    return (data["video"][:count].float() - mean) / std


def pad_bottom_right(images: torch.Tensor, divisibility: int) -> torch.Tensor:
    """Zero-pad [B,3,H,W] at the bottom/right up to multiples of `divisibility`."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, -width % divisibility, 0, -height % divisibility))


@pytest.fixture(scope="module", params=inference_fixture_paths(), ids=lambda path: path.name)
def case(request):
    """(fixture data, ClipBackbone with the fixture's synthetic weights loaded strictly)."""
    data = load_fixture(request.param)
    backbone = ClipBackbone(data["meta"]["clip_model"])
    weights = backbone_weights(data)
    ours = set(backbone.state_dict())
    assert ours == set(weights), (
        f"missing {sorted(set(weights) - ours)[:5]}, unexpected {sorted(ours - set(weights))[:5]}"
    )
    backbone.load_state_dict(weights, strict=True)
    return data, backbone


def test_backbone_features_match_original(case):
    """The stored res2..res5/clip_vis_dense are those of the first 2 unpadded normalized frames."""
    data, backbone = case
    expected = data["backbone"]
    images = normalized_frames(data, expected["res2"].shape[0])
    features = backbone(images)
    assert set(features) == set(FEATURES)
    for name in FEATURES:
        assert_close(features[name], expected[name], rel=1e-4, name=name)


def test_padded_dense_features_match_original(case):
    """clip_vis_dense of the zero-padded frames (what classification pools from) matches the
    fixture's full-video clip_vis_dense, and every feature has its stated channels and stride."""
    data, backbone = case
    images = pad_bottom_right(normalized_frames(data, 2), data["meta"]["size_divisibility"])
    features = backbone(images)
    assert_close(features["clip_vis_dense"], data["clip_vis_dense"][:2], rel=1e-4, name="clip_vis_dense")
    height, width = images.shape[-2:]
    for name, (channels, stride) in backbone.output_shapes().items():
        assert tuple(features[name].shape) == (2, channels, height // stride, width // stride), name


def test_backbone_is_frozen(case):
    """No parameter trains, outputs carry no graph, and a parent's .train() leaves it in eval mode."""
    data, backbone = case
    assert not any(parameter.requires_grad for parameter in backbone.parameters())
    parent = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(2, 2)})
    parent.train()
    try:
        assert parent["head"].training
        assert not any(module.training for module in backbone.modules())
        features = backbone(normalized_frames(data, 1).requires_grad_(True))
        assert not features["clip_vis_dense"].requires_grad
    finally:
        parent.eval()


def test_logit_scale_and_embedding_size(case):
    data, backbone = case
    assert backbone.logit_scale is backbone.clip_model.logit_scale
    assert backbone.embed_dim == data["text"]["classifier"].shape[-1]


def test_unknown_model_name_is_a_clipvis_error():
    with pytest.raises(ClipvisError, match="unknown CLIP model"):
        ClipBackbone("no_such_clip_model")


def test_unknown_pretrained_tag_is_a_clipvis_error(tmp_path):
    with pytest.raises(ClipvisError, match="neither a file nor an open_clip pretrained tag"):
        ClipBackbone("RN50", pretrained=str(tmp_path / "missing_weights.pt"))


def _no_cache(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda **kwargs: None)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_uncached_pretrained_tag_offline_is_a_clipvis_error(monkeypatch, tmp_path):
    """Offline (HF_HUB_OFFLINE=1), a known tag whose weights are not in the cache is refused with a how-to."""
    _no_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipvisError, match="not in the local cache and downloads are off"):
        ClipBackbone("convnext_base_w_320", pretrained="laion_aesthetic_s13b_b82k_augreg")


def test_uncached_pretrained_tag_is_downloaded_on_first_use(monkeypatch, tmp_path):
    """Online, the tag is fetched through open_clip's downloader (stood in for here: no network in tests); a failed
    download is one clear error naming the way out."""
    import open_clip.pretrained

    _no_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CLIPVIS_OFFLINE", raising=False)
    source = ClipBackbone("clipvis_tiny_convnext")
    weights = tmp_path / "fetched.pt"
    torch.save(source.clip_model.state_dict(), weights)
    asked = []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **kw: asked.append(cfg) or str(weights))
    from clipvis.modeling import clip_backbone

    path = clip_backbone._resolve_pretrained("convnext_base_w_320", "laion_aesthetic_s13b_b82k_augreg")
    assert path == weights and len(asked) == 1

    def unreachable(cfg, **kw):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", unreachable)
    with pytest.raises(ClipvisError, match="could not download .*name resolution.*fetch them once elsewhere"):
        ClipBackbone("convnext_base_w_320", pretrained="laion_aesthetic_s13b_b82k_augreg")


def test_pretrained_local_file_is_loaded(tmp_path):
    """`pretrained` as a local file loads those weights (tiny registered model: cheap to build)."""
    source = ClipBackbone("clipvis_tiny_convnext")
    with torch.no_grad():
        for parameter in source.clip_model.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(parameter.numel()))
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.clip_model.state_dict(), path)
    loaded = ClipBackbone("clipvis_tiny_convnext", pretrained=str(path))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not any(parameter.requires_grad for parameter in loaded.parameters())


def test_pretrained_file_of_another_model_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "not_a_clip.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="could not load CLIP weights"):
        ClipBackbone("clipvis_tiny_convnext", pretrained=str(path))


def test_a_new_tower_family_is_one_class_and_one_registration(tmp_path):
    """Adding an image-tower family: a `ClipImageTower` subclass + `register_image_tower`, nothing else. Shown
    with a toy tower for open_clip ViTs (patch tokens as one map, resized to the four strides) on a tiny ViT."""
    import json

    import open_clip
    import torch.nn.functional as F
    from open_clip.transformer import VisionTransformer

    from clipvis.config import builtin_config, load_config
    from clipvis.modeling.image_towers import IMAGE_TOWERS, ClipImageTower, register_image_tower
    from clipvis.modeling.meta_arch import build_model

    (tmp_path / "clipvis_test_tiny_vit.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(tmp_path / "clipvis_test_tiny_vit.json")

    class PatchMapTower(ClipImageTower):
        family = "test_vit"

        @classmethod
        def matches(cls, visual):
            return isinstance(visual, VisionTransformer)

        def output_shapes(self):
            width = self.visual.conv1.out_channels
            return {**{f"res{i}": (width, 2 ** i) for i in range(2, 6)}, "clip_vis_dense": (width, 32)}

        def features(self, images):
            grid = self.visual.conv1(images)  # [B, width, H/16, W/16]
            size = images.shape[-2:]
            out = {f"res{i}": F.interpolate(grid, size=(size[0] // 2 ** i, size[1] // 2 ** i)) for i in range(2, 6)}
            out["clip_vis_dense"] = out["res5"]
            return out

        def pooled_embeddings(self, dense, binary):
            pooled = torch.einsum("bchw,bqhw->bqc", dense, binary / (binary.sum((-2, -1), keepdim=True) + 1e-8))
            return self.visual.ln_post(pooled) @ self.visual.proj

    with pytest.raises(ClipvisError, match="does not support"):
        ClipBackbone("clipvis_test_tiny_vit")
    register_image_tower(PatchMapTower)
    try:
        cfg = load_config(builtin_config("clipvis_video_tiny.yaml"),
                          ["MODEL.FC_CLIP.CLIP_MODEL_NAME", "clipvis_test_tiny_vit", "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", ""])
        model = build_model(cfg).eval()
        assert model.backbone.tower.family == "test_vit"
        with torch.no_grad():
            outputs, dense = model(torch.zeros(1, 3, 64, 96))
        assert outputs["pred_masks"].shape == (1, model.num_queries, 16, 24)
        masks = torch.randn(1, 3, *dense.shape[-2:])
        assert model.backbone.pooled_embeddings(dense, masks).shape == (1, 3, 32)
    finally:
        IMAGE_TOWERS.pop("test_vit")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_convnext_in_place_blocks_are_timm_blocks_bit_for_bit(autocast):
    """Without autograd the ConvNeXt tower runs timm's blocks with GELU, layer scale and residual add written in
    place (README "Speed"); the features equal timm's own stage forwards exactly, in fp32 and under bf16
    autocast (where the float32 layer scale promotes the bf16 product, so that step is not in place)."""
    import copy
    from types import SimpleNamespace

    from timm.models.convnext import ConvNeXt

    from clipvis.modeling.image_towers.convnext import ConvNeXtTower, InPlaceConvNeXtBlock

    torch.manual_seed(0)
    trunk = ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=0, ls_init_value=0.5).eval()
    with torch.no_grad():
        for parameter in trunk.parameters():
            parameter.normal_(0, 0.3)
    names = list(trunk.state_dict())
    tower = ConvNeXtTower(SimpleNamespace(trunk=copy.deepcopy(trunk)))
    assert all(type(block) is InPlaceConvNeXtBlock for stage in tower.visual.trunk.stages for block in stage.blocks)
    assert list(tower.visual.trunk.state_dict()) == names
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = tower.features(images)
        x = trunk.stem(images)
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            assert features[f"res{i + 2}"].dtype == x.dtype
            assert torch.equal(features[f"res{i + 2}"], x), f"res{i + 2}"
        assert torch.equal(features["clip_vis_dense"], trunk.norm_pre(x))
    with torch.enable_grad():  # with autograd, timm's own forward (nothing overwritten that backward needs)
        images.requires_grad_(True)
        tower.features(images)["res5"].sum().backward()
    assert images.grad is not None
