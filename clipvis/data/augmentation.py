"""Training augmentations of CLIP-VIS, in numpy/PIL: large-scale jitter for images, per-frame resize/flip for clips.

Both follow the original's detectron2 pipelines (same draws in the same order, same interpolation):

* Images (`coco_instance_lsj`): horizontal flip with probability 0.5, then `ResizeScale` (scale drawn
  uniformly in [MIN_SCALE, MAX_SCALE] of an IMAGE_SIZE square; the image is resized, aspect kept, to fit
  inside it; PIL bilinear), then `FixedSizeCrop` (one uniform draw u places the crop at
  ``round(u * max_offset)`` on both axes) padded bottom/right to IMAGE_SIZE with gray 128. Polygons are
  transformed as coordinates, clipped to the crop window and rasterized at the output size (pycocotools);
  RLE masks are decoded and transformed as images (PIL nearest). Instances whose polygons fall outside
  the crop are dropped.
* Clips (`YTVISDatasetMapper`): every frame independently (unless the sampling style ends in
  ``_by_clip`` / RANDOM_FLIP is ``flip_by_clip``) gets optional `RandomCrop`, `ResizeShortestEdge`
  (MIN_SIZE_TRAIN, MAX_SIZE_TRAIN) and a horizontal flip, plus optional brightness/contrast/saturation.

Randomness comes from a `numpy.random.Generator` passed in, so one sample's augmentation is reproducible
from its seed alone (whatever the worker or process that makes it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from clipvis.errors import ConfigError
from clipvis.mask_encoding import decode_rle, polygons_to_mask

Polygon = np.ndarray  # [K, 2] float64 (x, y) vertices


# ----------------------------------------------------------------------------------------------- masks
def valid_polygons(segmentation: Sequence[Sequence[float]]) -> List[Polygon]:
    """COCO polygons (flat [x0, y0, x1, y1, ...] lists) -> [K, 2] arrays, dropping those with < 3 points
    or an odd number of coordinates (as detectron2's COCO reader does)."""
    out = []
    for poly in segmentation:
        if len(poly) % 2 == 0 and len(poly) >= 6:
            out.append(np.asarray(poly, dtype=np.float64).reshape(-1, 2))
    return out


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Polygons or RLE -> bool mask [height, width]."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation, height, width)
    return polygons_to_mask(valid_polygons(segmentation), height, width)


def clip_polygon(polygon: Polygon, x0: float, y0: float, x1: float, y1: float) -> Optional[Polygon]:
    """Clip a polygon [K, 2] to the box [x0, x1] x [y0, y1] (Sutherland-Hodgman); None when nothing of
    positive area is left."""
    points = polygon
    for axis, bound, keep_greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(points) == 0:
            return None
        inside = points[:, axis] >= bound if keep_greater else points[:, axis] <= bound
        out = []
        for i in range(len(points)):
            cur, prev = points[i], points[i - 1]
            cur_in, prev_in = inside[i], inside[i - 1]
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + t * (cur - prev))
            if cur_in:
                out.append(cur)
        points = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        return None
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return points if area > 0 else None


# ------------------------------------------------------------------------------------- geometric steps
@dataclass(frozen=True)
class GeometricTransform:
    """Flip -> resize -> crop -> pad of one image, as drawn by :func:`sample_lsj` or the clip augmentation.

    Input size (height, width); `source_crop` (y0, x0, h, w), when set, first cuts that box out of the input
    (the video RandomCrop); `flip` mirrors x before resizing to `resized` (h, w); the crop window starts at
    `crop_offset` (y, x) in the resized image and has size `crop_size` (h, w) (it may extend past the resized
    image); the output canvas is `output_size` (h, w) (the crop window padded bottom/right).
    """

    height: int
    width: int
    flip: bool
    resized: Tuple[int, int]
    crop_offset: Tuple[int, int] = (0, 0)
    crop_size: Optional[Tuple[int, int]] = None
    output_size: Optional[Tuple[int, int]] = None
    pad_value: float = 128.0
    source_crop: Optional[Tuple[int, int, int, int]] = None

    @property
    def source_size(self) -> Tuple[int, int]:
        """(h, w) after the source crop (the input size without one)."""
        return self.source_crop[2:] if self.source_crop else (self.height, self.width)

    def _cut(self, array: np.ndarray) -> np.ndarray:
        if self.source_crop is None:
            return array
        y0, x0, h, w = self.source_crop
        return array[y0:y0 + h, x0:x0 + w]

    @property
    def window(self) -> Tuple[int, int]:
        """(h, w) of the crop window (the resized size when nothing is cropped)."""
        return self.crop_size or self.resized

    @property
    def canvas(self) -> Tuple[int, int]:
        """(h, w) of the output."""
        return self.output_size or self.valid_size

    @property
    def valid_size(self) -> Tuple[int, int]:
        """(h, w) of the image content inside the output (the rest is padding)."""
        (rh, rw), (oy, ox), (ch, cw) = self.resized, self.crop_offset, self.window
        return min(ch, rh - oy), min(cw, rw - ox)

    def _place(self, array: np.ndarray, fill) -> np.ndarray:
        oy, ox = self.crop_offset
        vh, vw = self.valid_size
        out = np.full(self.canvas + array.shape[2:], fill, dtype=array.dtype)
        out[:vh, :vw] = array[oy:oy + vh, ox:ox + vw]
        return out

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [h_out, w_out, 3] (PIL bilinear resize, gray padding)."""
        image = self._cut(image)
        if self.flip:
            image = image[:, ::-1]
        if self.resized != self.source_size:
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(self.resized[::-1], Image.BILINEAR))
        return self._place(image, np.uint8(self.pad_value) if image.dtype == np.uint8 else self.pad_value)

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """bool [H, W] -> bool [h_out, w_out] (PIL nearest resize, zero padding)."""
        mask = self._cut(mask)
        if self.flip:
            mask = mask[:, ::-1]
        if self.resized != self.source_size:
            mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask).astype(np.uint8)).resize(self.resized[::-1], Image.NEAREST))
        return self._place(mask.astype(bool), False)

    def apply_polygons(self, polygons: Sequence[Polygon]) -> List[Polygon]:
        """[K, 2] input-pixel polygons -> polygons in output pixels, clipped to the crop window (empty list when
        none overlaps it)."""
        (rh, rw), (oy, ox), (ch, cw) = self.resized, self.crop_offset, self.window
        sh, sw = self.source_size
        sx, sy = rw / sw, rh / sh
        out = []
        for poly in polygons:
            p = poly.copy()
            if self.source_crop is not None:
                y0, x0, h, w = self.source_crop
                p = clip_polygon(p, x0, y0, x0 + w, y0 + h)
                if p is None:
                    continue
                p = p - np.array([x0, y0], dtype=np.float64)
            if self.flip:
                p[:, 0] = sw - p[:, 0]
            p[:, 0] *= sx
            p[:, 1] *= sy
            if self.crop_size is not None:
                p = clip_polygon(p, ox, oy, ox + cw, oy + ch)
                if p is None:
                    continue
                p = p - np.array([ox, oy], dtype=np.float64)
            out.append(p)
        return out

    def apply_segmentation(self, segmentation) -> Optional[np.ndarray]:
        """An annotation's polygons or RLE -> bool mask [h_out, w_out]; None when its polygons leave the crop."""
        if isinstance(segmentation, dict):
            return self.apply_mask(decode_rle(segmentation, self.height, self.width))
        polygons = self.apply_polygons(valid_polygons(segmentation))
        if not polygons:
            return None
        return polygons_to_mask(polygons, *self.canvas)


def sample_lsj(rng: np.random.Generator, height: int, width: int, image_size: int, min_scale: float,
               max_scale: float, flip_prob: float = 0.5) -> GeometricTransform:
    """Draw the large-scale-jitter transform of one (height x width) image: flip, ResizeScale, FixedSizeCrop
    with padding to image_size x image_size. Three draws from `rng`, in this order: flip, scale, crop."""
    flip = bool(rng.uniform() < flip_prob)
    scale = rng.uniform(min_scale, max_scale)
    target = image_size * scale
    factor = min(target / height, target / width)
    resized = (int(np.round(height * factor)), int(np.round(width * factor)))
    u = rng.uniform(0.0, 1.0)
    offset = tuple(int(np.round(max(r - image_size, 0) * u)) for r in resized)
    return GeometricTransform(height, width, flip, resized, offset, (image_size, image_size), (image_size, image_size))


# -------------------------------------------------------------------------------------- clip settings
@dataclass
class ClipAugmentation:
    """Per-frame augmentation of video training (the original's `build_augmentation(cfg, is_train=True)`).

    Call :meth:`start_clip` once per clip, then :meth:`frame` for each frame: it returns the frame's
    `GeometricTransform` and a photometric function (uint8 [H, W, 3] -> same) or None.
    """

    min_sizes: Tuple[int, ...]
    max_size: int
    sample_style: str = "choice"
    flip: str = "horizontal"
    crop: Optional[Tuple[str, Tuple[float, float]]] = None
    photometric: Tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg) -> "ClipAugmentation":
        """Read INPUT.MIN_SIZE_TRAIN(_SAMPLING), MAX_SIZE_TRAIN, RANDOM_FLIP, CROP, AUGMENTATIONS."""
        inp = cfg.INPUT
        style = inp.MIN_SIZE_TRAIN_SAMPLING
        if style not in ("choice", "range", "choice_by_clip", "range_by_clip"):
            raise ConfigError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING {style!r} is not one of choice, range, choice_by_clip, range_by_clip")
        if inp.RANDOM_FLIP not in ("none", "horizontal", "vertical", "flip_by_clip"):
            raise ConfigError(f"INPUT.RANDOM_FLIP {inp.RANDOM_FLIP!r} is not one of none, horizontal, vertical, flip_by_clip")
        unsupported = [a for a in inp.AUGMENTATIONS if a not in ("brightness", "contrast", "saturation")]
        if unsupported:
            raise ConfigError(f"INPUT.AUGMENTATIONS {unsupported} not supported; use brightness, contrast, saturation")
        crop = (inp.CROP.TYPE, tuple(inp.CROP.SIZE)) if inp.CROP.ENABLED else None
        if crop and crop[0] not in ("relative_range", "relative", "absolute", "absolute_range"):
            raise ConfigError(f"INPUT.CROP.TYPE {crop[0]!r} is not one of relative_range, relative, absolute, absolute_range")
        sizes = tuple(inp.MIN_SIZE_TRAIN) if isinstance(inp.MIN_SIZE_TRAIN, (list, tuple)) else (int(inp.MIN_SIZE_TRAIN),)
        if "range" in style and len(sizes) != 2:
            raise ConfigError(f"INPUT.MIN_SIZE_TRAIN needs two values (min, max) with sampling {style!r}, got {sizes}")
        return cls(sizes, int(inp.MAX_SIZE_TRAIN), style, inp.RANDOM_FLIP, crop, tuple(inp.AUGMENTATIONS))

    def start_clip(self) -> None:
        """Forget the per-clip draws (size for ``*_by_clip``, flip for ``flip_by_clip``)."""
        self._size: Optional[int] = None
        self._flip: Optional[bool] = None

    def _crop_window(self, rng: np.random.Generator, h: int, w: int) -> Tuple[int, int]:
        kind, (a, b) = self.crop
        if kind == "relative":
            return int(h * a + 0.5), int(w * b + 0.5)
        if kind == "relative_range":
            ch, cw = np.asarray([a, b], dtype=np.float32) + rng.random(2) * (1 - np.asarray([a, b], dtype=np.float32))
            return int(h * ch + 0.5), int(w * cw + 0.5)
        if kind == "absolute":
            return min(int(a), h), min(int(b), w)
        ch = int(rng.integers(min(h, int(a)), min(h, int(b)) + 1))
        cw = int(rng.integers(min(w, int(a)), min(w, int(b)) + 1))
        return ch, cw

    def frame(self, rng: np.random.Generator, height: int, width: int):
        """Draw one (height x width) frame's transform: (GeometricTransform, photometric function or None).
        Draws, in order: crop window and position (if enabled), size, flip, photometric weights."""
        if not hasattr(self, "_size"):
            self.start_clip()
        source_size, crop_box = (height, width), None
        if self.crop is not None:
            ch, cw = self._crop_window(rng, height, width)
            y0 = int(rng.integers(height - ch + 1))
            x0 = int(rng.integers(width - cw + 1))
            crop_box = (y0, x0, ch, cw)
            height, width = ch, cw
        by_clip = self.sample_style.endswith("_by_clip")
        if self._size is None or not by_clip:
            if "range" in self.sample_style:
                self._size = int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
            else:
                self._size = int(rng.choice(self.min_sizes))
        size = self._size
        if size == 0:
            resized = (height, width)
        else:
            scale = size / min(height, width)
            newh, neww = (size, scale * width) if height < width else (scale * height, size)
            if max(newh, neww) > self.max_size:
                s = self.max_size / max(newh, neww)
                newh, neww = newh * s, neww * s
            resized = (int(newh + 0.5), int(neww + 0.5))
        flip = False
        if self.flip != "none":
            if self._flip is None or self.flip != "flip_by_clip":
                self._flip = bool(rng.uniform() < 0.5)
            flip = self._flip
        if self.flip == "vertical":
            raise ConfigError("INPUT.RANDOM_FLIP vertical is not supported for video training; use horizontal")
        photometric = self._photometric(rng) if self.photometric else None
        transform = GeometricTransform(*source_size, flip, resized, source_crop=crop_box)
        return transform, photometric

    def _photometric(self, rng: np.random.Generator):
        weights = [(name, rng.uniform(0.9, 1.1)) for name in self.photometric]

        def apply(image: np.ndarray) -> np.ndarray:
            out = image.astype(np.float32)
            for name, w in weights:
                if name == "brightness":
                    other = 0.0
                elif name == "contrast":
                    other = out.mean()
                else:  # saturation
                    other = out.dot(np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
                out = np.clip((1 - w) * other + w * out, 0, 255)
            return out.astype(np.uint8)

        return apply


def sample_clip_frames(rng: np.random.Generator, length: int, num_frames: int, frame_range: int, shuffle: bool) -> List[int]:
    """Frame indices of one training clip (the original YTVIS sampling): a reference frame uniformly, then
    ``num_frames - 1`` more drawn with replacement within ``frame_range`` of it (never the reference itself,
    unless the video has a single frame), sorted, optionally shuffled."""
    ref = int(rng.integers(length))
    start, end = max(0, ref - frame_range), min(length, ref + frame_range + 1)
    pool = np.array(list(range(start, ref)) + list(range(ref + 1, end)), dtype=np.int64)
    if num_frames > 1 and len(pool) == 0:
        pool = np.array([ref], dtype=np.int64)
    chosen = rng.choice(pool, num_frames - 1).tolist() if num_frames > 1 else []
    selected = sorted(chosen + [ref])
    if shuffle:
        rng.shuffle(selected)
    return [int(i) for i in selected]
