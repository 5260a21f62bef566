"""timm ConvNeXt image towers of open_clip (`convnext_*`, e.g. `convnext_base_w_320`)."""
from __future__ import annotations

from typing import Dict

import torch
from timm.layers import GELU as TimmGELU
from timm.layers import Mlp
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn

from clipvis.modeling.image_towers import FEATURE_STRIDES, ClipImageTower, register_image_tower


def is_exact_gelu(activation: nn.Module) -> bool:
    """Whether a module is the exact (erf) GELU: torch's `nn.GELU(approximate="none")` or timm's `GELU`."""
    if type(activation) is nn.GELU:
        return activation.approximate == "none"
    return type(activation) is TimmGELU


def _in_place_applies(block: nn.Module) -> bool:
    """Whether `InPlaceConvNeXtBlock`'s forward computes what this timm block's does: a ConvNeXtBlock with a
    channel-last MLP (timm's `Mlp`, no hidden norm), layer scale and an identity shortcut."""
    mlp = getattr(block, "mlp", None)
    return (type(block) is ConvNeXtBlock and not block.use_conv_mlp and block.gamma is not None
            and isinstance(block.shortcut, nn.Identity) and type(mlp) is Mlp and isinstance(mlp.norm, nn.Identity))


class InPlaceConvNeXtBlock(ConvNeXtBlock):
    """timm's ConvNeXtBlock (same parameters and names) whose forward without autograd, `[B,C,H,W] ->
    [B,C,H,W]`, writes the exact GELU, the layer scale and the residual add into the MLP's own outputs instead of
    three fresh tensors (at 96x120, 24 MB each: allocating and page-faulting them cost 6% of the trunk's time on
    an AVX2 EPYC, README "Speed"); bit-identical to timm's forward, which runs wherever autograd or training
    does. Where the product is bfloat16 and the layer scale float32 (bf16 inference), the promoted float32
    result is a new tensor, as in timm. `ConvNeXtTower` gives this class to the trunk's blocks."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.training:
            return super().forward(x)
        mlp = self.mlp
        hidden = mlp.fc1(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))
        if is_exact_gelu(mlp.act):
            torch._C._nn.gelu_(hidden)
        else:
            hidden = mlp.act(hidden)  # Identity where fc1 already applies it (a fused OneDNNLinear)
        out = mlp.fc2(hidden).permute(0, 3, 1, 2)
        gamma = self.gamma.reshape(1, -1, 1, 1)
        if out.dtype == gamma.dtype == x.dtype:
            return out.mul_(gamma).add_(x)
        return out.mul(gamma) + x


@register_image_tower
class ConvNeXtTower(ClipImageTower):
    """The trunk's four stages give res2..res5; `norm_pre` of the last stage is the dense map. A mask is
    classified from the average of the dense features under it, through the trunk's head and CLIP's
    projection (a mask with no pixel pools a zero feature)."""

    family = "convnext"
    empty_mask_logits_zero = False

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        for stage in visual.trunk.stages:
            for block in stage.blocks:
                if _in_place_applies(block):
                    block.__class__ = InPlaceConvNeXtBlock

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        trunk = getattr(visual, "trunk", None)
        return trunk is not None and type(trunk).__name__ == "ConvNeXt"

    def output_shapes(self) -> Dict[str, tuple]:
        channels = [info["num_chs"] for info in self.visual.trunk.feature_info if "stages" in info["module"]]
        shapes = {f"res{i + 2}": (int(c), FEATURE_STRIDES[f"res{i + 2}"]) for i, c in enumerate(channels)}
        shapes["clip_vis_dense"] = (shapes["res5"][0], FEATURE_STRIDES["clip_vis_dense"])
        return shapes

    def features(self, images: Tensor) -> Dict[str, Tensor]:
        trunk = self.visual.trunk
        features: Dict[str, Tensor] = {}
        x = trunk.stem(images)
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            features[f"res{i + 2}"] = x
        features["clip_vis_dense"] = trunk.norm_pre(x)
        return features

    def pooled_embeddings(self, dense: Tensor, binary: Tensor) -> Tensor:
        batch, queries = binary.shape[:2]
        area = binary.sum(dim=(-2, -1), keepdim=True) + 1e-8
        pooled = torch.einsum("bchw,bqhw->bqc", dense, binary / area)
        embedded = self.visual.head(self.visual.trunk.head(pooled.reshape(batch * queries, -1, 1, 1)))
        return embedded.reshape(batch, queries, -1)
