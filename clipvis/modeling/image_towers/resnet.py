"""open_clip's modified ResNet image towers (`RN50`, `RN101`, `RN50x4`, ...)."""
from __future__ import annotations

import math
from typing import Dict

import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn

from clipvis.modeling.image_towers import FEATURE_STRIDES, ClipImageTower, register_image_tower


@register_image_tower
class ModifiedResNetTower(ClipImageTower):
    """layer1..layer4 give res2..res5, layer4's output is also the dense map. A mask is classified by
    CLIP's attention pool with the global query attending only to the mask's pixels; a mask with no pixel
    gets a zero embedding and, as in the original, all-zero class logits."""

    family = "resnet"
    empty_mask_logits_zero = True

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        return isinstance(visual, ModifiedResNet)

    def output_shapes(self) -> Dict[str, tuple]:
        channels = [getattr(self.visual, f"layer{i}")[-1].bn3.num_features for i in range(1, 5)]
        shapes = {f"res{i + 2}": (int(c), FEATURE_STRIDES[f"res{i + 2}"]) for i, c in enumerate(channels)}
        shapes["clip_vis_dense"] = (shapes["res5"][0], FEATURE_STRIDES["clip_vis_dense"])
        return shapes

    def features(self, images: Tensor) -> Dict[str, Tensor]:
        features: Dict[str, Tensor] = {}
        x = self.visual.stem(images)
        for i in range(1, 5):
            x = getattr(self.visual, f"layer{i}")(x)
            features[f"res{i + 1}"] = x
        features["clip_vis_dense"] = x
        return features

    def pooled_embeddings(self, dense: Tensor, binary: Tensor) -> Tensor:
        pool = self.visual.attnpool
        batch, channels, height, width = dense.shape
        queries = binary.shape[1]
        heads = pool.num_heads
        head_dim = channels // heads

        position = pool.positional_embedding.to(dense.dtype)  # [1 + s*s, C]
        side = int(math.sqrt(position.shape[0] - 1))
        grid = position[1:].t().reshape(1, channels, side, side)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        pixels = dense.flatten(2).transpose(1, 2)  # [B, hw, C]
        keys_values = pixels + grid.flatten(2).transpose(1, 2)
        global_token = pixels.mean(dim=1, keepdim=True) + position[:1]  # [B, 1, C]

        def split_heads(x: Tensor) -> Tensor:  # [B, L, C] -> [B, heads, L, C/heads]
            return x.reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2)

        q = split_heads(F.linear(global_token, pool.q_proj.weight, pool.q_proj.bias))
        k = split_heads(F.linear(keys_values, pool.k_proj.weight, pool.k_proj.bias))
        v = split_heads(F.linear(keys_values, pool.v_proj.weight, pool.v_proj.bias))
        inside = binary.flatten(2).bool()  # [B, Q, hw]
        attended = F.scaled_dot_product_attention(
            q.expand(-1, -1, queries, -1), k, v, attn_mask=inside[:, None]
        )  # [B, heads, Q, C/heads]
        attended = attended.transpose(1, 2).reshape(batch, queries, channels)
        embedded = F.linear(attended, pool.c_proj.weight, pool.c_proj.bias)
        empty = ~inside.any(dim=-1, keepdim=True)
        return embedded.masked_fill(empty, 0.0)
