"""Building a model whose weights all come from a checkpoint (`parameters_on_meta` + `load_checkpoint`): no
parameter memory is allocated or initialised, buffers are real, and the loaded model is the one built and
loaded the ordinary way."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipvis.checkpoint import load_checkpoint, parameters_on_meta, read_checkpoint
from clipvis.config import builtin_config, load_config
from clipvis.errors import CheckpointError
from clipvis.modeling.meta_arch import build_model


def tiny_config():
    return load_config(builtin_config("clipvis_video_tiny.yaml"), ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", ""])


def test_model_built_with_parameters_on_meta_loads_to_the_ordinary_model(tiny_weights):
    with parameters_on_meta():
        model = build_model(tiny_config(), load_clip_weights=False)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # e.g. CLIP's causal mask, which no checkpoint holds
    assert not nn.Linear(2, 2).weight.is_meta  # the context is left

    ordinary = build_model(tiny_config(), load_clip_weights=False)
    load_checkpoint(model, tiny_weights)
    load_checkpoint(ordinary, tiny_weights)
    assert not any(p.is_meta for p in model.parameters())
    loaded, expected = model.state_dict(), ordinary.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ordinary.buffers()))
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), ordinary.parameters()))

    image = torch.rand(1, 3, 64, 96) * 255
    model.eval(), ordinary.eval()
    with torch.inference_mode():
        (out, dense), (expected_out, expected_dense) = model(image), ordinary(image)
    assert torch.equal(out["pred_masks"], expected_out["pred_masks"]) and torch.equal(dense, expected_dense)


def test_shared_parameters_stay_shared_and_missing_ones_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    with parameters_on_meta():
        model = Tied()
    weight = torch.randn(5, 3)
    load_checkpoint(model, {"embed.weight": weight, "out.weight": weight})
    assert model.out.weight is model.embed.weight and torch.equal(model.embed.weight, weight)

    with parameters_on_meta():
        model = Tied()
    with pytest.raises(CheckpointError, match="missing key"):
        load_checkpoint(model, {"embed.weight": weight})


def test_predictor_from_a_checkpoint_builds_its_parameters_on_meta(tiny_weights, monkeypatch):
    """With weights, `from_config` builds no parameter memory (ConvNeXt-B's random initialisation, 760 MB, was
    the process's peak); without weights it initialises as before. Its parameters are the checkpoint's."""
    import clipvis.checkpoint as checkpoint
    from clipvis.inference.predictor import VideoPredictor

    uses = []

    def spy():
        uses.append(True)
        return parameters_on_meta()

    monkeypatch.setattr(checkpoint, "parameters_on_meta", spy)
    predictor = VideoPredictor.from_config(tiny_config(), weights=tiny_weights, progress=False)
    assert uses == [True]
    state = {k: v for k, v in read_checkpoint(tiny_weights).items() if k in predictor.model.state_dict()}
    assert all(torch.equal(predictor.model.state_dict()[k], v) for k, v in state.items())
    VideoPredictor.from_config(tiny_config(), weights=None, progress=False)
    assert uses == [True]
