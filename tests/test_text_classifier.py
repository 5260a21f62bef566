"""Vocabulary parsing, the CLIP text classifier and mask-pooled classification, against the
original's outputs for every inference fixture."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from clipvis.errors import VocabularyError
from clipvis.modeling.clip_backbone import ClipBackbone
from clipvis.modeling.text_classifier import (
    PROMPT_TEMPLATES,
    build_text_classifier,
    cached_text_classifier,
    classification_logits,
    mask_class_logits,
    parse_vocabulary,
    templated_prompts,
)
from conftest import assert_close, inference_fixture_paths, load_fixture, synthesize


@pytest.fixture(scope="module", params=inference_fixture_paths(), ids=lambda path: path.name)
def data(request) -> dict:
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def backbone(data) -> ClipBackbone:
    """The fixture's CLIP backbone with its synthetic weights (strict load)."""
    manifest = [(name, shape) for name, shape in data["manifest"] if name.startswith("backbone.")]
    weights = synthesize(manifest, data["meta"]["weight_seed"])
    model = ClipBackbone(data["meta"]["clip_model"])
    model.load_state_dict({name[len("backbone."):]: tensor for name, tensor in weights.items()}, strict=True)
    return model


def tracked_masks(data: dict) -> torch.Tensor:
    """Decoder masks [T,Q,h,w] reordered per frame by the tracker's recorded permutations."""
    masks = data["decoder"]["pred_masks"]
    frames = [masks[0]] + [masks[i + 1][call["indices"]] for i, call in enumerate(data["tracker_calls"])]
    return torch.stack(frames)


# ----------------------------------------------------------------------------------- vocabulary

def test_prompts_match_original(data):
    text = data["text"]
    assert PROMPT_TEMPLATES == tuple(text["prompt_templates"])
    prompts, num_synonyms = templated_prompts(parse_vocabulary(data["meta"]["vocab"]))
    assert prompts == list(text["class_names"])
    assert num_synonyms == list(text["num_templates"])


def test_string_vocabulary_parses_like_the_list(data):
    vocab = data["meta"]["vocab"]
    assert parse_vocabulary("; ".join(vocab)) == parse_vocabulary(vocab)
    assert parse_vocabulary(";".join(name.replace(", ", ",") for name in vocab)) == parse_vocabulary(vocab)


def test_parse_vocabulary_synonyms_and_classes():
    assert parse_vocabulary("person; dog, puppy; red car") == [["person"], ["dog", "puppy"], ["red car"]]
    assert parse_vocabulary(["red car,automobile", "tree"]) == [["red car", "automobile"], ["tree"]]


@pytest.mark.parametrize(
    "vocab",
    ["", "   ", [], "person;;dog", "person; ;dog", ["person", "  "], "dog,,puppy", "dog, puppy,", [", tree"]],
    ids=repr,
)
def test_bad_vocabulary_is_a_vocabulary_error(vocab):
    with pytest.raises(VocabularyError):
        parse_vocabulary(vocab)


# ------------------------------------------------------------------------------ text classifier

def test_text_classifier_matches_original(data, backbone):
    classifier, num_synonyms = build_text_classifier(backbone, parse_vocabulary(data["meta"]["vocab"]))
    assert num_synonyms == list(data["text"]["num_templates"])
    assert_close(classifier, data["text"]["classifier"], rel=1e-4, name="classifier")


def test_text_classifier_cache(data, backbone, tmp_path, monkeypatch):
    """The cache returns the built classifier, reads it back without encoding, and is keyed by
    the text-tower weights."""
    classes = parse_vocabulary(data["meta"]["vocab"])[:1]  # the first class: its rows lead the classifier
    first = cached_text_classifier(backbone, classes, tmp_path)
    assert first[1] == [len(classes[0])]
    assert_close(first[0], data["text"]["classifier"][: len(classes[0])], rel=1e-4, name="cached classifier")
    assert len(list(tmp_path.glob("*.pt"))) == 1

    with monkeypatch.context() as patch:
        patch.setattr(backbone, "encode_text", lambda *args, **kwargs: pytest.fail("cache not used"))
        again = cached_text_classifier(backbone, classes, tmp_path)
    assert torch.equal(again[0], first[0]) and again[1] == first[1]

    bias = backbone.clip_model.ln_final.bias
    original = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(0.5)
        changed = cached_text_classifier(backbone, classes, tmp_path)
    finally:
        with torch.no_grad():
            bias.copy_(original)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    assert not torch.allclose(changed[0], first[0])


def test_classification_logits_scale_and_synonym_max():
    """Scaled cosine with the temperature capped at 100, then the max over each class's synonyms."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 5, 8, generator=generator)
    classifier = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    num_synonyms = [1, 3, 2]
    for temperature in (10.0, 250.0):
        logits = classification_logits(embeddings, classifier, torch.tensor(math.log(temperature)), num_synonyms)
        cosine = torch.nn.functional.normalize(embeddings, dim=-1) @ classifier.t()
        scaled = min(temperature, 100.0) * cosine
        expected = torch.stack([scaled[..., 0], scaled[..., 1:4].amax(-1), scaled[..., 4:6].amax(-1)], dim=-1)
        assert_close(logits, expected, rel=1e-5, name=f"logits at temperature {temperature}")


# ------------------------------------------------------------------------ mask classification

def test_mask_class_probabilities_match_original(data, backbone):
    """Per-frame class probabilities of the tracked masks, as the original's frame loop gives."""
    logits = mask_class_logits(
        backbone,
        data["clip_vis_dense"],
        tracked_masks(data),
        data["text"]["override_used_end_to_end"],
        list(data["text"]["num_templates"]),
    )
    probabilities = logits.softmax(-1).transpose(0, 1)  # [Q,T,K]
    expected = data["classify"]["per_frame_cls_prob"]
    # Pooling takes the pixels whose resized mask logit is > 0 (and, with a ResNet, a mask with none gets zero
    # logits): a pixel within rounding of 0 may be taken on one CPU and not on another, so a (query, frame)
    # with such a pixel is compared loosely; all others strictly.
    resized = F.interpolate(tracked_masks(data), size=data["clip_vis_dense"].shape[-2:], mode="bilinear",
                            align_corners=False)
    tie = (resized.abs() <= 1e-6 * resized.abs().amax()).flatten(2).any(-1).transpose(0, 1)  # [Q,T]
    assert tie.float().mean() <= 0.01, f"{int(tie.sum())} (query, frame) pairs have a pixel at the threshold"
    assert_close(probabilities[~tie], expected[~tie], rel=1e-4, name="per_frame_cls_prob")
    assert_close(probabilities[tie], expected[tie], rel=1e-2, name="per_frame_cls_prob at a pooling tie")


def test_frame_batching_does_not_change_logits(data, backbone):
    dense, masks = data["clip_vis_dense"][:3], tracked_masks(data)[:3]
    classifier, num_synonyms = data["text"]["override_used_end_to_end"], list(data["text"]["num_templates"])
    batched = mask_class_logits(backbone, dense, masks, classifier, num_synonyms, frames_per_batch=3)
    one_by_one = mask_class_logits(backbone, dense, masks, classifier, num_synonyms, frames_per_batch=1)
    assert_close(batched, one_by_one, rel=1e-5, name="batched vs per-frame")


def test_mask_without_positive_pixel(data, backbone):
    """ResNet: a mask with no positive pixel gets all-zero class logits (the original's quirk);
    ConvNeXt: it is classified from a zero pooled feature. Other masks are unaffected."""
    dense, masks = data["clip_vis_dense"][:1], tracked_masks(data)[:1].clone()
    masks[:, 0] = -1.0
    classifier, num_synonyms = data["text"]["override_used_end_to_end"], list(data["text"]["num_templates"])
    logits = mask_class_logits(backbone, dense, masks, classifier, num_synonyms)
    reference = mask_class_logits(backbone, dense, tracked_masks(data)[:1], classifier, num_synonyms)
    assert_close(logits[:, 1:], reference[:, 1:], rel=1e-5, name="other masks")
    if not backbone.tower.empty_mask_logits_zero:
        visual = backbone.clip_model.visual
        with torch.no_grad():
            empty = visual.head(visual.trunk.head(torch.zeros(1, dense.shape[1], 1, 1)))
        expected = classification_logits(empty, classifier, backbone.logit_scale, num_synonyms)
        assert_close(logits[0, 0], expected[0], rel=1e-5, name="empty ConvNeXt mask")
    else:
        assert torch.equal(logits[0, 0], torch.zeros(len(num_synonyms)))


def test_encoding_cut_after_the_longest_prompt_equals_the_full_context(data, backbone):
    """The text tower is causal and read at the end-of-text token: running each batch only up to its longest
    prompt (instead of the 77-token context) must not change the features."""
    prompts = data["text"]["class_names"][:24]
    ours = backbone.encode_text(prompts, batch_size=16)
    with torch.no_grad():
        full = backbone.clip_model.encode_text(backbone._tokenizer(prompts), normalize=False)
    assert_close(ours, full, rel=1e-6, name="cut vs full-context text features")


def test_predictor_reports_text_encoding_as_its_own_stage(tmp_path):
    from clipvis.config import builtin_config, load_config
    from clipvis.data.synthetic import synthetic_video
    from clipvis.inference.predictor import VideoPredictor

    cfg = load_config(builtin_config("clipvis_video_tiny.yaml"), ["INPUT.MIN_SIZE_TEST", "0"])
    predictor = VideoPredictor.from_config(cfg, weights=None, progress=False, text_cache_dir=tmp_path)
    frames = synthetic_video(2, 64, 64, seed=0)
    first = predictor.predict(frames, "cat; dog")
    assert first.timings["text encoding"] > 0
    assert "text encoding" not in predictor.predict(frames, "cat; dog").timings  # encoded once
    assert list(tmp_path.iterdir()) == []  # a random text tower is not cached on disk
