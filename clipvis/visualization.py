"""Overlay videos: each tracked instance's mask drawn in its own color with a "class score" label.

Frames are uint8 RGB `[H, W, 3]`; masks are bool `[H, W]` at the frame's resolution.
"""
from __future__ import annotations

import colorsys
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipvis._io import atomic_write
from clipvis.data.video import Mp4Writer, VideoSource, progress_bar
from clipvis.errors import ClipvisError
from clipvis.inference.outputs import VideoInstance
from clipvis.mask_encoding import decode_rle

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

MASK_ALPHA = 0.5
_GOLDEN = 0.618033988749895


def track_colors(n: int) -> np.ndarray:
    """`n` distinct, saturated RGB colors, uint8 `[n, 3]`. Hues step by the golden ratio, so color
    `i` is the same for any `n` (a track keeps its color however many tracks there are)."""
    colors = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.07 + i * _GOLDEN) % 1.0
        saturation = 0.85 if i % 2 == 0 else 0.65
        value = 0.95 if (i // 2) % 2 == 0 else 0.8
        colors[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colors


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` [H, W] with a 4-neighbour outside it (frame edges count as outside)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` [H, W] grown by one pixel towards its 4 neighbours."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _font(height: int) -> ImageFont.ImageFont:
    size = max(10, height // 32)
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def draw_overlay(frame: np.ndarray, masks: Sequence[np.ndarray], colors, labels: Sequence[str]) -> np.ndarray:
    """Draw masks on a copy of `frame` uint8 `[H, W, 3]`: each bool mask `[H, W]` blended in its color
    (`colors`: `[N, 3]` 0..255), outlined, and labelled with its text (e.g. "cat 0.87") at the top of
    its bounding box. Returns uint8 `[H, W, 3]`."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
    if not (len(masks) == len(labels) <= len(colors)):
        raise ValueError(f"got {len(masks)} masks, {len(labels)} labels and {len(colors)} colors")
    height, width = frame.shape[:2]
    colors = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
    out = frame.astype(np.float32)
    boxes = []
    for mask, color in zip(masks, colors):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"mask of shape {mask.shape} does not match frame {height}x{width}")
        if not mask.any():
            boxes.append(None)
            continue
        out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * color
        edge = _boundary(mask)
        if min(height, width) >= 240:  # a 2-pixel outline on larger frames
            edge = _dilate(edge) & mask
        out[edge] = color
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append((cols[0], rows[0], cols[-1], rows[-1]))
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(height)
    for box, color, label in zip(boxes, colors, labels):
        if box is None or not label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left + 4, bottom - top + 4
        x = int(min(max(box[0], 0), max(width - text_w, 0)))
        y = int(box[1] - text_h if box[1] - text_h >= 0 else min(box[1], max(height - text_h, 0)))
        fill = tuple(int(c) for c in color)
        draw.rectangle((x, y, x + text_w - 1, y + text_h - 1), fill=fill)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x + 2 - left, y + 2 - top), label, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return np.asarray(image)


class OverlayVideoWriter(Mp4Writer):
    """Context manager writing overlay frames (uint8 RGB `[H, W, 3]`, via `.write`) to an H.264
    mp4 that plays everywhere (4:2:0; an odd width/height is padded by one pixel). Written under a
    temporary name and renamed to `path` when the `with` block succeeds."""

    def __init__(self, path: PathLike, fps: float = 10.0, *, crf: int = 18):
        super().__init__(path, fps, crf=crf, full_chroma=False)


def write_overlay_video(
    source: VideoSource, instances: Sequence[VideoInstance], path: PathLike, threshold: float = 0.5,
    *, window: int = 16, max_instances: Optional[int] = None,
) -> Path:
    """Render `source`'s selected frames with every instance scoring at least `threshold` drawn on
    them ("class score" labels, one color per instance) into an mp4 at `path`, at the selected
    frames' rate. Frames are decoded again `window` at a time and each instance's RLE is decoded per
    frame, so memory stays flat. `max_instances`: draw only that many, the highest-scoring. Returns the path."""
    info = source.info
    shown = [inst for inst in instances if inst.score >= threshold]
    if max_instances is not None:  # the best-scoring few, so that masks and labels do not pile up
        shown = sorted(shown, key=lambda inst: -inst.score)[:max_instances]
    for inst in shown:
        if inst.num_frames != info.num_frames:
            raise ClipvisError(
                f"instance {inst.track_id} has {inst.num_frames} frames but {info.path} has {info.num_frames} "
                "selected frames; draw the overlay with the same frame selection used for inference"
            )
    colors = track_colors(len(instances))
    color_of = {id(inst): colors[k] for k, inst in enumerate(instances)}
    labels = [f"{inst.class_name} {inst.score:.2f}" for inst in shown]
    log.info("drawing %d of %d instances (score >= %g) into %s", len(shown), len(instances), threshold, path)
    t = 0
    with OverlayVideoWriter(path, info.selected_fps) as writer, progress_bar(info.num_frames, "overlay video") as bar:
        for frames in source.windows(window):
            for frame in frames:
                masks, drawn_colors, drawn_labels = [], [], []
                for inst, label in zip(shown, labels):
                    rle = inst.rles[t]
                    if rle is None:
                        continue
                    if tuple(rle["size"]) != (info.height, info.width):
                        raise ClipvisError(
                            f"instance {inst.track_id}: mask size {tuple(rle['size'])} differs from the video's "
                            f"{info.height}x{info.width}; masks must be at the original resolution"
                        )
                    masks.append(decode_rle(rle))
                    drawn_colors.append(color_of[id(inst)])
                    drawn_labels.append(label)
                writer.write(draw_overlay(frame, masks, np.array(drawn_colors).reshape(-1, 3), drawn_labels))
                t += 1
                bar.update(1)
    return Path(path)


TRAINING_CURVES = ("total_loss", "loss_object_ce", "loss_mask", "loss_dice", "loss_iou")


def plot_training_curves(metrics_jsonl: Union[str, Path], png: Union[str, Path]) -> Optional[Path]:
    """Training losses (final layer) and learning rate against iteration, from a `metrics.jsonl` of
    `{"iteration": int, "total_loss": float, ..., "lr": float}` records -> a PNG (written atomically).
    Returns None when the file has no loss records yet."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if "total_loss" in r]
    if not records:
        return None
    iterations = [r["iteration"] + 1 for r in records]
    fig, (losses, lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key in TRAINING_CURVES:
        values = [r.get(key) for r in records]
        if all(v is not None for v in values):
            losses.plot(iterations, values, label=key, linewidth=2 if key == "total_loss" else 1)
    losses.set_yscale("log", nonpositive="mask")  # loss_iou is exactly 0 when no matched pair overlaps
    losses.set_ylabel("loss (weighted)")
    losses.legend(loc="upper right", fontsize="small")
    losses.grid(alpha=0.3)
    lr.plot(iterations, [r.get("lr", float("nan")) for r in records], color="gray")
    lr.set_ylabel("learning rate")
    lr.set_xlabel("iteration")
    lr.grid(alpha=0.3)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        return atomic_write(png, write)
    finally:
        plt.close(fig)


def draw_semantic_overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], *, alpha: float = MASK_ALPHA,
                          legend_rows: int = 12) -> np.ndarray:
    """A semantic segmentation to look at: each class's pixels tinted in its color, class borders darkened, and a
    legend (color, name, share of the image) of the largest classes in the top-left corner.

    image: uint8 `[H, W, 3]`; labels: int `[H, W]` indices into `names` -> uint8 `[H, W, 3]`."""
    colors = track_colors(len(names)).astype(np.float32)  # class i keeps its color
    out = image.astype(np.float32) * (1 - alpha) + colors[labels] * alpha
    border = np.zeros(labels.shape, dtype=bool)
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[border] *= 0.35
    canvas = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    counts = np.bincount(labels.reshape(-1), minlength=len(names))
    present = [i for i in np.argsort(-counts, kind="stable") if counts[i]][:legend_rows]
    if present:
        draw = ImageDraw.Draw(canvas)
        font = _font(max(image.shape[0], 320))
        line = max(12, int(font.size * 1.3)) if hasattr(font, "size") else 14
        texts = [f"{names[i]}  {100 * counts[i] / labels.size:.1f}%" for i in present]
        width = max(int(draw.textlength(t, font=font)) for t in texts) + line + 10
        draw.rectangle([0, 0, width, line * len(present) + 6], fill=(0, 0, 0))
        for row, (i, text) in enumerate(zip(present, texts)):
            y = 3 + row * line
            draw.rectangle([4, y + 2, 4 + line - 6, y + line - 4], fill=tuple(int(c) for c in colors[i]))
            draw.text((line + 4, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
