"""Linear layers as single oneDNN calls, for CPU inference.

PyTorch multiplies a float32 `nn.Linear` on CPU with MKL's sgemm and a bfloat16 one with oneDNN. MKL does not run
its AVX-512 kernels on AMD processors: on an AVX-512 AMD EPYC (family 26, 2 threads) its products reach 160-210
GFLOP/s where oneDNN's reach 360-460 on the same shapes (README "Speed"). `use_onednn_linears` swaps a model's
Linear layers of one dtype for `OneDNNLinear`, one `torch.ops.mkldnn._linear_pointwise` call each, with the
activation that follows fused into it where a module pairs them (`LINEAR_ACTIVATION_PAIRS`). `VideoPredictor`
does this for its bf16 layers, and for its float32 layers where `mkl_skips_avx512()`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clipvis.inference.precision import bf16_supported
from clipvis.modeling.image_towers.convnext import is_exact_gelu

__all__ = ["OneDNNLinear", "use_onednn_linears", "mkl_skips_avx512", "onednn_linear_available"]

# (Linear, activation) attribute pairs of the modules whose Linear feeds an activation directly: timm's `Mlp`
# (ConvNeXt blocks) and the deformable encoder layers' feed-forward.
LINEAR_ACTIVATION_PAIRS = (("fc1", "act"), ("linear1", "activation"))


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpuinfo_field(name: str) -> str:
    """The first value of field `name` in /proc/cpuinfo (e.g. "vendor_id", "model name"); "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id")


def mkl_skips_avx512() -> bool:
    """Whether this CPU has AVX-512 that MKL's float32 products leave unused: an x86 CPU not made by Intel
    (vendor from /proc/cpuinfo) on which torch runs AVX-512 kernels. There oneDNN's float32 linear is about twice
    as fast as MKL's; on Intel CPUs and CPUs without AVX-512 the two are on par (README "Speed")."""
    vendor = _cpu_vendor()
    return (bool(vendor) and vendor != "GenuineIntel" and onednn_linear_available()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def _onednn_activation(activation: nn.Module) -> Optional[str]:
    """The oneDNN post-op name of an exact GELU (torch's, or timm's, which calls F.gelu) or a ReLU; else None."""
    if type(activation) is nn.ReLU:
        return "relu"
    return "gelu" if is_exact_gelu(activation) else None


class OneDNNLinear(nn.Linear):
    """A CPU Linear layer, optionally with the activation after it, as one oneDNN call
    (`torch.ops.mkldnn._linear_pointwise`): `[..., in] -> [..., out]` in the weight's dtype, the input cast to
    it first (what autocast does for a bfloat16 layer). A fused activation is applied to the float32-accumulated
    product before it is written out, instead of in a second pass over the output (for a bfloat16 output that
    also means one rounding instead of two). Parameters are the Linear's own (`weight`, `bias`: the state dict's
    names do not change). Where gradients are needed it computes the same thing with `F.linear`."""

    def __init__(self, linear: nn.Linear, activation: Optional[nn.Module] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = activation
        self.onednn_name = "none" if activation is None else _onednn_activation(activation)
        if self.onednn_name is None:
            raise ValueError(f"oneDNN fuses an exact GELU or a ReLU, not {type(activation).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            out = F.linear(x, self.weight, self.bias)
            return out if self.activation is None else self.activation(out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.onednn_name, [], "none")


def _swappable(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain CPU `nn.Linear` with `dtype` weights that oneDNN can multiply here."""
    if type(linear) is not nn.Linear or linear.weight.dtype != dtype or linear.weight.device.type != "cpu":
        return False
    if not onednn_linear_available():
        return False
    return dtype != torch.bfloat16 or bf16_supported(linear.weight.device)


def use_onednn_linears(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Replace, in place, every plain CPU `nn.Linear` of `model` whose weights are `dtype` by a `OneDNNLinear`;
    where a module's Linear feeds an exact GELU or a ReLU directly (`LINEAR_ACTIVATION_PAIRS`), the activation is
    fused into it and replaced by Identity. For inference only (the model's forward without autograd runs oneDNN;
    with autograd, the same products unfused). Returns (Linear layers replaced, activations fused among them)."""
    replaced = fused = 0
    for module in list(model.modules()):
        for linear_name, activation_name in LINEAR_ACTIVATION_PAIRS:
            linear, activation = getattr(module, linear_name, None), getattr(module, activation_name, None)
            if (isinstance(linear, nn.Module) and isinstance(activation, nn.Module) and _swappable(linear, dtype)
                    and _onednn_activation(activation) is not None):
                setattr(module, linear_name, OneDNNLinear(linear, activation))
                setattr(module, activation_name, nn.Identity())
                replaced, fused = replaced + 1, fused + 1
        for name, child in list(module.named_children()):
            if _swappable(child, dtype):
                setattr(module, name, OneDNNLinear(child))
                replaced += 1
    return replaced, fused
