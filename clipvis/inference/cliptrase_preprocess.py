"""CLIPtrase's paper-protocol preprocessing: PIL resize of the short side to S, centre crop, CLIP normalisation.

Reproduces torchvision's ``Resize(S)`` + ``CenterCrop(S)`` on PIL images exactly (PIL's own resampling:
bicubic for images, nearest for label maps; torch's resize does not match PIL)."""
from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from clipvis.errors import ClipvisError

CLIP_MEAN, CLIP_STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # CLIP's normalisation
IGNORE = 255


class PreprocessError(ClipvisError):
    """An image or label map that cannot be preprocessed (wrong type, size smaller than 1)."""


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) -> (H', W') with the short side = size, the long side int(size * long / short) (truncated)."""
    if height <= 0 or width <= 0 or size <= 0:
        raise PreprocessError(f"cannot resize a {height}x{width} image to {size}")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop: int(round((H - S) / 2)), Python's round (half to even)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_center_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """PIL image -> PIL image S x S: short side to S with ``resample``, then the centre crop."""
    if not isinstance(image, Image.Image):
        raise PreprocessError(f"expected a PIL image, got {type(image).__name__}")
    h, w = resized_size(image.height, image.width, size)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample)
    if h < size or w < size:
        raise AssertionError("resized image smaller than the crop")
    top, left = crop_offsets(h, w, size)
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 [S, S, 3]: bicubic resize, centre crop, then RGB conversion (after the crop)."""
    return np.asarray(resize_center_crop(image, size, Image.BICUBIC).convert("RGB"), dtype=np.uint8)


def preprocess_gt(gt: Image.Image, size: int) -> np.ndarray:
    """PIL label map -> int16 [S, S]: nearest resize, the same centre crop (a 16-bit 65535 becomes -1)."""
    return np.asarray(resize_center_crop(gt, size, Image.NEAREST)).astype(np.int16)


def is_skipped(gt: np.ndarray | torch.Tensor) -> bool:
    """True when the original skips the image: its GT holds no value other than 255."""
    values = np.unique(np.asarray(gt))
    return bool(values.size == 0 or (values.size == 1 and values[0] == IGNORE))


def to_input_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [S, S, 3] or [B, S, S, 3] -> float32 [B, 3, S, S]: ToTensor then Normalize with CLIP mean/std."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))  # a copy: PIL's arrays are read-only
    if x.dtype != torch.uint8 or x.shape[-1] != 3 or x.ndim not in (3, 4):
        raise PreprocessError(f"expected uint8 images [.., S, S, 3], got {x.dtype} {tuple(x.shape)}")
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def metric_gt(gt: np.ndarray | torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """The GT the metric sees [S, S] int64: in 'with_background' mode 255 becomes C, else unchanged."""
    g = torch.as_tensor(np.asarray(gt)).long()
    if mode == "with_background":
        g = torch.where(g == IGNORE, torch.full_like(g, num_classes), g)
    return g
