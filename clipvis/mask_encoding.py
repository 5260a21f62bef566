"""Masks between their forms: stride-4 mask logits -> binary masks at output size -> COCO RLEs -> masks.

Used by inference (encoding each frame's masks as it is decoded), the output files, the visualizer,
training-data reading (LVIS / COCO / YouTube-VIS segmentations) and evaluation. RLEs here are pycocotools
dicts `{"size": [H, W], "counts": str}` (JSON-ready); decoding also takes bytes counts, uncompressed
(list) counts, and polygons.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

Rle = Dict[str, object]  # {"size": [H, W], "counts": str}

__all__ = ["Rle", "decode_rle", "encode_rles", "logits_to_output_masks", "masks_to_rles", "polygons_to_mask",
           "rles_to_masks"]


def logits_to_output_masks(
    logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> torch.Tensor:
    """Stride-4 mask logits `[Q,h4,w4]` -> bool masks `[Q,H,W]` at output resolution, as the original's evaluator:
    bilinear to the padded input size, crop to the unpadded image, bilinear to the output size, > 0. The masks
    go through interpolation as a batch of one-channel images: the same numbers, 1.3x faster on CPU."""
    x = F.interpolate(logits[:, None], size=padded_size, mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):  # same size: bilinear is the identity, skip it
        x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
    return x[:, 0] > 0


def encode_rles(masks: torch.Tensor) -> List[Rle]:
    """bool `[Q,H,W]` -> Q COCO RLEs (counts as str), empty masks included."""
    return _encode(masks.cpu().numpy())


def _encode(masks: np.ndarray) -> List[Rle]:
    """bool `[N, H, W]` -> N JSON-ready RLEs (pycocotools encodes a Fortran-ordered uint8 [H, W, N] stack in one call)."""
    stack = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in mask_util.encode(stack)]


def masks_to_rles(masks: np.ndarray) -> List[Optional[Rle]]:
    """Binary masks `[T, H, W]` (bool or 0/1 integers) -> one COCO RLE per frame with `counts` as a str
    (JSON-ready), None for a frame without any pixel."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected masks [T, H, W], got shape {masks.shape}")
    if masks.dtype != bool:
        if not np.issubdtype(masks.dtype, np.integer):
            raise ValueError(f"expected boolean masks, got {masks.dtype}: threshold the mask probabilities first")
        masks = masks != 0
    present = masks.reshape(len(masks), -1).any(axis=1)
    rles: List[Optional[Rle]] = [None] * len(masks)
    if present.any():
        for t, rle in zip(np.flatnonzero(present), _encode(masks[present])):
            rles[t] = rle
    return rles


def decode_rle(rle: Optional[dict], height: Optional[int] = None, width: Optional[int] = None) -> Optional[np.ndarray]:
    """One COCO RLE (counts str, bytes or an uncompressed list) -> bool mask `[H, W]`. None gives an all-False
    mask when `height` and `width` are given, else None. With a size given, an RLE of another size is a
    ValueError."""
    if rle is None:
        return None if height is None or width is None else np.zeros((height, width), dtype=bool)
    mask = _decode([_compressed(rle)])[..., 0]
    if height is not None and width is not None and mask.shape != (height, width):
        raise ValueError(f"RLE of size {mask.shape} in an image of size {(height, width)}")
    return mask


def rles_to_masks(rles: Sequence[Optional[Rle]], height: int, width: int) -> np.ndarray:
    """Per-frame RLEs (None = empty) -> bool masks `[T, H, W]`."""
    out = np.zeros((len(rles), height, width), dtype=bool)
    present = [t for t, rle in enumerate(rles) if rle is not None]
    if present:
        out[present] = _decode([_compressed(rles[t]) for t in present]).transpose(2, 0, 1)
    return out


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """`[K, 2]` (x, y) polygons of one instance -> bool mask `[height, width]` (their union, as pycocotools
    rasterizes them)."""
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rles = mask_util.frPyObjects([np.asarray(p).reshape(-1).tolist() for p in polygons], height, width)
    return _decode([mask_util.merge(rles)])[..., 0]


def _compressed(rle: dict) -> dict:
    """An RLE with bytes counts (what pycocotools' decoder takes); uncompressed list counts are compressed."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_util.frPyObjects(dict(rle), *[int(s) for s in rle["size"]])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _decode(rles: Sequence[dict]) -> np.ndarray:
    """Compressed COCO RLEs -> bool `[H, W, N]`."""
    with warnings.catch_warnings():
        # pycocotools' decoder trips numpy 2's `__array__(copy=...)` deprecation on every call
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array__.*")
        return mask_util.decode(list(rles)).astype(bool)
