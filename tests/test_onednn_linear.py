"""Linear layers as single oneDNN calls (`clipvis.inference.onednn_linear`): a fused bf16 Linear + activation
rounds once, a float32 one computes torch's Linear up to summation order, the swap keeps the state dict's names
and the predictor swaps exactly the layers it should."""
from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

import clipvis.inference.onednn_linear as onednn_linear
from clipvis.inference.onednn_linear import OneDNNLinear, mkl_skips_avx512, onednn_linear_available, use_onednn_linears
from clipvis.inference.predictor import VideoPredictor

from test_precision import needs_bf16, tiny_bf16_checkpoint

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")

# float32 products in another summation order (oneDNN's blocking instead of MKL's): a few float32 roundings of
# the output's scale apart, far below anything a wrong weight, bias or activation would give
FLOAT32_REORDERING = 1e-5


@needs_bf16
def test_fused_bf16_linear_activation_rounds_once():
    """A fused bf16 Linear + GELU / ReLU gives the activation of the float32-accumulated product, rounded to
    bfloat16 once (within one bf16 rounding of the float32 reference; the unfused pair rounds twice)."""
    torch.manual_seed(0)
    for activation in (nn.GELU(), nn.ReLU()):
        linear = nn.Linear(64, 96).to(torch.bfloat16)
        x = torch.randn(3, 10, 64).to(torch.bfloat16)
        with torch.inference_mode():
            fused = OneDNNLinear(linear, activation)(x)
            reference = activation(F.linear(x.float(), linear.weight.float(), linear.bias.float()))
        assert fused.dtype == torch.bfloat16 and fused.shape == (3, 10, 96)
        assert ((fused.float() - reference).abs() <= reference.abs() * 2 ** -8 + 1e-6).all(), type(activation).__name__


@needs_onednn
@pytest.mark.parametrize("activation", [None, nn.GELU(), nn.ReLU()], ids=["none", "gelu", "relu"])
def test_float32_onednn_linear_is_torchs_linear(activation):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    x = torch.randn(4, 7, 96)
    with torch.inference_mode():
        out = OneDNNLinear(linear, activation)(x)
        expected = F.linear(x, linear.weight, linear.bias)
        expected = expected if activation is None else activation(expected)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert ((out - expected).abs().max() / expected.abs().max()) < FLOAT32_REORDERING


def test_only_exact_gelu_and_relu_are_fused():
    with pytest.raises(ValueError, match="exact GELU or a ReLU"):
        OneDNNLinear(nn.Linear(4, 4), nn.GELU(approximate="tanh"))
    mlp = Mlp(8, 16, act_layer=nn.SiLU)
    assert use_onednn_linears(mlp, torch.float32) == ((2, 0) if onednn_linear_available() else (0, 0))
    assert type(mlp.act) is nn.SiLU


@needs_onednn
def test_use_onednn_linears_on_timms_mlp_keeps_names_outputs_and_gradients():
    """timm's Mlp (ConvNeXt-B's blocks): fc1 + GELU become one call, fc2 a plain oneDNN Linear; the state dict
    keeps its names; with autograd the same products run unfused and gradients reach the weights. Layers of
    another dtype are left alone."""
    torch.manual_seed(0)
    mlp = Mlp(64, 256).eval()
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        expected = mlp(x)
    keys = mlp.state_dict().keys()
    assert use_onednn_linears(mlp, torch.bfloat16) == (0, 0)
    assert use_onednn_linears(mlp, torch.float32) == (2, 1)
    assert isinstance(mlp.fc1, OneDNNLinear) and mlp.fc1.onednn_name == "gelu" and type(mlp.act) is nn.Identity
    assert isinstance(mlp.fc2, OneDNNLinear) and mlp.fc2.onednn_name == "none"
    assert mlp.state_dict().keys() == keys
    with torch.inference_mode():
        assert ((mlp(x) - expected).abs().max() / expected.abs().max()) < FLOAT32_REORDERING
    out = mlp(x)
    out.sum().backward()
    assert torch.allclose(out, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert mlp.fc1.weight.grad is not None and mlp.fc2.weight.grad is not None


def test_mkl_skips_avx512_only_on_non_intel_cpus_with_avx512(monkeypatch):
    monkeypatch.setattr(onednn_linear, "onednn_linear_available", lambda: True)
    for vendor, capability, expected in [("GenuineIntel", "AVX512", False), ("AuthenticAMD", "AVX512", True),
                                         ("AuthenticAMD", "AVX2", False), ("", "AVX512", False)]:
        monkeypatch.setattr(onednn_linear, "_cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert mkl_skips_avx512() is expected, (vendor, capability)


@needs_bf16
def test_bf16_predictor_runs_its_bf16_linears_through_onednn(tmp_path, monkeypatch):
    """At bf16 on CPU, `from_config` runs every bfloat16 Linear as a oneDNN call and fuses every ConvNeXt
    block's fc1 + GELU and every deformable encoder layer's linear1 + ReLU; float32 layers (the sampling
    offsets, CLIP's head) stay; the state dict keeps its names and the outputs stay within bf16 rounding of the
    predictor without the swap."""
    import clipvis.inference.predictor as predictor_module

    cfg, _, weights = tiny_bf16_checkpoint(tmp_path)
    swapped = VideoPredictor.from_config(cfg, weights=weights, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(predictor_module, "use_onednn_linears", lambda model, dtype: (0, 0))
        plain = VideoPredictor.from_config(cfg, weights=weights, progress=False)
    layers = {name: m for name, m in swapped.model.named_modules() if isinstance(m, OneDNNLinear)}
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers.values())
    assert not any(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in swapped.model.modules())
    assert use_onednn_linears(swapped.model, torch.bfloat16) == (0, 0)  # already swapped by from_config
    blocks = [block for stage in swapped.model.backbone.clip_model.visual.trunk.stages for block in stage.blocks]
    linear_mlps = sum(not block.use_conv_mlp for block in blocks)  # the tiny tower's MLPs are 1x1 convolutions
    encoder_layers = len(swapped.model.sem_seg_head.pixel_decoder.transformer.encoder.layers)
    assert sum(m.onednn_name != "none" for m in layers.values()) == linear_mlps + encoder_layers
    assert swapped.model.state_dict().keys() == plain.model.state_dict().keys()

    image = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        a = swapped._run_model(image)
        b = plain._run_model(image)
    for (outputs_a, dense_a), (outputs_b, dense_b) in zip(a, b):
        for key in ("pred_masks", "pred_embds", "pred_object_logits"):
            error = (outputs_a[key] - outputs_b[key]).norm() / outputs_b[key].norm()
            assert error < 0.05, (key, float(error))
        assert ((dense_a - dense_b).norm() / dense_b.norm()) < 0.05
