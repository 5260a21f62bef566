"""CLIP image towers: what CLIP-VIS needs from each open_clip image-tower family, behind one interface.

A tower wraps an open_clip model's `visual` module (it does not own it: parameters stay under
`clip_model.visual.*`, the official checkpoint's layout) and provides:

- `output_shapes()`: `{name: (channels, stride)}` of `res2`..`res5` and `clip_vis_dense`;
- `features(images)`: normalized images `[B,3,H,W]` -> those maps;
- `pooled_embeddings(dense, binary)`: `clip_vis_dense` `[B,C,h,w]` and binary masks `[B,Q,h,w]` -> `[B,Q,D]`
  CLIP embeddings of each mask's region;
- `empty_mask_logits_zero`: whether a mask with no pixel gets all-zero class logits (the ResNet rule).

Adding a family means one module with a `ClipImageTower` subclass and one `register_image_tower` call.
"""
from __future__ import annotations

from typing import Dict, List, Type

from torch import Tensor, nn

from clipvis.errors import ClipvisError

FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "clip_vis_dense": 32}


class ClipImageTower:
    """The interface every image-tower family implements (see the module docstring)."""

    family: str = ""
    empty_mask_logits_zero: bool = False

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        """Whether this family handles an open_clip `visual` module."""
        raise NotImplementedError

    def output_shapes(self) -> Dict[str, tuple]:
        """`{feature name: (channels, stride)}` for res2..res5 and clip_vis_dense."""
        raise NotImplementedError

    def features(self, images: Tensor) -> Dict[str, Tensor]:
        """Normalized images `[B,3,H,W]` -> `{"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32],
        "clip_vis_dense": [B,C5,H/32,W/32]}` (sizes rounded as the convolutions round them)."""
        raise NotImplementedError

    def pooled_embeddings(self, dense: Tensor, binary: Tensor) -> Tensor:
        """clip_vis_dense `[B,C,h,w]`, binary masks `[B,Q,h,w]` (0/1, dense's dtype) -> `[B,Q,D]`."""
        raise NotImplementedError


IMAGE_TOWERS: Dict[str, Type[ClipImageTower]] = {}


def register_image_tower(tower: Type[ClipImageTower]) -> Type[ClipImageTower]:
    """Add an image-tower family to the registry (usable as a class decorator)."""
    IMAGE_TOWERS[tower.family] = tower
    return tower


def image_tower_for(visual: nn.Module, model_name: str) -> ClipImageTower:
    """The registered tower for an open_clip `visual` module; ClipvisError naming the supported families."""
    for tower in IMAGE_TOWERS.values():
        if tower.matches(visual):
            return tower(visual)
    families: List[str] = list(IMAGE_TOWERS)
    raise ClipvisError(
        f"CLIP model {model_name!r} has an image tower ({type(visual).__name__}) that CLIP-VIS does not support; "
        f"supported families: {', '.join(families)} (e.g. convnext_base_w_320, RN50)")


from clipvis.modeling.image_towers import convnext, resnet  # noqa: E402,F401  (registers the built-in families)
