"""timm ConvNeXt image towers of open_clip (`convnext_*`, e.g. `convnext_base_w_320`)."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from clipvis.modeling.image_towers import FEATURE_STRIDES, ClipImageTower, register_image_tower


@register_image_tower
class ConvNeXtTower(ClipImageTower):
    """The trunk's four stages give res2..res5; `norm_pre` of the last stage is the dense map. A mask is
    classified from the average of the dense features under it, through the trunk's head and CLIP's
    projection (a mask with no pixel pools a zero feature)."""

    family = "convnext"
    empty_mask_logits_zero = False

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
